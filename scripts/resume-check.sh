#!/usr/bin/env bash
# Kills a training run with SIGKILL at random moments (some during a save), resumes it each
# time, and checks that it ends bitwise equal to the same run uninterrupted: the parameters,
# the optimizer's moments, the guard's state and counters, the random generators.
#   scripts/resume-check.sh [kills per variant, default 5] [steps, default 90]
# Runs `examples/resume.rs` in its two variants (SGD with momentum on f32; AdamW on an f16 model
# with dynamic loss scaling; dropout, spike statistics and skipped NaN batches in both; the SGD
# run also rolls back a NaN update every 23 steps, from a snapshot the checkpoints keep). Ends
# with one line: `bitwise equal after N kills`, or what differs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
want=${1:-5}; steps=${2:-90}
cargo build --quiet --example resume
bin=${CARGO_TARGET_DIR:-target}/debug/examples/resume
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
now() { python3 -c 'import time; print(time.time())'; }
# Starts a run in the background and waits until it trains (libtorch loaded, resumed).
start() { # dir variant
  "$bin" "$1" "$steps" "$2" >"$work/log" 2>&1 &
  pid=$!
  while ! grep -q '^training from step' "$work/log" && kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
}
total=0; in_save=0
for variant in sgd adamw-f16; do
  start "$work/$variant-plain" "$variant"; t0=$(now)
  wait "$pid" || { echo "the run failed:"; cat "$work/log"; exit 1; }
  train=$(python3 -c "import time; print(time.time() - $t0)")
  # Each run killed at a random moment of its training, about `want` kills before the end; a
  # run that ends with fewer (a faster machine) starts over with shorter times.
  for part in $want $((want * 2)) $((want * 4)); do
    rm -rf "$work/$variant-killed"; kills=0; cut=0
    budget=$(python3 -c "print($train / $part)"); last=none
    while :; do
      start "$work/$variant-killed" "$variant"
      sleep "$(python3 -c "import random; print(round(random.uniform(0.1, 1.0) * $budget, 3))")"
      kill -9 "$pid" 2>/dev/null || true
      rc=0; wait "$pid" 2>/dev/null || rc=$?
      [ "$rc" -eq 0 ] && break
      if [ "$rc" -ne 137 ]; then echo "the run failed (exit $rc):"; cat "$work/log"; exit 1; fi
      kills=$((kills + 1))
      # A save cut short leaves its temporary folder behind.
      if compgen -G "$work/$variant-killed/.step-*" >/dev/null; then cut=$((cut + 1)); fi
      # No new checkpoint since the last kill (the first save of a process is slower than the
      # average): the next run gets twice the time.
      newest=$(ls "$work/$variant-killed" 2>/dev/null | grep '^step-' | sort | tail -1 || true)
      if [ "$newest" = "$last" ]; then budget=$(python3 -c "print($budget * 2)"); fi
      last=$newest
      [ "$kills" -lt 300 ] || { echo "no progress after 300 kills"; exit 1; }
    done
    [ "$kills" -ge "$want" ] && break
  done
  if [ "$kills" -lt "$want" ]; then echo "$variant: only $kills kills before the end"; exit 1; fi
  total=$((total + kills)); in_save=$((in_save + cut))
  a=$(echo "$work/$variant-plain/final"/step-*); b=$(echo "$work/$variant-killed/final"/step-*)
  for f in model.safetensors optimizer.safetensors guard.safetensors; do
    cmp -s "$a/$f" "$b/$f" || { echo "$variant: $f differs after $kills kills"; exit 1; }
  done
  python3 - "$a/manifest.json" "$b/manifest.json" "$variant" <<'PY'
import json, sys
a, b = (json.load(open(p))["meta"] for p in sys.argv[1:3])
if a != b:
    print(f"{sys.argv[3]}: the saved state differs:\n  uninterrupted {a}\n  killed        {b}")
    sys.exit(1)
PY
done
echo "($in_save of the kills during a save)"
echo "bitwise equal after $total kills"
