#!/usr/bin/env bash
# Runs examples/ddp.rs data-parallel in two processes on this machine (Gloo, CPU), launched by
# PyTorch's torchrun: installs libtorch if needed, builds the example in release, then
# `torchrun --nproc-per-node 2 --no-python target/release/examples/ddp`. NPROC=N for another
# number of processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --example ddp
OMP_NUM_THREADS=1 exec torchrun --nproc-per-node "${NPROC:-2}" --no-python target/release/examples/ddp "$@"
