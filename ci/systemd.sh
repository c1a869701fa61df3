#!/usr/bin/env bash
# The systemd unit (contrib/gatekeeper.service) passes `systemd-analyze verify`, with the binary
# installed where its ExecStart says, as an admin would: the release binary goes to
# /usr/local/bin/gatekeeper (root; CI is). Also prints the unit's offline security exposure.
# The sd_notify messages themselves are tested by impl/tests/systemd.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || bash ci/setup.sh systemd
cargo build --release -q -p gatekeeper
unit=contrib/gatekeeper.service
bin=$(sed -n 's|^ExecStart=\([^ ]*\) .*|\1|p' "$unit")
[ "$bin" = /usr/local/bin/gatekeeper ] || { echo "systemd: unexpected ExecStart binary $bin"; exit 1; }
install -m 0755 target/release/gatekeeper "$bin"
"$bin" --version
# verify prints its findings on stderr and exits non-zero on any: both must stay empty and 0.
out=$(systemd-analyze verify "$unit" 2>&1) || { echo "$out"; echo "systemd: verify failed"; exit 1; }
[ -z "$out" ] || { echo "$out"; echo "systemd: verify complained"; exit 1; }
echo "systemd: $unit verified"
systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -1 || true
