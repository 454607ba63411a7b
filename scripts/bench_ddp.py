"""Driver of scripts/bench-ddp.sh: PyTorch DDP (benches/torch_ddp.py) and stepguard's
data-parallel step (benches/ddp.rs) launched by torchrun in turns, the order alternating; writes
the table, the spread of the rounds and the raw output to benches/results/."""
import argparse, datetime, json, os, platform, statistics, subprocess, sys

p = argparse.ArgumentParser()
p.add_argument("--bench", required=True, help="the benches/ddp.rs binary")
p.add_argument("--launches", type=int, default=4, help="launches of each side")
p.add_argument("--rounds", type=int, default=3, help="rounds inside each launch")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--shapes", default="8x256x64,50x64x32")
p.add_argument("--nproc", type=int, default=2)
p.add_argument("--out", default=None)
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
               help="cuda: NCCL, one process per GPU (a world of one through NCCL on one GPU)")
a = p.parse_args()
cuda = a.device == "cuda"

env = dict(os.environ, OMP_NUM_THREADS="1", STEPGUARD_BENCH_SHAPES=a.shapes,
           STEPGUARD_BENCH_STEPS=str(a.steps), STEPGUARD_BENCH_ROUNDS=str(a.rounds),
           STEPGUARD_BENCH_WARMUP=str(a.warmup), STEPGUARD_BENCH_DEVICE=a.device,
           STEPGUARD_DIST_C10D="1")
run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}"]
cmds = {"torch": run + ["benches/torch_ddp.py"], "stepguard": run + ["--no-python", a.bench, "--bench"]}
raw, rows = [], []
for launch in range(a.launches):
    for side in (["torch", "stepguard"] if launch % 2 == 0 else ["stepguard", "torch"]):
        out = subprocess.run(cmds[side], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{side} failed:\n{out.stdout}\n{out.stderr}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line); r["launch"] = launch; rows.append(r)
                raw.append(f"launch {launch} {side}: {line}")
        print(f"launch {launch}: {side} done", file=sys.stderr)

def rates(shape, variant):
    return [r["steps_per_s"] for r in rows
            if r["shape"] == shape and r["variant"] == variant and "steps_per_s" in r]

def spread(v):
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"

variants = list(dict.fromkeys(r["variant"] for r in rows))
commit = (subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
          or os.environ.get("STEPGUARD_COMMIT", "unknown"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
load = os.getloadavg()
backend = "NCCL" if cuda else "Gloo"
where = (f"GPU: {subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip()}; "
         f"{a.nproc} process(es), one per GPU, NCCL" if cuda else
         f"CPU: {cpu} ({os.cpu_count()} logical CPUs); {a.nproc} processes, 1 thread each, Gloo on localhost")
lines = [
    f"# Data-parallel step: stepguard (tch + c10d {backend}) and PyTorch DDP ({backend}), {a.device.upper()}",
    "",
    f"- date: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC",
    f"- {where}",
    f"- load average after (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    f"- commit: {commit}",
    f"- command: `scripts/bench-ddp.sh --launches {a.launches} --rounds {a.rounds} --steps {a.steps} --shapes {a.shapes}"
    + (f" --device cuda --nproc {a.nproc}`" if cuda else "`"),
    f"- {a.launches} launches of each side by torchrun, alternating which goes first; in each launch every variant runs {a.rounds} rounds of {a.steps} steps, interleaved, after {a.warmup} warm-up steps; SGD, the MLPs of benches/torch_reference.py, each rank its own batch of the named size",
    "- steps/s: median (min-max) over every round of every launch",
    "",
    "| model (batch per rank) | variant | steps/s | vs PyTorch DDP (ratio of medians) | time/step vs unguarded of the same library (median over rounds) |",
    "|---|---|---|---|---|",
]
for shape in a.shapes.split(","):
    base_t = statistics.median(rates(shape, "PyTorch DDP"))
    for v in variants:
        r = rates(shape, v)
        if not r:
            continue
        base = "PyTorch DDP" if v.startswith("PyTorch") else "unguarded"
        paired = [(x, y) for x, y in zip(rates(shape, base), r)]
        over = statistics.median([(b / x - 1) * 100 for b, x in paired])
        lines.append(f"| {shape} | {v} | {spread(r)} | {statistics.median(r) / base_t:.2f}x | "
                     f"{'baseline' if v == base else f'{over:+.1f} %'} |")
    # The consensus: time per step over the guarded step without it, against the unguarded step.
    u, g, c = (rates(shape, v) for v in variants if not v.startswith("PyTorch"))
    cons = [(1 / ci - 1 / gi) / (1 / ui) * 100 for ui, gi, ci in zip(u, g, c)]
    lines.append(f"| {shape} | consensus alone: (consensus - guarded) / unguarded, per round | | | "
                 f"{statistics.median(cons):+.1f} % (min {min(cons):+.1f}, max {max(cons):+.1f}) |")
# Deterministic counts of one step (rank 0, first launch): collectives and ATen operators.
counts = [r for r in rows if "collectives" in r and r["launch"] == 0]
if counts:
    lines += ["", "One step after the rounds, counted on rank 0 (first launch): collectives issued "
              "(`ProcessGroup::collectives`) and ATen operators dispatched (`stepguard::testing::count_aten_ops`).",
              "", "| model (batch per rank) | variant | gradient buckets | collectives | ATen operators |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['variant']} | {r['buckets']} | {r['collectives']} | {r['aten_ops']} |"
              for r in counts]
lines += ["", "Raw output (rank 0's lines):", "", "```"] + raw + ["```", ""]
text = "\n".join(lines)
out = a.out or f"benches/results/{datetime.date.today()}-{'gpu' if cuda else 'cpu'}-ddp-{commit[:7]}.md"
open(out, "w").write(text)
print(text)
