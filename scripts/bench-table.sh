#!/usr/bin/env bash
# The CPU cost tables in one run: stepguard's benches (benches/step.rs, benches/optim.rs,
# release build) and the PyTorch reference (benches/torch_reference.py) in interleaved rounds,
# one process at a time, one thread each. Writes benches/results/<date>-<cpu|gpu>-<commit>.md
# (tables with the spread of the rounds, then the raw per-round output).
#   scripts/bench-table.sh            # full run (20 rounds of 40 steps: about 10 minutes)
#   scripts/bench-table.sh --quick    # smoke run (a few minutes; not for figures)
# Options: --rounds R --steps S --warmup W --shapes LxWxB,... --device cpu|cuda --out FILE
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python scripts/bench_table.py "$@"
