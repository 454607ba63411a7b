#!/usr/bin/env python3
"""Reference: cost of guarding a training step in PyTorch eager mode.

Copied from shared/bench/torch_reference.py (so the repository benches without ../shared),
with a --device option added.

Measures steps/s of one MLP training step, four ways:
  plain    forward, backward, SGD step
  naive    per-tensor `torch.isnan(x).sum() == 0` asserts on loss, params and grads
           (one host sync per tensor) + clip_grad_norm_(foreach=False)
  torch    clip_grad_norm_(foreach=True, error_if_nonfinite=True) + isfinite(loss)
           + one fused isfinite check over all params after the step
  clip     clip_grad_norm_(foreach=True) only

Usage: torch_reference.py [--layers N] [--width W] [--batch B] [--steps S] [--threads T]
Prints one JSON line per variant.

With --serve [--shapes LxWxB,...] [--warmup W]: builds and warms every model, prints
{"ready": ...}, then runs one round (--steps steps of every variant on every model) per line
read from stdin, one JSON line per model and variant and {"done": ...} after each round
(scripts/bench-table.sh drives it, interleaved with stepguard's benches).
"""
import argparse, json, sys, time
import torch

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=8)
p.add_argument("--width", type=int, default=256)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--steps", type=int, default=200)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--device", default="cpu")
p.add_argument("--serve", action="store_true")
p.add_argument("--shapes", default=None, help="with --serve: layers x width x batch, comma-separated")
p.add_argument("--warmup", type=int, default=20)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

def build(n_layers=None, width=None):
    n_layers = a.layers if n_layers is None else n_layers
    width = a.width if width is None else width
    layers, d = [], 64
    for _ in range(n_layers):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    layers.append(torch.nn.Linear(d, 10))
    return torch.nn.Sequential(*layers).to(dev)

dev = torch.device(a.device)
x = torch.randn(a.batch, 64, device=dev)
y = torch.randint(0, 10, (a.batch,), device=dev)

def step_plain(m, opt):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(); loss.backward(); opt.step()

def step_naive(m, opt):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    assert torch.isnan(loss).sum() == 0
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0, foreach=False)
    for q in m.parameters():
        assert torch.isnan(q).sum() == 0
    opt.step()
    for q in m.parameters():
        assert torch.isnan(q).sum() == 0
        assert torch.isnan(q.grad).sum() == 0

def step_torch(m, opt):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    ok = torch.isfinite(loss)
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0, foreach=True, error_if_nonfinite=True)
    opt.step()
    with torch.no_grad():
        norms = torch._foreach_norm(list(m.parameters()))
        ok = ok & torch.isfinite(torch.stack(norms).sum())
    assert bool(ok)

def step_clip(m, opt):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0, foreach=True)
    opt.step()

variants = {"plain": step_plain, "naive": step_naive, "torch": step_torch, "clip": step_clip}

def sync():
    if dev.type == "cuda": torch.cuda.synchronize()

if a.serve:
    sets = []
    for shape in (a.shapes or f"{a.layers}x{a.width}x{a.batch}").split(","):
        n_layers, width, batch = map(int, shape.split("x"))
        x = torch.randn(batch, 64, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        models = {}
        for k, f in variants.items():
            m = build(n_layers, width); models[k] = (m, torch.optim.SGD(m.parameters(), lr=1e-3))
            for _ in range(a.warmup):
                f(*models[k])
        sets.append(((n_layers, width, batch), x, y, models))
    print(json.dumps({"ready": "torch", "device": a.device, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        rnd = int(line)
        for (n_layers, width, batch), x, y, models in sets:  # the step functions read x, y
            for k, f in variants.items():
                m, opt = models[k]
                sync(); t = time.perf_counter()
                for _ in range(a.steps):
                    f(m, opt)
                sync(); secs = time.perf_counter() - t
                print(json.dumps({"bench": "torch", "round": rnd, "layers": n_layers, "width": width,
                                  "batch": batch, "tensors": 2 * (n_layers + 1), "variant": k,
                                  "steps": a.steps, "seconds": round(secs, 6),
                                  "steps_per_s": round(a.steps / secs, 2)}))
        print(json.dumps({"done": rnd}), flush=True)
    sys.exit(0)

results = {k: [] for k in variants}
models = {}
for k in variants:
    m = build(); models[k] = (m, torch.optim.SGD(m.parameters(), lr=1e-3))
    for _ in range(20):
        variants[k](*models[k])
# interleave rounds so machine drift hits every variant alike
for _ in range(5):
    for k, f in variants.items():
        m, opt = models[k]
        if dev.type == "cuda": torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps // 5):
            f(m, opt)
        if dev.type == "cuda": torch.cuda.synchronize()
        results[k].append((a.steps // 5) / (time.perf_counter() - t))
for k, r in results.items():
    r.sort()
    print(json.dumps({"variant": k, "steps_per_s_median": round(r[len(r) // 2], 1),
                      "param_tensors": 2 * (a.layers + 1), "layers": a.layers,
                      "width": a.width, "batch": a.batch, "threads": a.threads,
                      "device": a.device}))
