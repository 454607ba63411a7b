#!/usr/bin/env python3
"""Runs the PyTorch reference step and the stepguard bench on the same shapes, one after the
other on the same machine, and prints both overheads and the stepguard-vs-PyTorch ratio.

Usage (via scripts/bench-vs-torch.sh, which sets up libtorch): [--device cpu|cuda] [--shapes ...]
"""
import argparse, json, os, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--shapes", default="8x256x64,50x64x32,200x32x32")
p.add_argument("--steps", type=int, default=350)
p.add_argument("--bench-bin", help="a prebuilt bench binary (else cargo bench is run)")
a = p.parse_args()

torch_rows = {}
for shape in a.shapes.split(","):
    layers, width, batch = shape.split("x")
    out = subprocess.run([sys.executable, os.path.join(root, "benches", "torch_reference.py"), "--layers", layers,
                          "--width", width, "--batch", batch, "--steps", str(a.steps), "--device", a.device],
                         check=True, capture_output=True, text=True).stdout
    torch_rows[shape] = {r["variant"]: r for r in map(json.loads, out.splitlines()) if r}

env = dict(os.environ, STEPGUARD_BENCH_JSON="1", STEPGUARD_BENCH_DEVICE=a.device,
           STEPGUARD_BENCH_SHAPES=a.shapes, STEPGUARD_BENCH_STEPS=str(a.steps))
cmd = [a.bench_bin, "--bench"] if a.bench_bin else ["cargo", "bench", "--quiet", "--bench", "step"]
out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=root).stdout
ours = {}
for line in out.splitlines():
    if line.startswith("{"):
        r = json.loads(line)
        ours.setdefault(f'{r["layers"]}x{r["width"]}x{r["batch"]}', {})[r["variant"]] = r

def pct(base, x):
    return f"{(base / x - 1) * 100:+.1f} %"

print(f"device: {a.device}; medians of interleaved rounds; CPU runs use 1 thread")
print("| model | PyTorch unguarded | PyTorch clip + checks (`torch`) | stepguard unguarded (tch) | "
      "`#[guarded_step(max_norm = 5)]` | same, always clipping | guarded steps/s: stepguard / PyTorch |")
print("|---|---|---|---|---|---|---|")
for shape in a.shapes.split(","):
    t, o = torch_rows[shape], ours[shape]
    tp, tg = t["plain"]["steps_per_s_median"], t["torch"]["steps_per_s_median"]
    op = o["unguarded"]["steps_per_s"]
    og = next(v for k, v in o.items() if k.startswith("#[guarded_step(max_norm = 5)], all"))["steps_per_s"]
    oc = next(v for k, v in o.items() if "always clipping" in k)["steps_per_s"]
    layers, width, batch = shape.split("x")
    print(f"| {layers} x Linear({width}), batch {batch} | {tp:.0f}/s | {tg:.0f}/s ({pct(tp, tg)}) | {op:.0f}/s | "
          f"{og:.0f}/s ({pct(op, og)}) | {oc:.0f}/s ({pct(op, oc)}) | {og / tg:.2f}x |")
