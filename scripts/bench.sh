#!/usr/bin/env bash
# Benchmarks one training step unguarded and guarded (release build, 1 thread).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo bench --bench step "$@"
