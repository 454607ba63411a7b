#!/usr/bin/env bash
# The ATen path's cost on CPU (the fast path off: what every bf16/f16, CUDA or non-contiguous
# set of tensors takes), in executed instructions (callgrind), for this checkout and for an
# older commit built side by side, in one run: bf16 MLPs with 102 and 402 tensors.
#   scripts/bench-aten-path.sh BEFORE_COMMIT [shapes, default 50x64x32,200x32x32] [steps, default 5]
# The older commit's bench gets `benches/bf16-option.patch` (the STEPGUARD_BENCH_KIND option, written
# for 0bda17d) when it lacks it; it is built in target/before from a worktree in .bench-before.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
before="${1:?usage: scripts/bench-aten-path.sh BEFORE_COMMIT [shapes] [steps]}"
shapes="${2:-50x64x32,200x32x32}"; steps="${3:-5}"
root=$PWD
rm -rf .bench-before; git worktree prune
git worktree add --detach .bench-before "$before" >/dev/null 2>&1
grep -q STEPGUARD_BENCH_KIND .bench-before/benches/step.rs || (cd .bench-before && git apply "$root/benches/bf16-option.patch")
# Seeded with this checkout's release build (under CARGO_TARGET_DIR when set), to build less.
[ -d target/before/release ] || { mkdir -p target/before; cp -a "${CARGO_TARGET_DIR:-target}/release" target/before/ 2>/dev/null || true; }
bench_bin() {
  cargo bench --no-run --message-format=json --bench step "$@" 2>/dev/null |
    python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])'
}
now=$(bench_bin)
old=$(cd .bench-before && CARGO_TARGET_DIR="$root/target/before" bench_bin)
count() { # binary variant shape
  STEPGUARD_BENCH_KIND=bf16 STEPGUARD_BENCH_ONLY=$2 STEPGUARD_BENCH_STEPS=$steps STEPGUARD_BENCH_SHAPES=$3 \
    valgrind --tool=callgrind --toggle-collect='step::step' --callgrind-out-file=/dev/null "$1" --bench 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
echo "before: $(git rev-parse --short "$before"), after: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- runtime macros || echo ' + uncommitted changes')"
echo
echo "| bf16 model | tensors | variant | before | after | after/before |"
echo "|---|---|---|---|---|---|"
for shape in ${shapes//,/ }; do
  layers=${shape%%x*}
  for v in "0 unguarded" "5 #[guarded_step(max_norm = 5)], ATen path (fast path off)"; do
    a=$(count "$old" "${v%% *}" "$shape"); b=$(count "$now" "${v%% *}" "$shape")
    echo "| $shape | $((2 * layers + 2)) | ${v#* } | $((a / steps)) | $((b / steps)) | $(python -c "print(f'{$b / $a:.4f}')") |"
  done
done
git worktree remove --force .bench-before
