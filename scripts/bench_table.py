#!/usr/bin/env python3
"""Driver of scripts/bench-table.sh: one run, interleaved rounds, raw output kept.

Starts three processes, each with one thread, that build and warm their models and then wait:
benches/torch_reference.py --serve (PyTorch), the `step` bench and the `optim` bench
(STEPGUARD_BENCH_SERVE=1, release build). In every round each process in turn (the order
rotates from round to round) runs a fixed number of steps of each of its variants on each
model while the others wait on their stdin. Tables: the median steps/s over the rounds with
min and max, and the overhead against the round's baseline (median, min, max over the rounds).
"""
import argparse, datetime, json, os, platform, shlex, statistics, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true", help="3 rounds of 3 steps: a smoke run, not figures")
p.add_argument("--rounds", type=int)
p.add_argument("--steps", type=int, help="steps of each variant on each model per round")
p.add_argument("--warmup", type=int)
p.add_argument("--shapes", default="8x256x64,50x64x32,200x32x32")
p.add_argument("--device", default="cpu")
p.add_argument("--out", help="default: benches/results/<date>-<cpu|gpu>-<commit>[-quick].md")
a = p.parse_args()
rounds = a.rounds or (3 if a.quick else 20)
steps = a.steps or (3 if a.quick else 40)
warmup = a.warmup if a.warmup is not None else (2 if a.quick else 20)


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root).stdout.strip()


commit = sh("git", "rev-parse", "--short=12", "HEAD")
dirty = bool(sh("git", "status", "--porcelain", "--untracked-files=no"))
date = datetime.datetime.now().astimezone()
cpu = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name")),
           platform.processor())
gpu = sh("nvidia-smi", "--query-gpu=name", "--format=csv,noheader") if a.device == "cuda" else ""
load_before = os.getloadavg()
command = ("scripts/bench-table.sh " + " ".join(shlex.quote(x) for x in sys.argv[1:])).strip()

# The bench binaries, built once (release).
build = subprocess.run(["cargo", "bench", "--no-run", "--message-format=json", "--bench", "step",
                        "--bench", "optim"], cwd=root, check=True, capture_output=True, text=True)
bins = {}
for line in build.stdout.splitlines():
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
            msg["target"]["kind"] == ["bench"]:
        bins[msg["target"]["name"]] = msg["executable"]

env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", STEPGUARD_BENCH_SERVE="1",
           STEPGUARD_BENCH_STEPS=str(steps), STEPGUARD_BENCH_WARMUP=str(warmup),
           STEPGUARD_BENCH_SHAPES=a.shapes, STEPGUARD_BENCH_DEVICE=a.device)
procs = {
    "torch": [sys.executable, os.path.join(root, "benches", "torch_reference.py"), "--serve",
              "--shapes", a.shapes, "--steps", str(steps), "--warmup", str(warmup), "--threads", "1",
              "--device", a.device],
    "step": [bins["step"], "--bench"],
    "optim": [bins["optim"], "--bench"],
}
raw, ready = [], {}
running = {}
for name, cmd in procs.items():  # started (and warmed) one after the other
    pr = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                          cwd=root, bufsize=1)
    line = pr.stdout.readline()
    if not line:
        sys.exit(f"bench-table: {name} exited before it was ready")
    ready[name] = json.loads(line)
    raw.append(line.rstrip())
    running[name] = pr

order = list(procs)
for r in range(rounds):
    k = r % len(order)
    for name in order[k:] + order[:k]:
        pr = running[name]
        pr.stdin.write(f"{r}\n"); pr.stdin.flush()
        while True:
            line = pr.stdout.readline()
            if not line:
                sys.exit(f"bench-table: {name} exited in round {r}")
            raw.append(line.rstrip())
            if json.loads(line).get("done") == r:
                break
    print(f"round {r + 1}/{rounds} done", file=sys.stderr)
for pr in running.values():
    pr.stdin.close(); pr.wait()

rows = [json.loads(l) for l in raw]
rows = [x for x in rows if "bench" in x]
shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]


def series(bench, shape, variant):
    return [x for x in rows if x["bench"] == bench and (x["layers"], x["width"], x["batch"]) == shape
            and x["variant"] == variant]


def variants(bench):
    seen = []
    for x in rows:
        if x["bench"] == bench and x["variant"] not in seen:
            seen.append(x["variant"])
    return seen


def table(title, groups):
    """groups: list of (bench, baseline bench, baseline variant, label prefix)."""
    out = [f"### {title}", "",
           "| model | variant | steps/s median | min | max | overhead (time/step) vs baseline: median | min | max |",
           "|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        model = f"{shape[0]} x Linear({shape[1]}), batch {shape[2]}"
        for bench, base_bench, base_variant, prefix in groups:
            base = {x["round"]: x["seconds"] / x["steps"] for x in series(base_bench, shape, base_variant)}
            for v in variants(bench):
                s = series(bench, shape, v)
                rates = [x["steps_per_s"] for x in s]
                over = [(x["seconds"] / x["steps"]) / base[x["round"]] - 1 for x in s]
                is_base = bench == base_bench and v == base_variant
                pct = lambda f: f"{f * 100:+.1f} %"
                o = "baseline | | " if is_base else \
                    f"{pct(statistics.median(over))} | {pct(min(over))} | {pct(max(over))}"
                out.append(f"| {model} | {prefix}{v.replace('|', '/')} | {statistics.median(rates):.0f} | "
                           f"{min(rates):.0f} | {max(rates):.0f} | {o} |")
    return out


def summary():
    """The README's form: medians, and the guarded stepguard / PyTorch ratio per round."""
    cols = [("torch", "plain"), ("torch", "torch"), ("step", "unguarded"),
            ("step", "#[guarded_step(max_norm = 5)], all checks"),
            ("step", "#[guarded_step(max_norm = 0.01)], all checks, always clipping")]
    out = ["### Summary (medians over the rounds; in brackets: overhead against the unguarded step "
           "of the same library, median over the rounds)", "",
           "| model | PyTorch unguarded | PyTorch clip + checks (`torch`) | stepguard unguarded (tch) | "
           "`#[guarded_step(max_norm = 5)]` | same, always clipping | guarded steps/s: stepguard / PyTorch "
           "(median, min-max) |", "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        per = {c: {x["round"]: x["seconds"] / x["steps"] for x in series(c[0], shape, c[1])} for c in cols}
        if not all(per.values()):
            continue
        cells = []
        for c in cols:
            base = per[("torch", "plain")] if c[0] == "torch" else per[("step", "unguarded")]
            med = statistics.median(1 / t for t in per[c].values())
            if c in (("torch", "plain"), ("step", "unguarded")):
                cells.append(f"{med:.0f}/s")
            else:
                o = statistics.median(per[c][r] / base[r] - 1 for r in per[c])
                cells.append(f"{med:.0f}/s ({o * 100:+.1f} %)")
        ratio = [per[("torch", "torch")][r] / per[cols[3]][r] for r in per[cols[3]]]
        cells.append(f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})")
        out.append(f"| {shape[0]} x Linear({shape[1]}), batch {shape[2]} | " + " | ".join(cells) + " |")
    return out


machine = f"GPU: {gpu}" if gpu else f"CPU: {cpu}"
name = f"{date:%Y-%m-%d}-{'gpu' if gpu else 'cpu'}-{commit}{'-quick' if a.quick else ''}.md"
path = a.out or os.path.join(root, "benches", "results", name)
doc = [f"# stepguard cost tables{' (quick smoke run: too few steps for figures)' if a.quick else ''}", "",
       f"- date: {date:%Y-%m-%d %H:%M %Z}",
       f"- {machine} ({os.cpu_count()} logical CPUs; every process with 1 thread)",
       f"- load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, after: "
       f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (above 1 or so, other work shared the CPUs)",
       f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
       f"- command: `{command}`",
       f"- PyTorch {ready['torch'].get('torch')}, checks compiled in: {ready['step'].get('checks')}",
       f"- {rounds} interleaved rounds; in each, every variant runs {steps} steps on every model "
       f"(after {warmup} warm-up steps); the three processes take turns, the order rotating each round.",
       "- steps/s: median, min and max over the rounds; overhead: time per step against the "
       "baseline of the same round (median, min and max over the rounds).", ""]
doc += summary() + [""]
doc += table("SGD: PyTorch eager and stepguard (tch), side by side (benches/torch_reference.py, benches/step.rs)",
             [("torch", "torch", "plain", "PyTorch: "), ("step", "step", "unguarded", "stepguard: ")])
doc += [""]
doc += table("Adam: tch `nn::Adam` and fused AdamW, unguarded and guarded (benches/optim.rs)",
             [("optim", "optim", "tch nn::Adam, unguarded", "")])
doc += ["", "## Raw output (one JSON line per process, model, variant and round)", "", "```"] + raw + ["```", ""]
with open(path, "w") as f:
    f.write("\n".join(doc))
print("\n".join(doc[:-(len(raw) + 5)]))
print(f"wrote {os.path.relpath(path, root)}", file=sys.stderr)
