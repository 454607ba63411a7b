#!/usr/bin/env bash
# Data-parallel cost on the CPU, side by side in one run: PyTorch DDP (Gloo; benches/torch_ddp.py)
# and stepguard's data-parallel step unguarded, guarded, and guarded with the ranks' consensus
# (benches/ddp.rs), each launched by torchrun (2 processes, 1 thread each) in alternating turns.
# Writes benches/results/<date>-cpu-ddp-<commit>.md (table, spread, raw output).
#   scripts/bench-ddp.sh [--launches L] [--rounds R] [--steps S] [--shapes LxWxB,...] [--nproc N]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bench=$(cargo bench --no-run --message-format=json --bench ddp 2>/dev/null |
  python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])')
exec python scripts/bench_ddp.py --bench "$bench" "$@"
