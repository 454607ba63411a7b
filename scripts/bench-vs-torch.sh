#!/usr/bin/env bash
# Side-by-side cost of guarding: PyTorch's reference step, then stepguard's, same shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python scripts/bench_vs_torch.py "$@"
