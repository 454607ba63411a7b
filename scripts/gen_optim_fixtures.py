#!/usr/bin/env python3
"""Writes tests/fixtures/fused_optim.json: parameters after each of 4 steps of PyTorch 2.11.0's
fused optimizers (torch.optim.SGD / Adam / AdamW with fused=True, on CPU), for every option,
that tests/fused_optim.rs compares stepguard::optim against.

Run with the Python that scripts/env.sh installs:  scripts/regen-fixtures.sh
"""
import json, math
import torch

SHAPES = [(3, 4), (5,), (2, 2)]
STEPS = 4

def init(i, shape):
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) * (0.37 + i)).sin().reshape(shape) * 0.5

def grad(step, i, shape):
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) * (0.71 + i) + step * 1.3).cos().reshape(shape)

CASES = []
for m, d, nest, wd in [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.0), (0.9, 0.1, False, 0.01),
                       (0.9, 0.0, True, 0.01)]:
    CASES.append(("sgd", dict(momentum=m, dampening=d, nesterov=nest, weight_decay=wd), 0.1))
for name in ("adam", "adamw"):
    for ams in (False, True):
        for wd in (0.0, 0.05):
            CASES.append((name, dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, amsgrad=ams), 0.01))

out = []
for name, opts, lr in CASES:
    params = [init(i, s).to(torch.float32).requires_grad_(True) for i, s in enumerate(SHAPES)]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    opt = cls(params, lr=lr, fused=True, **opts)
    steps = []
    for k in range(STEPS):
        for i, (p, s) in enumerate(zip(params, SHAPES)):
            p.grad = grad(k, i, s).to(torch.float32)
        opt.step()
        steps.append([p.detach().reshape(-1).tolist() for p in params])
    o = dict(opts)
    if "betas" in o:
        o["beta1"], o["beta2"] = o.pop("betas")
    out.append(dict(optimizer=name, options=o, lr=lr, shapes=SHAPES, steps=steps))

with open("tests/fixtures/fused_optim.json", "w") as f:
    json.dump(dict(torch=torch.__version__, cases=out), f, indent=1)
print(f"wrote {len(out)} cases")
