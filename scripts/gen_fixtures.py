#!/usr/bin/env python3
"""Writes tests/fixtures/clip_grad_norm.json: reference results of
torch.nn.utils.clip_grad_norm_ (PyTorch 2.11.0) that tests/clip_reference.rs compares against.

Run with the Python that scripts/env.sh installs:  scripts/regen-fixtures.sh
"""
import json, math, os
import torch

torch.manual_seed(1234)

def enc(v):
    if math.isnan(v): return "nan"
    if math.isinf(v): return "inf" if v > 0 else "-inf"
    return v

SPECS = [((3, 4), torch.float32), ((5,), torch.float64), ((2, 3, 2), torch.float32),
         ((7,), torch.float32), ((1,), torch.float64), ((16, 8), torch.float32)]
UNDEFINED = {3}  # the param at this index has no grad (grad is None)

def make_grads(scale, plant=None):
    grads = []
    for i, (shape, dtype) in enumerate(SPECS):
        if i in UNDEFINED:
            grads.append(None); continue
        g = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
        grads.append(g)
    if plant is not None:
        idx, pos, val = plant
        grads[idx].view(-1)[pos] = val
    return grads

cases = []
for norm_type in [2.0, 1.0, math.inf, 3.0, 0.5]:
    for max_norm, scale in [(1.0, 1.0), (1000.0, 1.0), (0.05, 3.0)]:
        cases.append((f"p={norm_type} max_norm={max_norm}", norm_type, max_norm, make_grads(scale)))
cases.append(("nan in one grad", 2.0, 1.0, make_grads(1.0, (2, 5, float("nan")))))
cases.append(("inf in one grad", 2.0, 1.0, make_grads(1.0, (5, 17, float("inf")))))
cases.append(("-inf in one grad, p=inf", math.inf, 1.0, make_grads(1.0, (0, 0, float("-inf")))))
cases.append(("all grads undefined", 2.0, 1.0, [None] * len(SPECS)))

out = []
for name, norm_type, max_norm, grads in cases:
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape, dtype in SPECS]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=True)
    out.append({
        "name": name,
        "norm_type": enc(norm_type),
        "max_norm": max_norm,
        "params": [{"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                    "grad": None if g is None else [enc(v) for v in g.flatten().tolist()],
                    "clipped": None if p.grad is None else [enc(v) for v in p.grad.flatten().tolist()]}
                   for (shape, dtype), g, p in zip(SPECS, grads, params)],
        "total": enc(float(total)),
    })

path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "clip_grad_norm.json")
with open(path, "w") as f:
    json.dump({"torch_version": torch.__version__, "cases": out}, f, indent=0)
print(f"wrote {len(out)} cases to {os.path.normpath(path)} (torch {torch.__version__})")
