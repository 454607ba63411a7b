#!/usr/bin/env python3
"""Writes tests/fixtures/grad_scaler.json: the trajectory of PyTorch 2.11.0's
torch.amp.GradScaler (CPU) over a sequence of steps with planted overflows: the scale after each
update, which steps were skipped, and the parameters at the end, for SGD (tch-like, unfused) and
fused Adam (grad_scale / found_inf inside the kernel). tests/loss_scale.rs replays it.

The loss of step k is  mult[k] * sum_i (p_i * c_i(k)).sum() + 0.5 * sum_i (p_i * p_i).sum():
a finite loss whose scaled gradient overflows f32 when scale * mult[k] does.

Run with the Python that scripts/env.sh installs:  scripts/regen-fixtures.sh
"""
import json, math
import torch

SHAPES = [(3, 4), (5,)]
GROWTH_INTERVAL = 3
# 1e34 overflows at 65536 (6.6e38) but not at 32768; 1e36 overflows down to scale 512.
MULTS = [1.0] * 4 + [1e34] + [1.0] * 3 + [1e36] * 3 + [1.0] * 8 + [1e34] + [1.0] * 10 + [1e35] + [1.0] * 4

def init(i, shape):
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) * (0.37 + i)).sin().reshape(shape) * 0.5

def coef(step, i, shape):
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) * (0.71 + i) + step * 1.3).cos().reshape(shape)

def run(name):
    params = [init(i, s).to(torch.float32).requires_grad_(True) for i, s in enumerate(SHAPES)]
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, foreach=False)
    else:
        opt = torch.optim.Adam(params, lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", growth_interval=GROWTH_INTERVAL)
    scales, skipped = [], []
    for k, mult in enumerate(MULTS):
        opt.zero_grad()
        lin = sum((p * coef(k, i, s).to(torch.float32)).sum() for i, (p, s) in enumerate(zip(params, SHAPES)))
        reg = sum((p * p).sum() for p in params)
        loss = lin * mult + reg * 0.5
        assert math.isfinite(loss.item())
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in params]
        scale_used = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(all(torch.equal(b, p.detach()) for b, p in zip(before, params)))
        scales.append(scaler.get_scale())
    return dict(optimizer=name, scales=scales, skipped=skipped,
                params=[p.detach().reshape(-1).tolist() for p in params])

out = dict(torch=torch.__version__, shapes=SHAPES, growth_interval=GROWTH_INTERVAL,
           mults=MULTS, cases=[run("sgd"), run("adam_fused")])
with open("tests/fixtures/grad_scaler.json", "w") as f:
    json.dump(out, f, indent=1)
for c in out["cases"]:
    print(c["optimizer"], "skipped", sum(c["skipped"]), "scales", c["scales"])
