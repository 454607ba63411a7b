#!/usr/bin/env bash
# Cost of guarding in executed instructions (valgrind callgrind), which, unlike wall time on a
# shared machine, repeats exactly. Counts only inside the bench's `step` function, for STEPS
# steps of each variant, for each shape, after UNCOUNTED steps it does not count (what the first
# calls pay once: STEPGUARD_INSTR_UNCOUNTED, default 3; 0 counts from the first step, as this
# script did before 2026-12-07, and as bench binaries older than that do whatever it says); the
# stripped variant comes from a build with the `strip-release` feature. Slow (libtorch starts
# under valgrind): about 1.5 min per row.
#   scripts/bench-instructions.sh [shapes, default 8x256x64,50x64x32,2x64x1,1x32x1] [steps, default 10]
# Shapes are `layers x width x batch` (input 64, 10 classes, SGD; see benches/step.rs): the two
# bench MLPs and two RL-size steps, where the guard's fixed cost per step shows.
# STEPGUARD_BENCH_BIN / STEPGUARD_BENCH_BIN_STRIPPED: count these prebuilt bench binaries
# (e.g. an older commit's) instead of building this checkout's.
# STEPGUARD_INSTR_ROWS=guard: only the unguarded and the full-guard rows, the latter also without
# the replay of failed calls (half the time).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shapes="${1:-8x256x64,50x64x32,2x64x1,1x32x1}"; steps="${2:-10}"
bench_bin() {
  cargo bench --no-run --message-format=json --bench step "$@" 2>/dev/null |
    python -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])'
}
normal=${STEPGUARD_BENCH_BIN:-$(bench_bin)}
stripped=${STEPGUARD_BENCH_BIN_STRIPPED:-$(bench_bin --features strip-release)}
count() { # binary variant shape
  STEPGUARD_BENCH_ONLY=$2 STEPGUARD_BENCH_STEPS=$steps STEPGUARD_BENCH_SHAPES=$3 \
    STEPGUARD_BENCH_UNCOUNTED="${STEPGUARD_INSTR_UNCOUNTED:-3}" \
    valgrind --tool=callgrind --toggle-collect='step::step' --callgrind-out-file=/dev/null "$1" --bench 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
echo "| model | variant | instructions/step | overhead |"
echo "|---|---|---|---|"
for shape in ${shapes//,/ }; do
  base=$(count "$normal" 0 "$shape")
  echo "| $shape | unguarded | $((base / steps)) | - |"
  variants=("2 stepguard::clip_grad_norm(5) only" "3 #[guarded_step(max_norm = 5)], all checks" "4 #[guarded_step(max_norm = 0.01)], always clipping"
            "6 + forward check (checks = \"all\")")
  [ "${STEPGUARD_INSTR_ROWS:-}" = guard ] && variants=("3 #[guarded_step(max_norm = 5)], all checks"
    "9 same, checks(diagnose = \"off\") (no replay)")
  for v in "${variants[@]}"; do
    n=$(count "$normal" "${v%% *}" "$shape")
    echo "| $shape | ${v#* } | $((n / steps)) | $(python -c "print(f'{($n / $base - 1) * 100:+.2f} %')") |"
  done
  [ "${STEPGUARD_INSTR_ROWS:-}" = guard ] && continue
  n=$(count "$stripped" 3 "$shape")
  echo "| $shape | same, strip-release build | $((n / steps)) | $(python -c "print(f'{($n / $base - 1) * 100:+.2f} %')") |"
done
