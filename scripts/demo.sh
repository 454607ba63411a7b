#!/usr/bin/env bash
# Runs the demo on a fresh machine: installs libtorch if needed, then the demo example.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo run --example demo "$@"
