#!/usr/bin/env bash
# Outside robustness suite (issue 12, item 7): builds the release binary, starts it on a random
# loopback port with a temporary state dir and a configuration derived from
# examples/gatekeeper.toml (short timeouts so that slow clients end within the run), runs
# ci/torture.py against it, and stops it. Only 127.0.0.0/8 is used; about 1.5 minutes
# (--bench about 2 minutes and 2 GiB of server RSS on today's server).
#   bash ci/torture.sh [CASE...]   the suite (or only the cases whose names contain CASE)
#   bash ci/torture.sh --bench     the issue's benchmark figures (10,000 idle connections,
#                                  3,000 banned ones, 100 concurrent 20 MiB messages)
# KEEP=1 keeps the temporary directory (configuration, state, server log). Needs Python 3.11+
# (tomllib); raises its own RLIMIT_NOFILE but not the server's (issue 12 wants the server to).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=suite
if [ "${1:-}" = "--bench" ]; then mode=bench; shift; fi
cargo build --release -q -p gatekeeper
bin=$PWD/target/release/gatekeeper
work=$(mktemp -d /tmp/gk-torture.XXXXXX)
log="$work/gatekeeper.log"
config="$work/gatekeeper.toml"
if [ "$mode" = bench ]; then
  # Room for 10,000 idle sessions, and timeouts long enough to hold them while measuring.
  max_sessions=12000 command_timeout=120s session_max=10m
else
  # max_sessions between the idle case (2,000) and the banned flood (3,000), so that the
  # flood shows whether refused connections count against the cap.
  max_sessions=2500 command_timeout=10s session_max=30s
fi
sed -e "s|^state_dir = .*|state_dir = \"$work/state\"|" \
    -e "s|^max_sessions = .*|max_sessions = $max_sessions|" \
    -e "s|^command_timeout = .*|command_timeout = \"$command_timeout\"|" \
    -e "s|^session_max = .*|session_max = \"$session_max\"|" \
    examples/gatekeeper.toml >"$config"
for key in state_dir max_sessions command_timeout session_max; do
  grep -q "^$key = " "$config" || { echo "torture: examples/gatekeeper.toml has no '$key = ' line"; exit 1; }
done
"$bin" check-config --config "$config" >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" serve --config "$config" --listen "127.0.0.1:$port" --state-dir "$work/state" 2>"$log" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "torture: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
args=(--port "$port" --pid "$pid" --config "$config" --state-dir "$work/state" --binary "$bin" --log "$log")
[ "$mode" = bench ] && args+=(--bench)
# The suite's last line is "N passed, M failed"; its exit status is this script's.
timeout 900 python3 ci/torture.py "${args[@]}" "$@"
