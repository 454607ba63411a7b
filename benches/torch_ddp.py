#!/usr/bin/env python3
"""Reference: one data-parallel training step with PyTorch's DistributedDataParallel (Gloo).

The MLP of benches/torch_reference.py, SGD, one thread per process, each rank its own batch of
`batch` rows. Launched by torchrun (scripts/bench-ddp.sh does it, interleaved with
benches/ddp.rs):  torchrun --standalone --nproc-per-node 2 benches/torch_ddp.py
Variants (each its own model and DDP wrapper, rounds interleaved):
  plain   forward, backward (DDP averages the grads in buckets during it), SGD step
  torch   + clip_grad_norm_(foreach=True, error_if_nonfinite=True), isfinite(loss), and one
          fused isfinite check over all params after the step
Rank 0 prints one JSON line per shape, variant and round.
Environment: STEPGUARD_BENCH_SHAPES, STEPGUARD_BENCH_STEPS, STEPGUARD_BENCH_ROUNDS,
STEPGUARD_BENCH_WARMUP, STEPGUARD_BENCH_DEVICE=cuda (NCCL, each rank on cuda:LOCAL_RANK) as
benches/ddp.rs.
"""
import json, os, time
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_num_threads(1)
cuda = os.environ.get("STEPGUARD_BENCH_DEVICE") == "cuda"
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
settle = torch.cuda.synchronize if cuda else (lambda: None)
env = lambda k, d: int(os.environ.get(k, d))
steps, rounds, warmup = env("STEPGUARD_BENCH_STEPS", 40), env("STEPGUARD_BENCH_ROUNDS", 5), env("STEPGUARD_BENCH_WARMUP", 10)

def build(n_layers, width):
    layers, d = [], 64
    for _ in range(n_layers):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    layers.append(torch.nn.Linear(d, 10))
    m = torch.nn.Sequential(*layers).to(device)
    return DDP(m, device_ids=[device.index]) if cuda else DDP(m)

def step_plain(m, opt, x, y):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(); loss.backward(); opt.step()

def step_torch(m, opt, x, y):
    loss = torch.nn.functional.cross_entropy(m(x), y)
    ok = torch.isfinite(loss)
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0, foreach=True, error_if_nonfinite=True)
    opt.step()
    with torch.no_grad():
        norms = torch._foreach_norm(list(m.parameters()))
        ok = ok & torch.isfinite(torch.stack(norms).sum())
    assert bool(ok)

variants = {"PyTorch DDP": step_plain, "PyTorch DDP + clip + checks": step_torch}
for shape in os.environ.get("STEPGUARD_BENCH_SHAPES", "8x256x64").split(","):
    n_layers, width, batch = map(int, shape.split("x"))
    torch.manual_seed(1 + rank)
    x = torch.randn(batch, 64).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)
    models = {}
    for k, f in variants.items():
        m = build(n_layers, width)
        models[k] = (m, torch.optim.SGD(m.parameters(), lr=1e-3))
        for _ in range(warmup):
            f(*models[k], x, y)
    settle()
    for rnd in range(rounds):
        for k, f in variants.items():
            dist.barrier()
            t = time.perf_counter()
            for _ in range(steps):
                f(*models[k], x, y)
            settle()
            rate = steps / (time.perf_counter() - t)
            if rank == 0:
                print(json.dumps({"shape": shape, "variant": k, "round": rnd,
                                  "steps_per_s": round(rate, 3), "world": world}), flush=True)
dist.destroy_process_group()
