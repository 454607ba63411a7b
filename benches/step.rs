//! One training step of the MLPs of `benches/torch_reference.py`, unguarded and guarded.
//!
//! `cargo bench --bench step` (or `scripts/bench.sh`) prints, per model and variant: steps/s
//! (median of interleaved rounds), overhead against the unguarded step, and host reads per
//! step. SGD, one intra-op thread, like the PyTorch reference.
//!
//! Environment: `STEPGUARD_BENCH_DEVICE=cuda` runs on the GPU; `STEPGUARD_BENCH_SHAPES`
//! (`layers x width x batch`, comma-separated) picks the models; `STEPGUARD_BENCH_STEPS` the
//! steps per variant; `STEPGUARD_BENCH_JSON=1` prints JSON lines instead of a table;
//! `STEPGUARD_BENCH_KIND=bf16` runs the model in bf16 (with `STEPGUARD_BENCH_ONLY`).
//!
//! `STEPGUARD_BENCH_SERVE=1`: builds and warms every model, prints `{"ready": ...}`, then runs
//! one round (`STEPGUARD_BENCH_STEPS` steps of every variant on every model) per line read
//! from stdin, printing one JSON line per model and variant and `{"done": ...}` after each
//! round. `scripts/bench-table.sh` drives it, interleaved with the PyTorch reference.

use std::io::{BufRead, Write};
use std::time::Instant;

use stepguard::guarded_step;
use stepguard::testing::count_host_reads;
use stepguard_suite::mlp;
use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

struct Model {
    vs: nn::VarStore,
    net: nn::Sequential,
    opt: nn::Optimizer,
    params: Vec<Tensor>,
}

fn build(layers: usize, width: i64, device: Device) -> Model {
    let vs = nn::VarStore::new(device);
    let net = mlp(&vs.root(), layers, width);
    let opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let params = opt.trainable_variables();
    Model {
        vs,
        net,
        opt,
        params,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    TchClip,
    Clip,
    Guard,
    GuardClipping,
    GuardAten,
    GuardForward,
    GuardSkip,
    GuardAtenPerTensor,
    GuardNoReplay,
}

const VARIANTS: [(Variant, &str); 10] = [
    (Variant::Plain, "unguarded"),
    (
        Variant::TchClip,
        "tch Optimizer::clip_grad_norm(5) (1 sync, NaN leaks)",
    ),
    (Variant::Clip, "stepguard::clip_grad_norm(5)"),
    (Variant::Guard, "#[guarded_step(max_norm = 5)], all checks"),
    (
        Variant::GuardClipping,
        "#[guarded_step(max_norm = 0.01)], all checks, always clipping",
    ),
    (
        Variant::GuardAten,
        "#[guarded_step(max_norm = 5)], ATen path, multi-tensor (fast path off)",
    ),
    (
        Variant::GuardForward,
        "#[guarded_step(max_norm = 5, checks = \"all\")], + forward check",
    ),
    (
        Variant::GuardAtenPerTensor,
        "#[guarded_step(max_norm = 5)], ATen path, one operator per tensor (no shim)",
    ),
    (
        Variant::GuardSkip,
        "#[guarded_step(max_norm = 5, on_nan = \"skip\")] (no buffers to save)",
    ),
    (
        Variant::GuardNoReplay,
        "#[guarded_step(max_norm = 5, checks(diagnose = \"off\"))], all checks, no replay",
    ),
];

/// The step, written once, under three configurations.
macro_rules! guarded_fn {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        fn $name(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
            let _ = vs;
            let logits = net.forward(x);
            let loss = logits.cross_entropy_for_logits(y);
            opt.zero_grad();
            loss.backward();
            opt.step();
        }
    };
}

guarded_fn!(
    #[guarded_step(max_norm = 5)]
    guarded
);
guarded_fn!(
    #[guarded_step(max_norm = 0.01)]
    guarded_clipping
);
guarded_fn!(
    #[guarded_step(max_norm = 5, checks = "all")]
    guarded_forward
);
guarded_fn!(
    #[guarded_step(max_norm = 5, on_nan = "skip")]
    guarded_skip
);
guarded_fn!(
    #[guarded_step(max_norm = 5, checks(diagnose = "off"))]
    guarded_no_replay
);

/// The same step on a model with BatchNorm (buffers), under `panic` and under `skip`, which
/// copies the buffers at the start of every call to restore them on a skip.
macro_rules! bn_fn {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        fn $name(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::SequentialT, x: &Tensor, y: &Tensor) {
            let _ = vs;
            let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
            opt.zero_grad();
            loss.backward();
            opt.step();
        }
    };
}
bn_fn!(
    #[guarded_step(max_norm = 5)]
    bn_panic
);
bn_fn!(
    #[guarded_step(max_norm = 5, on_nan = "skip")]
    bn_skip
);

/// Steps/s of `bn_panic` and `bn_skip` on `layers` x (Linear(width) + BatchNorm1d(width)).
fn buffers_bench(layers: usize, width: i64, batch: i64, device: Device, steps: usize) {
    let build_bn = || {
        let vs = nn::VarStore::new(device);
        let mut seq = nn::seq_t();
        let mut d = 64;
        for i in 0..layers {
            seq = seq
                .add(nn::linear(
                    vs.root() / format!("l{i}"),
                    d,
                    width,
                    Default::default(),
                ))
                .add(nn::batch_norm1d(
                    vs.root() / format!("bn{i}"),
                    width,
                    Default::default(),
                ))
                .add_fn(|x| x.relu());
            d = width;
        }
        let seq = seq.add(nn::linear(vs.root() / "out", d, 10, Default::default()));
        let opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
        (vs, seq, opt)
    };
    let x = Tensor::randn([batch, 64], (Kind::Float, device));
    let y = Tensor::randint(10, [batch], (Kind::Int64, device));
    let (mut a, mut b) = (build_bn(), build_bn());
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..8 {
        for (k, m) in [&mut a, &mut b].into_iter().enumerate() {
            sync(device);
            let t = Instant::now();
            for _ in 0..(steps / 7).max(1) {
                if k == 0 {
                    bn_panic(&mut m.2, &m.0, &m.1, &x, &y);
                } else {
                    bn_skip(&mut m.2, &m.0, &m.1, &x, &y);
                }
            }
            sync(device);
            if round > 0 {
                rates[k].push((steps / 7).max(1) as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    let (p, s) = (median(rates[0].clone()), median(rates[1].clone()));
    println!(
        "buffers: {layers} x (Linear({width}) + BatchNorm1d({width})), batch {batch}, {} buffers: \
         guard (panic) {p:.0} steps/s, guard (skip, buffers saved each call) {s:.0} steps/s: {:+.1} %",
        2 * layers,
        (p / s - 1.0) * 100.0
    );
}

/// One step of variant `v`: what `scripts/bench-instructions.sh` counts (callgrind's
/// `--toggle-collect=step::step`), so never inlined.
#[inline(never)]
fn step(m: &mut Model, v: Variant, x: &Tensor, y: &Tensor) {
    one_step(m, v, x, y)
}

/// Steps that callgrind does not count (they do not run inside `step`): what the first calls
/// pay once (lazy initialisation, first allocations) is left out of the per-step count.
#[inline(never)]
fn uncounted_steps(m: &mut Model, v: Variant, x: &Tensor, y: &Tensor, n: usize) {
    (0..n).for_each(|_| one_step(m, v, x, y));
}

fn one_step(m: &mut Model, v: Variant, x: &Tensor, y: &Tensor) {
    match v {
        Variant::Guard => return guarded(&mut m.opt, &m.vs, &m.net, x, y),
        Variant::GuardClipping => return guarded_clipping(&mut m.opt, &m.vs, &m.net, x, y),
        Variant::GuardForward => return guarded_forward(&mut m.opt, &m.vs, &m.net, x, y),
        Variant::GuardSkip => return guarded_skip(&mut m.opt, &m.vs, &m.net, x, y),
        Variant::GuardNoReplay => return guarded_no_replay(&mut m.opt, &m.vs, &m.net, x, y),
        Variant::GuardAtenPerTensor => {
            stepguard::testing::set_cpu_fast_path(false);
            stepguard::testing::set_multi_tensor(false);
            guarded(&mut m.opt, &m.vs, &m.net, x, y);
            stepguard::testing::set_multi_tensor(true);
            return stepguard::testing::set_cpu_fast_path(true);
        }
        Variant::GuardAten => {
            stepguard::testing::set_cpu_fast_path(false);
            guarded(&mut m.opt, &m.vs, &m.net, x, y);
            return stepguard::testing::set_cpu_fast_path(true);
        }
        _ => {}
    }
    let logits = m.net.forward(x);
    let loss = logits.cross_entropy_for_logits(y);
    m.opt.zero_grad();
    loss.backward();
    match v {
        Variant::TchClip => m.opt.clip_grad_norm(5.0),
        Variant::Clip => {
            let _ = stepguard::clip_grad_norm(&m.params, 5.0, 2).unwrap();
        }
        _ => {}
    }
    m.opt.step();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn main() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    // `cargo test --all-targets` runs this binary without `--bench`: a quick smoke run then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str| std::env::var(k).ok();
    let device = match env("STEPGUARD_BENCH_DEVICE").as_deref() {
        Some("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let steps: usize = env("STEPGUARD_BENCH_STEPS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 7 } else { 350 });
    let shapes: Vec<(usize, i64, i64)> = env("STEPGUARD_BENCH_SHAPES")
        .unwrap_or_else(|| "8x256x64,50x64x32,200x32x32".into())
        .split(',')
        .map(|s| {
            let v: Vec<i64> = s
                .split('x')
                .map(|n| n.trim().parse().expect("layers x width x batch"))
                .collect();
            (v[0] as usize, v[1], v[2])
        })
        .collect();
    let json = env("STEPGUARD_BENCH_JSON").is_some();
    if env("STEPGUARD_BENCH_SERVE").is_some() {
        let warmup = env("STEPGUARD_BENCH_WARMUP")
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        return serve(&shapes, device, steps, warmup);
    }
    // `STEPGUARD_BENCH_ONLY=i`: just `steps` steps of variant `i` on the first shape, nothing
    // printed (for instruction counting under callgrind, see scripts/bench-instructions.sh);
    // `STEPGUARD_BENCH_UNCOUNTED=n` steps before them that callgrind does not count.
    if let Some(i) = env("STEPGUARD_BENCH_ONLY").and_then(|s| s.parse::<usize>().ok()) {
        let (layers, width, batch) = shapes[0];
        // `STEPGUARD_BENCH_KIND=bf16`: the model and the batch in bf16.
        let bf16 = env("STEPGUARD_BENCH_KIND").as_deref() == Some("bf16");
        let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
        let x = Tensor::randn([batch, 64], (kind, device));
        let y = Tensor::randint(10, [batch], (Kind::Int64, device));
        let mut m = build(layers, width, device);
        if bf16 {
            m.vs.bfloat16();
        }
        // `STEPGUARD_BENCH_UNCOUNTED=n`: n steps first, outside `step`.
        let uncounted = env("STEPGUARD_BENCH_UNCOUNTED")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        uncounted_steps(&mut m, VARIANTS[i].0, &x, &y, uncounted);
        (0..steps).for_each(|_| step(&mut m, VARIANTS[i].0, &x, &y));
        return;
    }
    let rounds = 7;
    if !json {
        println!(
            "device: {device:?}, checks compiled in: {}",
            stepguard::CHECKS_ENABLED
        );
        println!("| model | tensors | variant | steps/s | overhead | host reads/step |");
        println!("|---|---|---|---|---|---|");
    }
    for (layers, width, batch) in shapes {
        let x = Tensor::randn([batch, 64], (Kind::Float, device));
        let y = Tensor::randint(10, [batch], (Kind::Int64, device));
        let mut models: Vec<Model> = VARIANTS
            .iter()
            .map(|_| build(layers, width, device))
            .collect();
        let mut rates = vec![Vec::new(); VARIANTS.len()];
        let mut reads = vec![0u64; VARIANTS.len()];
        for (m, (v, _)) in models.iter_mut().zip(VARIANTS) {
            for _ in 0..(if smoke { 1 } else { 20 }) {
                step(m, v, &x, &y);
            }
        }
        // Interleaved rounds, so machine drift hits every variant alike.
        for _ in 0..rounds {
            for (i, (v, _)) in VARIANTS.iter().enumerate() {
                let n = (steps / rounds).max(1);
                sync(device);
                let t = Instant::now();
                let ((), r) =
                    count_host_reads(|| (0..n).for_each(|_| step(&mut models[i], *v, &x, &y)));
                sync(device);
                rates[i].push(n as f64 / t.elapsed().as_secs_f64());
                reads[i] = r / n as u64;
            }
        }
        let base = median(rates[0].clone());
        for (i, (v, name)) in VARIANTS.iter().enumerate() {
            let r = median(rates[i].clone());
            let overhead = (base / r - 1.0) * 100.0;
            let reads = if *v == Variant::TchClip {
                "1 (tch's own)".into()
            } else {
                reads[i].to_string()
            };
            let tensors = models[i].params.len();
            if json {
                println!(
                    "{{\"layers\": {layers}, \"width\": {width}, \"batch\": {batch}, \"tensors\": {tensors}, \
                     \"variant\": \"{name}\", \"steps_per_s\": {r:.1}, \"overhead_pct\": {overhead:.2}, \
                     \"host_reads\": \"{reads}\", \"device\": \"{device:?}\", \"checks\": {}}}",
                    stepguard::CHECKS_ENABLED
                );
            } else {
                let overhead = if i == 0 {
                    "-".to_string()
                } else {
                    format!("{overhead:+.1} %")
                };
                println!("| {layers} x Linear({width}), batch {batch} | {tensors} | {name} | {r:.0} | {overhead} | {reads} |");
            }
        }
    }
    if !json {
        buffers_bench(8, 256, 64, device, steps);
    }
    for site in stepguard::registry() {
        if !json {
            println!(
                "{}: {} calls, {} clipped",
                site.name(),
                site.stats().calls,
                site.stats().clipped
            );
        }
    }
}

/// One round per line of stdin: `steps` steps of every variant on every model, timed, one JSON
/// line each (see the module docs).
fn serve(shapes: &[(usize, i64, i64)], device: Device, steps: usize, warmup: usize) {
    let mut sets: Vec<_> = shapes
        .iter()
        .map(|&(layers, width, batch)| {
            let x = Tensor::randn([batch, 64], (Kind::Float, device));
            let y = Tensor::randint(10, [batch], (Kind::Int64, device));
            let mut models: Vec<Model> = VARIANTS
                .iter()
                .map(|_| build(layers, width, device))
                .collect();
            for (m, (v, _)) in models.iter_mut().zip(VARIANTS) {
                (0..warmup).for_each(|_| step(m, v, &x, &y));
            }
            ((layers, width, batch), x, y, models)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{{\"ready\": \"step\", \"device\": \"{device:?}\", \"checks\": {}, \"threads\": {}}}",
        stepguard::CHECKS_ENABLED,
        tch::get_num_threads()
    );
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let round = line.expect("stdin").trim().to_string();
        for ((layers, width, batch), x, y, models) in sets.iter_mut() {
            for (m, (v, name)) in models.iter_mut().zip(VARIANTS) {
                sync(device);
                let t = Instant::now();
                let ((), reads) = count_host_reads(|| (0..steps).for_each(|_| step(m, v, x, y)));
                sync(device);
                let secs = t.elapsed().as_secs_f64();
                let _ = writeln!(
                    out,
                    "{{\"bench\": \"step\", \"round\": {round}, \"layers\": {layers}, \"width\": {width}, \
                     \"batch\": {batch}, \"tensors\": {}, \"variant\": \"{}\", \"steps\": {steps}, \
                     \"seconds\": {secs:.6}, \"steps_per_s\": {:.2}, \"host_reads\": {reads}}}",
                    m.params.len(),
                    name.replace('"', "\\\""),
                    steps as f64 / secs
                );
            }
        }
        let _ = writeln!(out, "{{\"done\": {round}}}");
        let _ = out.flush();
    }
}
