#!/usr/bin/env bash
# Runs examples/ddp.rs data-parallel in two processes on this machine (Gloo, CPU), launched by
# PyTorch's torchrun: installs libtorch if needed, builds the example in release, then
# `torchrun --nproc-per-node 2 --no-python <the example's binary>`. The binary's path is the one
# cargo reports (`target/release/examples/ddp`, or under CARGO_TARGET_DIR). NPROC=N for another
# number of processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bin=$(cargo build --release --example ddp --message-format=json-render-diagnostics |
  python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ddp" and m.get("executable"): print(m["executable"])')
[ -n "$bin" ] || { echo "scripts/ddp.sh: cargo reported no ddp binary" >&2; exit 1; }
OMP_NUM_THREADS=1 exec torchrun --nproc-per-node "${NPROC:-2}" --no-python "$bin" "$@"
