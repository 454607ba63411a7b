#!/usr/bin/env bash
# Builds and runs the test suite against tch 0.26 with PyTorch 2.13.0 from PyPI, in its own
# cache (venv and target folder), on a copy of the tree whose lock is moved to tch 0.26.
# The repository's own lock, CI and README commands stay on tch 0.24 / PyTorch 2.11.0.
set -euo pipefail
cd "$(dirname "$0")/.."
export STEPGUARD_TORCH_VERSION=2.13.0
source scripts/env.sh
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 -I{} cp --parents {} "$work"
cd "$work"
cargo update -p tch --precise 0.26.0
cargo update -p torch-sys --precise 0.26.0
grep -A1 '^name = "tch"' Cargo.lock
export CARGO_TARGET_DIR="$STEPGUARD_CACHE/target-tch-0.26"
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc
