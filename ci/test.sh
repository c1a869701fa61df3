#!/usr/bin/env bash
# The test command (README): set-up, lint, the whole workspace's tests, the release binary
# driven by swaks, and the benches in smoke mode. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh swaks
echo "== fmt"; cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"; cargo test --workspace
echo "== swaks against the release binary"; bash ci/swaks.sh
echo "== bench smoke"; cargo bench -p gatekeeper-benches -- --test
echo "ci: all green"
