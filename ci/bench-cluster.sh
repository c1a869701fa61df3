#!/usr/bin/env bash
# The cluster benchmark (issue 15, README "Cluster"): two release gatekeepers on loopback
# sharing one redis-server (Debian's, started here on a free port, no persistence), and
#   1. ban propagation: N forged local senders on node mx1 (550 + B1 ban), each address then
#      polled on mx2 until its greeting is 554 (`loadgen propagation`): p50/p90/p99/max;
#   2. the cost of sharing: the forged workload (550 + ban per session; the cluster's hot path:
#      every ban is committed, queued in the outbox, published, applied on mx2) against mx1
#      with the cluster off, then on (mx2 running and applying), round robin --repeat times,
#      in one run: sessions/s, latency, server CPU per session (`loadgen table`).
# Both nodes use benches/load/gatekeeper.toml plus a [cluster] table.
#
#   bash ci/bench-cluster.sh --repeat 3            # ~2 minutes after the release build
#   bash ci/bench-cluster.sh --smoke               # a few hundred sessions; fails only on errors
#
# Options: --bans N --sessions N --concurrency C --warmup N --repeat K --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."

bans=300 sessions=20000 concurrency=100 warmup=1000 repeat=1 out="" smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
  --smoke) smoke=1 bans=30 sessions=300 concurrency=20 warmup=50 ;;
  --bans) bans=$2; shift ;;
  --sessions) sessions=$2; shift ;;
  --concurrency) concurrency=$2; shift ;;
  --warmup) warmup=$2; shift ;;
  --repeat) repeat=$2; shift ;;
  --out) out=$2; shift ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "bench-cluster: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

bash ci/install-redis.sh >/dev/null
cargo build --release -q -p gatekeeper --bin gatekeeper
cargo build --release -q -p gatekeeper-benches --bin loadgen
gk=$PWD/target/release/gatekeeper lg=$PWD/target/release/loadgen
work=${out:-$(mktemp -d)}
mkdir -p "$work"
ulimit -n 65536 2>/dev/null || true

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000)) # below the ephemeral range (32768-): no client socket holds it
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
wait_port() { # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench-cluster: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  if [ -z "$out" ]; then rm -rf "$work"; fi
}
trap 'cleanup || true' EXIT

rport=$(free_port)
redis-server --bind 127.0.0.1 --port "$rport" --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$rport"

config() { # node: the load benchmark's configuration plus [cluster] (node "off": none)
  local f=$work/$1.toml
  cp benches/load/gatekeeper.toml "$f"
  if [ "$1" != off ]; then
    printf '\n[cluster]\nredis = "redis://127.0.0.1:%s"\nnode = "%s"\n' "$rport" "$1" >>"$f"
  fi
  echo "$f"
}

gk_start() { # name port: prints the pid
  "$gk" serve --config "$(config "$1")" --listen "127.0.0.1:$2" --state-dir "$work/state-$1-$RANDOM" \
    >"$work/$1.out" 2>"$work/$1.log" &
  echo $!
}

pa=$(free_port) pb=$(free_port)
a=$(gk_start mx1 "$pa"); pids+=("$a")
b=$(gk_start mx2 "$pb"); pids+=("$b")
wait_port "$pa"; wait_port "$pb"
sleep 1

failed=0
{
  echo "machine: $(nproc) cores, Linux $(uname -r), redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  "$lg" propagation --target "127.0.0.1:$pa" --other "127.0.0.1:$pb" -n "$bans" --source-start 8000000 || failed=1
  "$lg" propagation --target "127.0.0.1:$pb" --other "127.0.0.1:$pa" -n "$bans" --source-start 9000000 || failed=1
} | tee "$work/propagation.txt"

# The cost of sharing: mx1 alone (no [cluster]) against mx1 in the cluster (mx2 applying).
po=$(free_port)
o=$(gk_start off "$po"); pids+=("$o")
wait_port "$po"
strict=()
[ "$smoke" = 1 ] && strict=(--fail-on-errors)
for r in $(seq "$repeat"); do
  for side in off on; do
    if [ "$side" = off ]; then port=$po pid=$o; else port=$pa pid=$a; fi
    "$lg" run "${strict[@]}" --target "127.0.0.1:$port" --server "cluster-$side" --server-pid "$pid" \
      --workload forged -n "$sessions" -c "$concurrency" --warmup "$warmup" \
      --sources "$work/sources-$side" --json "$work/results.jsonl" >"$work/run-$side-$r.txt" || failed=1
  done
done
echo
"$lg" table "$work/results.jsonl" | tee "$work/table.md"
echo
echo "bans in force: mx1 $("$gk" bans list --config "$work/mx1.toml" --state-dir "$(ls -d "$work"/state-mx1-*)" 2>/dev/null | tail -1)," \
  "mx2 $("$gk" bans list --config "$work/mx2.toml" --state-dir "$(ls -d "$work"/state-mx2-*)" 2>/dev/null | tail -1)"
"$gk" cluster status --config "$work/mx1.toml" --state-dir "$(ls -d "$work"/state-mx1-*)" | tail -3 || true
exit "$failed"
