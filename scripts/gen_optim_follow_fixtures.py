#!/usr/bin/env python3
"""Writes tests/fixtures/optim_follow.json, which tests/optim_bad_input.rs compares
stepguard::optim against (PyTorch 2.11.0, on CPU):

- "dtype": fused SGD / Adam / AdamW, two steps in f32, then the parameters (and their grads)
  cast to f64 as `model.double()` does and the optimizer state cast to them as
  `load_state_dict` does (the step counters stay f32), then two steps in f64 with f64 grads;
  the parameters after each step.
- "sparse": torch.optim.SGD (no momentum, no weight decay) on an nn.Embedding(sparse=True):
  three steps whose sparse grads repeat some rows; the weight after each step.

Values are written as strings (Python's repr: the shortest decimal that reads back as the same
f64), which the test parses exactly.

Run with the Python that scripts/env.sh installs:  scripts/regen-fixtures.sh
"""
import json, math
import torch

SHAPES = [(3, 4), (5,)]
F32_STEPS, F64_STEPS = 2, 2

def init(i, shape):
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) * (0.37 + i)).sin().reshape(shape) * 0.5

def exact(t):
    return [repr(v) for v in t.detach().double().reshape(-1).tolist()]

def grad(step, i, shape):
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64) * (0.71 + i) + step * 1.3).cos().reshape(shape)

CASES = [
    ("sgd", dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0), 0.1),
    ("sgd", dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01), 0.1),
    ("sgd", dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01), 0.1),
    ("adam", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False), 0.01),
    ("adam", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=True), 0.01),
    ("adamw", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False), 0.01),
    ("adamw", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, amsgrad=True), 0.01),
]

dtype_cases = []
for name, opts, lr in CASES:
    params = [init(i, s).to(torch.float32).requires_grad_(True) for i, s in enumerate(SHAPES)]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    opt = cls(params, lr=lr, fused=True, **opts)
    steps = []
    for k in range(F32_STEPS + F64_STEPS):
        if k == F32_STEPS:
            # model.double(): parameters and grads; then the state follows the parameters.
            for p in params:
                p.data = p.data.double()
                p.grad = None
            opt.load_state_dict(opt.state_dict())
            for st in opt.state.values():
                for key, v in st.items():
                    want = torch.float32 if key == "step" else torch.float64
                    assert v.dtype == want, (key, v.dtype)
        kind = torch.float32 if k < F32_STEPS else torch.float64
        for i, (p, s) in enumerate(zip(params, SHAPES)):
            p.grad = grad(k, i, s).to(kind)
        opt.step()
        steps.append([exact(p) for p in params])
    o = dict(opts)
    if "betas" in o:
        o["beta1"], o["beta2"] = o.pop("betas")
    dtype_cases.append(dict(optimizer=name, options=o, lr=lr, steps=steps))

# Sparse grads: rows 1 and 3 come twice in a step (an uncoalesced grad, as Embedding's).
ROWS, DIM, LR = 10, 3, 0.1
INDICES = [[1, 2, 1, 5], [3, 3, 7, 1], [0, 2, 9, 1]]
emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
with torch.no_grad():
    emb.weight.copy_(init(0, (ROWS, DIM)).to(torch.float32))
opt = torch.optim.SGD(emb.parameters(), lr=LR)
sparse_steps = []
for k, idx in enumerate(INDICES):
    opt.zero_grad()
    w = grad(k, 1, (len(idx), DIM)).to(torch.float32)
    (emb(torch.tensor(idx)) * w).sum().backward()
    assert emb.weight.grad.is_sparse
    opt.step()
    sparse_steps.append(exact(emb.weight))
sparse = dict(rows=ROWS, dim=DIM, lr=LR, indices=INDICES, steps=sparse_steps)

with open("tests/fixtures/optim_follow.json", "w") as f:
    json.dump(dict(torch=torch.__version__, shapes=SHAPES, f32_steps=F32_STEPS,
                   dtype=dtype_cases, sparse=sparse), f, indent=1)
print(f"wrote {len(dtype_cases)} dtype cases and the sparse case")
