#!/usr/bin/env bash
# Device-side checks on a CUDA machine, in two halves:
#   scripts/gpu-check.sh prepare   here (Rust + libtorch): release test and bench binaries -> .gpu/
#   scripts/gpu-check.sh run       on the GPU machine (PyTorch 2.11.0+cu130, no Rust), from the
#                                  repository root; writes the log to $OUT (or .gpu/out);
#                                  GPU_CHECK_TESTS_ONLY=1 skips the benchmarks; the data-parallel
#                                  tests and bench run NCCL (a world of one through c10d on one GPU)
# With the device tool: prepare, then run `scripts/gpu-check.sh run` with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  source scripts/env.sh
  rm -rf .gpu && mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cargo test --release --no-run --message-format=json \
      --test clip_reference --test runtime_core --test guarded_step --test strip_release \
      --test tracing_events --test trust --test corpus --test numbers --test op_counts \
      --test safe_ops --test fused_optim --test deferred --test loss_scale --test loss_scale_trust --test spike --test adaptive_clip \
      --test replay --test checkpoint_run --test checkpoint_store --test outcome \
      --test dist 2>/dev/null |
    python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do cp "$exe" ".gpu/test-$name"; done
  # The runtime's own unit tests (the ATen observer's, the shim's) as `test-stepguard`.
  cargo test --release --no-run --message-format=json -p stepguard --lib 2>/dev/null |
    python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' |
    while read -r exe; do cp "$exe" .gpu/test-stepguard; done
  git rev-parse --short=12 HEAD > .gpu/commit
  for b in step optim ddp; do
    cargo bench --no-run --message-format=json --bench "$b" 2>/dev/null |
      python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | while read -r exe; do cp "$exe" ".gpu/bench-$b"; done
  done
  strip .gpu/test-* .gpu/bench-*
  for b in .gpu/test-* .gpu/bench-*; do
    [ "$(ldd "$b" | grep -c libtorch_cuda)" -gt 0 ] || { echo "$b does not link libtorch_cuda" >&2; exit 1; }
  done
  du -sh .gpu
  ;;
run)
  out="${OUT:-.gpu/out}"; mkdir -p "$out"
  export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib"
  {
    nvidia-smi -L
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
    echo "== tests on cuda:0 (STEPGUARD_TEST_DEVICE=cuda) =="
    for t in .gpu/test-*; do
      STEPGUARD_TEST_DEVICE=cuda "$t" --test-threads=1 2>&1 | grep -E "^test |test result|panicked|assert" || echo "FAILED $t"
    done
    [ -n "${GPU_CHECK_TESTS_ONLY:-}" ] && exit 0
    echo "== bench: stepguard vs PyTorch, cuda =="
    python3 scripts/bench_vs_torch.py --device cuda --bench-bin .gpu/bench-step --steps 210 \
        --shapes 8x256x64,50x64x32,24x1024x256
    echo "== stepguard bench table, cuda =="
    STEPGUARD_BENCH_DEVICE=cuda STEPGUARD_BENCH_STEPS=210 STEPGUARD_BENCH_SHAPES=8x256x64,50x64x32,24x1024x256 \
        .gpu/bench-step --bench
    echo "== fused optimizers, deferred verdict, loss scaling: cuda =="
    STEPGUARD_BENCH_DEVICE=cuda STEPGUARD_BENCH_STEPS=210 .gpu/bench-optim --bench
    echo "== data-parallel: NCCL, one process per GPU (one GPU: a world of one through NCCL) =="
    STEPGUARD_COMMIT="$(cat .gpu/commit)" python3 scripts/bench_ddp.py --bench .gpu/bench-ddp \
        --device cuda --nproc "$(nvidia-smi -L | wc -l)" --launches 2 --rounds 3 --steps 100 \
        --shapes 8x256x64,50x64x32,24x1024x256 --out "$out/ddp-nccl.md" >/dev/null
    cat "$out/ddp-nccl.md"
  } 2>&1 | tee "$out/gpu-check.log"
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
