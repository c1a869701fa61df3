#!/usr/bin/env bash
# Real-kernel tests of rules G1/G2 and the ban backends, as root, in two network namespaces
# joined by a veth pair (server 10.77.0.1 / fd77::1, client 10.77.0.2.. / fd77::2..). Nothing
# outside the namespaces is touched; they are deleted on exit.
#
#  (a) differential: the same SYN sequences (window 2 s) go through the real xt_recent rules and
#      through the model (`gatekeeper model-replay`), accept/drop compared SYN by SYN; then the
#      same for the nft ruleset. Exact jiffies per SYN come from the trick of docs/kernel.md
#      §4.4: a raw-table `ALLSYN --set` stamps every SYN, a security-table `ACCSYN --set` every
#      accepted one.
#  (b) end to end, per backend: the release gatekeeper serves in the server namespace; a client
#      triggers a B1 ban with swaks; its next SYN is dropped by the kernel (connect times out);
#      `gatekeeper bans remove` lets it in again.
#  (c) restart, per backend: kill -9 the gatekeeper, flush the kernel ban table, start it again:
#      the ban is back (nft: with its remaining time).
# Where the kernel or the tools lack something, the test prints SKIP with the reason.
# (No `cmd | grep -q` here: with pipefail, grep's early exit can SIGPIPE the writer.)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
pass=0 fail=0 skip=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
skipped() { skip=$((skip + 1)); echo "SKIP $*"; }
finish() {
  echo "     ran $((SECONDS - start)) s"
  echo "kernel: $pass passed, $fail failed, $skip skipped"
  [ "$fail" -eq 0 ]
  exit
}

if [ "$(id -u)" != 0 ]; then
  skipped "all kernel tests: not root"
  finish
fi
bash ci/setup.sh nftables iptables swaks python3 libio-socket-inet6-perl
cargo build --release -q -p gatekeeper
gk=$PWD/target/release/gatekeeper

work=$(mktemp -d)
S=gks$$ C=gkc$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! ip netns add "$S" 2>"$work/err" || ! ip netns add "$C" 2>>"$work/err"; then
  skipped "all kernel tests: cannot create network namespaces: $(head -1 "$work/err")"
  finish
fi
s() { ip netns exec "$S" "$@"; }
c() { ip netns exec "$C" "$@"; }
ip link add gkva$$ netns "$S" type veth peer name gkvb$$ netns "$C"
s ip link set lo up
c ip link set lo up
s ip addr add 10.77.0.1/24 dev gkva$$
s ip addr add fd77::1/64 dev gkva$$ nodad
s ip link set gkva$$ up
for i in $(seq 2 40); do c ip addr add "10.77.0.$i/24" dev gkvb$$; done
for i in 2 11 12; do c ip addr add "fd77::$i/64" dev gkvb$$ nodad; done
c ip addr add fd77::1:0:0:13/64 dev gkvb$$ nodad
c ip link set gkvb$$ up

cat >"$work/helper.py" <<'PY'
import random, socket, subprocess, sys, time

def send(dst4, dst6, port):
    """stdin: 'OFFSET SRC' lines; sends one SYN per line at OFFSET s (aborted after 0.3 s, before
    the first retransmission)."""
    events = sorted((float(t), src) for t, src in (l.split() for l in sys.stdin if l.strip()))
    t0 = time.monotonic() + 0.2
    live = []
    for t, src in events:
        while time.monotonic() < t0 + t:
            time.sleep(0.001)
        fam = socket.AF_INET6 if ":" in src else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.bind((src, 0))
        s.setblocking(False)
        s.connect_ex((dst6 if fam == socket.AF_INET6 else dst4, port))
        live.append((time.monotonic(), s))
        now = time.monotonic()
        for ts, old in [x for x in live if now - x[0] > 0.3]:
            old.close()
        live = [x for x in live if now - x[0] <= 0.3]
    time.sleep(0.35)

def schedule(seed, srcs4, srcs6):
    """Prints the SYN schedule: hand-made edge cases, then random sequences from `seed`."""
    rnd = random.Random(seed)
    out = []
    edge = [0, 0.5, 1.0, 1.5, 1.95, 2.05, 2.3, 4.0, 4.1, 6.2, 6.25, 8.3]
    out += [(t, srcs4[0]) for t in edge]
    out += [(t, srcs4[1]) for t in (0, 2.0, 4.0, 6.0, 8.0)]
    for src in srcs4[2:] + srcs6:
        t = rnd.uniform(0, 0.5)
        while t < 9.0 and len([1 for _, s in out if s == src]) < 28:
            out.append((round(t, 3), src))
            t += rnd.choice([rnd.uniform(0.05, 0.6), rnd.uniform(0.6, 2.4)])
    # The v6 sources share one /64, so they share one model entry. Two of their SYNs in the same
    # jiffy would leave the order the kernel saw them in unknowable from the stamps (and a CPU
    # migration between two sends can reorder them on the veth): keep them 30 ms apart.
    out.sort()
    last6 = None
    for i, (t, src) in enumerate(out):
        if ":" in src:
            if last6 is not None and t < last6 + 0.03:
                t = round(last6 + 0.03, 3)
                out[i] = (t, src)
            last6 = t
    for t, src in sorted(out):
        print(t, src)

def stamps(path):
    """/proc/net/xt_recent/NAME -> {addr: [jiffies]}."""
    out = {}
    for line in open(path):
        if not line.startswith("src="):
            continue
        addr = line.split()[0][4:]
        js = [int(x) for x in line.split("oldest_pkt:")[1].split(None, 1)[1].replace(",", " ").split()]
        out[socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr))
            if ":" in addr else addr] = sorted(js)
    return out

def compare(gk, kind, window, hz, allsyn, accsyn):
    """Feeds every SYN's jiffies to the model, compares with what the kernel accepted."""
    syns = sorted((j, a) for a, js in stamps(allsyn).items() for j in js)
    acc = stamps(accsyn)
    if not syns:
        print("no SYN recorded"); return 1
    base = syns[0][0] - 1_000_000
    text = "".join(f"{j - base} {a}\n" for j, a in syns)
    res = subprocess.run([gk, "model-replay", "--kind", kind, "--window", window, "--hz", str(hz)],
                         input=text, capture_output=True, text=True, check=True).stdout.split("\n")
    bad = 0
    first = {}
    for (j, a), line in zip(syns, res):
        model = line.split()[2]
        pool = acc.get(a, [])
        # The security table may stamp one jiffy later than the raw table.
        hit = next((x for x in pool if x in (j, j + 1)), None)
        if hit is not None:
            pool.remove(hit)
        kernel = "accept" if hit is not None else "drop"
        same = (model == "accept") == (kernel == "accept")
        first.setdefault(a, j)
        if not same:
            bad += 1
            print(f"   mismatch {a} +{j - first[a]} jiffies: kernel {kernel}, model {model}")
    print(f"   {len(syns)} SYNs from {len(set(a for _, a in syns))} sources, "
          f"{sum(1 for l in res if l.endswith('accept'))} accepted by the model, {bad} mismatches")
    return 1 if bad else 0

def probe(src, dst, port, timeout):
    """One connection attempt: prints timeout, refused, or the server's first line."""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((src, 0))
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
        print("connected", s.recv(200).decode(errors="replace").strip())
    except socket.timeout:
        print("timeout")
    except ConnectionRefusedError:
        print("refused")

cmd = sys.argv[1]
if cmd == "send":
    send(sys.argv[2], sys.argv[3], int(sys.argv[4]))
elif cmd == "schedule":
    schedule(int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(","))
elif cmd == "compare":
    sys.exit(compare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7]))
elif cmd == "probe":
    probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
PY
py() { python3 "$work/helper.py" "$@"; }

# ---------------------------------------------------------------------------------------------
# (a) differential
# ---------------------------------------------------------------------------------------------
cat >"$work/diff.toml" <<'TOML'
[server]
listen = "10.77.0.1:25"
[gate]
window = "2s"
ban_time = "1h"
TOML
xt_ok=1
s iptables -t raw -A PREROUTING -p tcp --dport 25 --syn -m recent --name ALLSYN --set
s iptables -t security -A INPUT -p tcp --dport 25 --syn -m recent --name ACCSYN --set
s ip6tables -t raw -A PREROUTING -p tcp --dport 25 --syn -m recent --name ALLSYN6 --set
s ip6tables -t security -A INPUT -p tcp --dport 25 --syn -m recent --name ACCSYN6 --set
if ! s test -e /proc/net/xt_recent/ALLSYN; then
  xt_ok=0
  skipped "differential tests: no /proc/net/xt_recent (xt_recent missing from this kernel)"
fi
hz=250
if [ "$xt_ok" = 1 ]; then
  # HZ from two proc writes one second apart.
  s sh -c 'echo +10.99.0.1 >/proc/net/xt_recent/ALLSYN'
  sleep 1
  s sh -c 'echo +10.99.0.1 >/proc/net/xt_recent/ALLSYN'
  hz=$(s cat /proc/net/xt_recent/ALLSYN | python3 -c '
import sys
for l in sys.stdin:
    if l.startswith("src=10.99.0.1 "):
        js = sorted(int(x) for x in l.split("oldest_pkt:")[1].split(None, 1)[1].replace(",", " ").split())
        d = js[-1] - js[0]
        print(min((100, 250, 300, 1000), key=lambda h: abs(h - d)))')
  s sh -c 'echo / >/proc/net/xt_recent/ALLSYN'
  echo "     kernel HZ = $hz (measured)"
fi
seed=${GK_KERNEL_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "     differential seed $seed (GK_KERNEL_SEED=$seed reproduces the schedule)"

differential() { # backend label, model kind, sources4, sources6
  local label=$1 kind=$2 src4=$3 src6=$4
  s sh -c 'for t in ALLSYN ACCSYN ALLSYN6 ACCSYN6; do echo / >/proc/net/xt_recent/$t; done'
  py schedule "$seed" "$src4" "$src6" >"$work/sched-$label"
  c python3 "$work/helper.py" send 10.77.0.1 fd77::1 25 <"$work/sched-$label"
  for fam in "" 6; do
    s cat /proc/net/xt_recent/ALLSYN$fam >"$work/all$fam-$label"
    s cat /proc/net/xt_recent/ACCSYN$fam >"$work/acc$fam-$label"
  done
  cat "$work/all-$label" "$work/all6-$label" >"$work/all-both-$label"
  cat "$work/acc-$label" "$work/acc6-$label" >"$work/acc-both-$label"
  if py compare "$gk" "$kind" 2s "$hz" "$work/all-both-$label" "$work/acc-both-$label"; then
    ok "(a) differential $label: the model decides every SYN as the kernel did"
  else
    bad "(a) differential $label: see the mismatches above (seed $seed)"
  fi
}

if [ "$xt_ok" = 1 ]; then
  out=$(s "$gk" firewall apply --backend xt_recent --config "$work/diff.toml" 2>&1) || true
  again=$(s "$gk" firewall apply --backend xt_recent --config "$work/diff.toml" 2>&1) || true
  if s test -e /proc/net/xt_recent/SMTPRATE && [ "$(grep -c '^present' <<<"$again")" = 6 ]; then
    ok "firewall apply --backend xt_recent installs the 6 rules once (a second apply finds them present)"
    differential xt_recent xt_recent 10.77.0.11,10.77.0.12,10.77.0.13,10.77.0.14,10.77.0.15 fd77::11,fd77::12,fd77::1:0:0:13
  else
    bad "firewall apply --backend xt_recent: $out $again"
  fi
  s iptables -F INPUT
  s ip6tables -F INPUT
fi

nft_ok=1
if ! out=$(s "$gk" firewall apply --backend nftables --config "$work/diff.toml" 2>&1); then
  nft_ok=0
  skipped "nftables tests: the ruleset does not load here: $out"
fi
if [ "$nft_ok" = 1 ]; then
  s "$gk" firewall apply --backend nftables --config "$work/diff.toml" >/dev/null
  if [ "$(s nft list chain inet gatekeeper input | grep -c 'dport 25')" = 7 ]; then
    ok "firewall apply --backend nftables installs table inet gatekeeper (idempotent: 7 rules after two loads)"
  else
    bad "firewall apply --backend nftables: $(s nft list ruleset)"
  fi
  if [ "$xt_ok" = 1 ]; then
    differential nft nft 10.77.0.16,10.77.0.17,10.77.0.18,10.77.0.19,10.77.0.20 fd77::11,fd77::12,fd77::1:0:0:13
  fi
  s nft delete table inet gatekeeper
fi

# ---------------------------------------------------------------------------------------------
# (b) end to end and (c) restart, per backend
# ---------------------------------------------------------------------------------------------
e2e() { # backend (xt_recent|nftables), gate kind, client address for (b), for (c)
  local backend=$1 kind=$2 a=$3 b=$4
  local cfg=$work/e2e-$backend.toml state=$work/state-$backend log=$work/gk-$backend.log
  cat >"$cfg" <<TOML
[server]
listen = "[::]:25"
hostname = "mx.example.test"
state_dir = "$state"
shutdown_grace = "1s"
[domains]
local = ["example.test"]
users = ["alice@example.test"]
[gate]
window = "1s"
ban_time = "1h"
[gate.kind]
backend = "$kind"
[bans]
backend = "$backend"
sync_interval = "1s"
TOML
  s "$gk" firewall apply --config "$cfg" >/dev/null
  serve() {
    ip netns exec "$S" "$gk" serve --config "$cfg" >>"$log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do
      s ss -ltn | grep ':25 ' >/dev/null && return 0
      sleep 0.05
    done
    echo "gatekeeper did not start:"; tail -5 "$log"
  }
  in_kernel() { # address (IPv4, or fd77:: for the IPv6 /64) -> 0 if in the kernel ban table
    if [ "$backend" = xt_recent ] && [ "$1" = fd77:: ]; then
      s grep -q "^src=fd77:0000:0000:0000:0000:0000:0000:0000 " /proc/net/xt_recent/SMTPBAN6
    elif [ "$backend" = xt_recent ]; then
      s grep -q "^src=$1 " /proc/net/xt_recent/SMTPBAN
    elif [ "$1" = fd77:: ]; then
      s nft list set inet gatekeeper ban6 | grep "fd77::/64 " >/dev/null
    else
      s nft list set inet gatekeeper ban4 | grep "$1 " >/dev/null
    fi
  }
  serve
  out=$(c swaks --server 10.77.0.1:25 --local-interface "$a" --helo client.test --timeout 2 \
    --from nobody@example.test --to alice@example.test --quit-after RCPT 2>&1 || true)
  if grep -qE '<\*\* +550 5\.7\.1' <<<"$out" && in_kernel "$a"; then
    ok "(b) $backend: forged local sender gets 550 and its address is in the kernel ban table"
  else
    bad "(b) $backend: B1 ban not in the kernel: $(grep -E '^ *<' <<<"$out" | tail -3)"; tail -4 "$log"
  fi
  sleep 1.1 # past the G1 window: only the ban can drop it now
  got=$(c python3 "$work/helper.py" probe "$a" 10.77.0.1 25 3)
  if [ "$got" = timeout ]; then
    ok "(b) $backend: the banned client's next SYN is dropped by the kernel (connect timed out)"
  else
    bad "(b) $backend: banned client's connect: $got"
  fi
  s "$gk" bans remove "$a" --config "$cfg" >>"$log" 2>&1
  sleep 2 # the server picks the removal up within sync_interval
  got=$(c python3 "$work/helper.py" probe "$a" 10.77.0.1 25 3)
  if [[ $got == "connected 220 "* ]]; then
    ok "(b) $backend: after \`gatekeeper bans remove\` it connects and gets 220"
  else
    bad "(b) $backend: after bans remove: $got"
  fi
  # IPv6: a B1 client's whole /64 is banned (pre-masked proc write / interval element).
  out=$(c swaks --server fd77::1 --port 25 --local-interface fd77::1:0:0:13 --helo client.test --timeout 2 \
    --from nobody@example.test --to alice@example.test --quit-after RCPT 2>&1 || true)
  if grep -qE '<\*\* +550 5\.7\.1' <<<"$out" && in_kernel fd77::; then
    ok "(b) $backend: an IPv6 B1 client's /64 (fd77::/64) is in the kernel ban table"
  else
    bad "(b) $backend: IPv6 B1 ban not in the kernel: $(grep -E '^ *<' <<<"$out" | tail -3)"; tail -4 "$log"
  fi
  sleep 1.1
  got=$(c python3 "$work/helper.py" probe fd77::12 fd77::1 25 3)
  [ "$got" = timeout ] && ok "(b) $backend: another address of that /64 is dropped too" \
    || bad "(b) $backend: other address of the banned /64: $got"
  s "$gk" bans remove fd77::12 --config "$cfg" >>"$log" 2>&1
  sleep 2
  got=$(c python3 "$work/helper.py" probe fd77::12 fd77::1 25 3)
  [[ $got == "connected 220 "* ]] && ok "(b) $backend: \`bans remove fd77::12\` lifts the /64" \
    || bad "(b) $backend: after removing the /64: $got"
  # (c) restart
  c swaks --server 10.77.0.1:25 --local-interface "$b" --helo client.test --timeout 2 \
    --from nobody@example.test --to alice@example.test --quit-after RCPT >/dev/null 2>&1 || true
  in_kernel "$b" || { bad "(c) $backend: $b was not banned"; tail -4 "$log"; }
  kill -9 "$pid"
  wait "$pid" 2>/dev/null || true
  if [ "$backend" = xt_recent ]; then
    s sh -c 'echo / >/proc/net/xt_recent/SMTPBAN'
  else
    s nft flush set inet gatekeeper ban4
  fi
  sleep 1.1
  got=$(c python3 "$work/helper.py" probe "$b" 10.77.0.1 25 3)
  [ "$got" = refused ] || bad "(c) $backend: with the table flushed and no server, expected refused, got $got"
  serve
  for _ in $(seq 40); do in_kernel "$b" && break; sleep 0.05; done
  if in_kernel "$b"; then
    if [ "$backend" = nftables ]; then
      el=$(s nft list set inet gatekeeper ban4 | grep -o "$b timeout [^,}]*")
      echo "     $el"
      # Re-applied with its remaining time, not a fresh hour.
      [[ $el == *"timeout 1h expires 59m"* ]] && ok "(c) nftables: the element keeps its remaining time (expires < timeout)" \
        || bad "(c) nftables: element not restored with its remaining time: $el"
    fi
    ok "(c) $backend: after kill -9 and a flushed table, the restarted gatekeeper re-applied the ban"
  else
    bad "(c) $backend: ban of $b not back after restart: $(tail -3 "$log")"
  fi
  sleep 1.1
  got=$(c python3 "$work/helper.py" probe "$b" 10.77.0.1 25 3)
  [ "$got" = timeout ] && ok "(c) $backend: and the kernel drops it again" || bad "(c) $backend: after restart: $got"
  listed=$(s "$gk" bans list --config "$cfg" 2>>"$log")
  grep -q "^$b .*B1 .*MAIL FROM:<nobody@example.test>" <<<"$listed" \
    && ok "(c) $backend: \`gatekeeper bans list\` shows it with reason B1 and its evidence" \
    || bad "(c) $backend: bans list: $listed"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  if grep -q 'panicked' "$log"; then bad "(b/c) $backend: the gatekeeper panicked: $(grep panicked "$log")"; fi
}

if ! command -v swaks >/dev/null; then
  skipped "end-to-end tests: swaks is not installed"
else
  if [ "$xt_ok" = 1 ]; then e2e xt_recent xt_recent 10.77.0.31 10.77.0.32; fi
  if [ "$nft_ok" = 1 ]; then e2e nftables nft 10.77.0.33 10.77.0.34; fi
fi
finish
