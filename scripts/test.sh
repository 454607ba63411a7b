#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs libtorch if needed, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc
# Checks stripped from a build without debug assertions (the `strip-release` feature).
cargo test --profile strip --features strip-release --test strip_release
