#!/usr/bin/env bash
# Mutation testing of the rules (issue 16; README "Mutation testing"): cargo-mutants changes
# the code of the policy (B/E/C rules), the session (the SMTP state machine that applies them)
# and the kernel gate model one mutant at a time, and the gatekeeper's unit tests
# (`cargo test -p gatekeeper --lib`) must fail for each. Not called from ci/test.sh: at one
# mutant per ~20 s (an incremental build of the library's test binary, then 1-3 s of tests)
# the ~770 mutants of these files take about five hours on one core.
#
#   bash ci/mutants.sh                          # every file below, whole
#   bash ci/mutants.sh impl/src/policy.rs       # one file
#   MUTANTS_ARGS="--shard 0/2 --sharding round-robin" bash ci/mutants.sh impl/src/session.rs
#
# Needs `cargo install cargo-mutants --locked` (measured with 27.1.0). Mutates the tree in place
# (the warm target/ makes each build incremental): run it on a clean checkout and do not edit
# while it runs; cargo-mutants restores each file after its mutant, also on Ctrl-C.
# Results go to $MUTANTS_OUT (default target/mutants/NAME/mutants.out: caught.txt, missed.txt,
# timeout.txt, unviable.txt, outcomes.json).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || { echo "cargo-mutants missing: cargo install cargo-mutants --locked" >&2; exit 2; }
out=${MUTANTS_OUT:-target/mutants}
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    files=(impl/src/policy.rs impl/src/session.rs impl/src/gate/ruleset.rs impl/src/gate/table.rs
        impl/src/gate/xt_recent.rs impl/src/gate/nft.rs)
fi
# Text only (names, Display, metric labels, lengths for gauges): a change there changes no
# decision, and the tests that pin the log and metric formats live outside the library.
exclude='as_str|Display for|Verification::kind|Verification::evidence|::len |::is_empty |user_count|Directory::domains'
status=0
for f in "${files[@]}"; do
    name=$(basename "$f" .rs)
    echo "== cargo mutants: $f"
    mkdir -p "$out/$name" # cargo-mutants creates mutants.out inside, not the folders above it
    # shellcheck disable=SC2086 # MUTANTS_ARGS is a list of options
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} nice -n 10 cargo mutants -p gatekeeper --in-place --baseline=skip \
        --test-tool cargo --file "$f" --exclude-re "$exclude" --timeout 120 --build-timeout 600 \
        --output "$out/$name" ${MUTANTS_ARGS:-} -- --lib || status=$?
done
exit $status
