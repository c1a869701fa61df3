#!/usr/bin/env bash
# The load benchmark, side by side (issue [load bench]): the same workloads, the same client
# (benches' `loadgen`), in the same run, against
#   gatekeeper  the release build, benches/load/gatekeeper.toml (a separate process: its CPU
#               and memory are read from /proc)
#   postfix     Debian's Postfix with the equivalent restrictions (ci/postfix-bench.sh)
#   null        the do-nothing SMTP responder (`loadgen responder`): the ceiling
# then the early-reject workload again with Postfix's smtp-source as a second, independent
# client; the seed's mix at 1,000x the 4,500/h spike (1,250 sessions/s, open loop) against the
# gatekeeper; 10,000 sessions held open at once; and STARTTLS: the gatekeeper and Postfix
# restarted with the same ECDSA P-256 self-signed certificate (made here with openssl), every
# session EHLO, STARTTLS, a full handshake, EHLO again, then its workload. Prints one table
# (Markdown).
#
#   bash ci/bench-peers.sh --repeat 3 --out bench-results   # the full run, ~12 minutes; installs postfix
#   bash ci/bench-peers.sh --smoke                           # CI: a few hundred sessions each; < 1 minute
#
# Options: --sessions N --concurrency C --warmup N --workloads "early-reject forged accept mix"
#          --repeat K (each side-by-side run K times, round robin; the table shows the median)
#          --spike-rate R --spike-secs S --hold N --postfix yes|no|auto --out DIR (keep results, logs)
#          --tls-workloads "early-reject accept" --tls-sessions N (STARTTLS runs; concurrency as above)
#          --phases "closed external spike hold tls" (which parts run; all by default)
# Every session comes from its own source address in 127.0.0.0/8 (the gate allows one
# connection per address per minute). Figures are printed, never judged; --smoke fails only
# if a session went wrong (a wrong reply, a reset, a timeout, a failed handshake).
# Server CPU is utime+stime (+cutime+cstime) from /proc/PID/stat of the server's whole process
# tree (Postfix: the master and every daemon under it, smtpd and tlsmgr included; the time
# of daemons that exited is in the master's cutime), before and after, per measured session.
set -euo pipefail
cd "$(dirname "$0")/.."

sessions=20000 concurrency=100 warmup=1000 repeat=1
workloads="early-reject forged accept mix"
spike_rate=1250 spike_secs=60 hold=10000
postfix=yes out="" smoke=0
tls_workloads="early-reject accept" tls_sessions=10000
phases="closed external spike hold tls"
while [ $# -gt 0 ]; do
  case "$1" in
  --smoke)
    smoke=1 sessions=300 concurrency=20 warmup=50 spike_rate=200 spike_secs=3 hold=500 postfix=auto
    tls_sessions=200 tls_workloads="early-reject accept"
    ;;
  --sessions) sessions=$2; shift ;;
  --concurrency) concurrency=$2; shift ;;
  --warmup) warmup=$2; shift ;;
  --repeat) repeat=$2; shift ;;
  --workloads) workloads=$2; shift ;;
  --spike-rate) spike_rate=$2; shift ;;
  --spike-secs) spike_secs=$2; shift ;;
  --hold) hold=$2; shift ;;
  --postfix) postfix=$2; shift ;;
  --tls-workloads) tls_workloads=$2; shift ;;
  --tls-sessions) tls_sessions=$2; shift ;;
  --phases) phases=$2; shift ;;
  --out) out=$2; shift ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "bench-peers: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# --- set-up -----------------------------------------------------------------------------------
if [ "$postfix" = yes ] && ! command -v postfix >/dev/null; then
  # No configuration: Debian's own instance stays unconfigured and stopped.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  bash ci/setup.sh postfix
fi
[ "$postfix" = auto ] && { command -v postfix >/dev/null && postfix=yes || postfix=no; }
phase() { [[ " $phases " == *" $1 "* ]]; }
if phase tls && [ -n "$tls_workloads" ] && ! command -v openssl >/dev/null; then
  # ci/install-virus.sh installs it; CI must not lose the STARTTLS part silently.
  [ "${GATEKEEPER_REQUIRE_TOOLS:-}" = 1 ] && { echo "bench-peers: openssl missing (GATEKEEPER_REQUIRE_TOOLS=1)" >&2; exit 1; }
  echo "bench-peers: openssl missing; no STARTTLS runs" >&2
  tls_workloads=""
fi
cargo build --release -q -p gatekeeper --bin gatekeeper
cargo build --release -q -p gatekeeper-benches --bin loadgen
gk_bin=$PWD/target/release/gatekeeper
lg=$PWD/target/release/loadgen

if [ -n "$out" ]; then
  # A previous run's state (spool, ban database, Postfix queue) must not leak into this one:
  # its bans would greet this run's clients with 554.
  mkdir -p "$out"
  work=$(realpath "$out")
  rm -rf "$work"/gatekeeper-* "$work/postfix" "$work/postfix-tls" "$work/tls"
else
  work=$(mktemp -d)
fi
chmod 755 "$work"
results=$work/results.jsonl sources=$work/sources
: >"$results"
echo 0 >"$sources"
base=$((20000 + RANDOM % 20000))
gk_port=$base pf_port=$((base + 1)) null_port=$((base + 2))
# 10,000 sessions held open need as many descriptors in the client and in the server.
want=$((hold + 1000))
[ "$(ulimit -n)" -ge "$want" ] || ulimit -n "$(ulimit -Hn)" || true
[ "$(ulimit -n)" -ge "$want" ] || echo "bench-peers: ulimit -n is $(ulimit -n); the hold test may fail" >&2

pids=()
gk_pid="" pf_pid=""
cleanup() {
  [ -n "$gk_pid" ] && kill "$gk_pid" 2>/dev/null && wait "$gk_pid" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  if [ "$postfix" = yes ]; then
    bash ci/postfix-bench.sh stop "$work/postfix" 2>/dev/null
    bash ci/postfix-bench.sh stop "$work/postfix-tls" 2>/dev/null
  fi
  if [ -z "$out" ]; then rm -rf "$work"; fi
}
trap 'cleanup || true' EXIT

wait_port() { # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench-peers: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

gk_start() { # n [config]: a fresh gatekeeper with a fresh state dir: its memory starts from scratch
  local n=$1 config=${2:-benches/load/gatekeeper.toml}
  "$gk_bin" serve --config "$config" --listen "127.0.0.1:$gk_port" \
    --state-dir "$work/gatekeeper-$n" 2>"$work/gatekeeper-$n.log" &
  gk_pid=$!
  wait_port "$gk_port"
}

gk_stop() {
  kill "$gk_pid" && wait "$gk_pid" 2>/dev/null || true
  gk_pid=""
}

"$lg" responder --listen "127.0.0.1:$null_port" &
null_pid=$!
pids+=("$null_pid")
wait_port "$null_port"
gk_start 1
if [ "$postfix" = yes ]; then
  pf_pid=$(bash ci/postfix-bench.sh start "$work/postfix" "$pf_port")
fi

servers="null gatekeeper"
[ "$postfix" = yes ] && servers="null gatekeeper postfix"
port_of() { case $1 in null) echo "$null_port" ;; gatekeeper) echo "$gk_port" ;; postfix) echo "$pf_port" ;; esac; }
pid_of() { case $1 in null) echo "$null_pid" ;; gatekeeper) echo "$gk_pid" ;; postfix) echo "$pf_pid" ;; esac; }

failed=0
strict=()
[ "$smoke" = 1 ] && strict=(--fail-on-errors)
run() { # loadgen subcommand, arguments...
  "$lg" "$1" "${strict[@]}" "${@:2}" || { echo "bench-peers: FAILED: loadgen $*" >&2; failed=1; }
}

{
  echo "machine: $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(free -g | awk '/^Mem:/ {print $2}') GiB," \
    "Linux $(uname -r), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "run: $sessions sessions per workload at concurrency $concurrency after $warmup warm-up, x$repeat;" \
    "spike $spike_rate/s for $spike_secs s; hold $hold; STARTTLS: ${tls_workloads:-none}, $tls_sessions sessions;" \
    "phases: $phases; servers: $servers"
} | tee "$work/machine.txt"

# --- 1. closed loop, every workload, every server (round robin, so noise hits all alike) --------
phase closed || workloads=""
for rep in $(seq "$repeat"); do
  for w in $workloads; do
    for s in $servers; do
      run run --workload "$w" --sessions "$sessions" --concurrency "$concurrency" --warmup "$warmup" \
        --target "127.0.0.1:$(port_of "$s")" --server "$s" --server-pid "$(pid_of "$s")" \
        --sources "$sources" --json "$results"
    done
  done
done
if [[ " $workloads " == *" accept "* ]]; then
  spooled=$(find "$work/gatekeeper-1/maildir/new" -type f | wc -l)
  echo "gatekeeper Maildir: $spooled messages in new/ (each fsync'd before its 250)"
fi

# --- 2. early reject with smtp-source, a second independent client ----------------------------
if ! phase external; then
  :
elif command -v smtp-source >/dev/null && command -v gcc >/dev/null; then
  gcc -O2 -shared -fPIC -o "$work/srcaddr.so" ci/postfix-srcaddr.c -ldl
  for rep in $(seq "$repeat"); do
    for s in $servers; do
      # HELO, MAIL FROM:<>, RCPT TO:<Nnobody@example.test> (550, warned once a session), RSET, QUIT.
      run external --server "$s" --server-pid "$(pid_of "$s")" --workload early-reject \
        --sessions "$sessions" --client smtp-source --expect-stderr "recipient rejected: 550" --json "$results" \
        -- env SRCADDR_STATE="$sources" LD_PRELOAD="$work/srcaddr.so" \
        smtp-source -A -N -s "$concurrency" -m "$sessions" -f '' -t nobody@example.test -M client.bench.test \
        "127.0.0.1:$(port_of "$s")"
    done
  done
else
  echo "bench-peers: smtp-source or gcc missing; no second-client cross-check" >&2
fi

# --- 3. the spike: the seed's mix at 1,000x, open loop, against a fresh gatekeeper ------------
if phase spike; then
  gk_stop
  gk_start 2
  run spike --workload mix --rate "$spike_rate" --duration "$spike_secs" \
    --target "127.0.0.1:$gk_port" --server gatekeeper --server-pid "$gk_pid" --sources "$sources" --json "$results"
fi

# --- 4. sessions held open at once: memory ------------------------------------------------------
if phase hold; then
  gk_stop
  gk_start 3
  for s in gatekeeper null; do
    run hold --sessions "$hold" --target "127.0.0.1:$(port_of "$s")" --server "$s" --server-pid "$(pid_of "$s")" \
      --sources "$sources" --json "$results"
  done
fi

# --- 5. STARTTLS: the gatekeeper and Postfix with the same certificate, side by side ------------
# One self-signed ECDSA P-256 certificate; the client trusts it (and checks its name). Both
# servers restart with it: the gatekeeper's [tls] (max_handshakes raised to the client's
# concurrency, so the limit's 454s do not stand in for the handshake's cost; the default is
# 64), Postfix's smtpd_tls_security_level = may. No resumption: every session a full handshake.
if phase tls && [ -n "$tls_workloads" ]; then
  tls=$work/tls
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=mx.bench.test" \
    -addext "subjectAltName=DNS:mx.bench.test" -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>"$tls/openssl.log"
  { cat benches/load/gatekeeper.toml; printf '\n[tls]\ncert = "%s"\nkey = "%s"\nmax_handshakes = %d\n' \
    "$tls/cert.pem" "$tls/key.pem" "$((concurrency > 64 ? concurrency : 64))"; } >"$work/gatekeeper-tls.toml"
  gk_stop
  gk_start 4 "$work/gatekeeper-tls.toml"
  tls_servers=gatekeeper
  if [ "$postfix" = yes ]; then
    bash ci/postfix-bench.sh stop "$work/postfix"
    pf_pid=$(bash ci/postfix-bench.sh start "$work/postfix-tls" "$pf_port" "$tls/cert.pem" "$tls/key.pem")
    tls_servers="gatekeeper postfix"
  fi
  for rep in $(seq "$repeat"); do
    for w in $tls_workloads; do
      for s in $tls_servers; do
        run run --workload "$w" --sessions "$tls_sessions" --concurrency "$concurrency" --warmup "$warmup" \
          --starttls --tls-ca "$tls/cert.pem" --tls-name mx.bench.test \
          --target "127.0.0.1:$(port_of "$s")" --server "$s" --server-pid "$(pid_of "$s")" \
          --sources "$sources" --json "$results"
      done
    done
  done
fi

echo
cat "$work/machine.txt"
echo
"$lg" table "$results"
[ -n "$out" ] && echo "results: $results; logs: $work"
exit "$failed"
