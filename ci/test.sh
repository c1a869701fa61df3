#!/usr/bin/env bash
# The test command (README): set-up, lint, the whole workspace's tests, the release binary
# driven by swaks, and the benches in smoke mode. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-virus.sh          # swaks, clamav-daemon (the tests start their own clamd)
bash ci/install-redis.sh          # redis-server (the cluster tests start their own)
# Tests that drive installed tools (swaks, clamd, redis-server, nft) fail instead of skipping here.
export GATEKEEPER_REQUIRE_TOOLS=1
echo "== fmt"; cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"; cargo test --workspace
echo "== scenario suite (release)"; cargo run --release -q -p gatekeeper-sim -- run scenarios/
echo "== scenario suite on seeds 1-2 (expectations hold for any seed)"; target/release/gatekeeper-sim sweep scenarios/ --seeds 1..2
echo "== systemd unit: systemd-analyze verify"; bash ci/systemd.sh
echo "== swaks against the release binary"; bash ci/swaks.sh
echo "== Postfix with the gatekeeper as its policy service and its milter"; bash ci/postfix-integration.sh
echo "== log replay of a real Postfix's log (issue 17)"; SIM_BIN=target/release/gatekeeper-sim bash ci/replay-postfix.sh
echo "== outside robustness suite (abuse, memory, descriptors) against the release binary"; bash ci/torture.sh
echo "== real kernel: xt_recent and nftables in network namespaces"; bash ci/kernel.sh
echo "== criterion smoke"; cargo bench -p gatekeeper-benches -- --test
echo "== load bench smoke"; bash ci/bench-peers.sh --smoke
echo "== cluster bench smoke (two nodes, one redis-server)"; bash ci/bench-cluster.sh --smoke
echo "ci: all green"
