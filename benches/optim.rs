//! Fused optimizers against tch's, and the guard's overhead with each, per step (CPU by
//! default; `STEPGUARD_BENCH_DEVICE=cuda` on a GPU). `cargo bench --bench optim`.
//!
//! Variants, side by side in interleaved rounds: tch `nn::Adam` unguarded, fused AdamW
//! unguarded, tch `nn::Adam` + `#[guarded_step(max_norm = 5)]`, fused AdamW + the same guard,
//! fused AdamW + `#[guarded_step(max_norm = 5, sync = "deferred")]`, and the last two with
//! `loss_scale = "dynamic"` (the scale's cost: scaling the loss, unscaling or the overflow
//! check, the scale update).
//!
//! `STEPGUARD_BENCH_SERVE=1`: builds and warms every model, prints `{"ready": ...}`, then runs
//! one round (`STEPGUARD_BENCH_STEPS` steps of every variant on every model) per line read
//! from stdin, printing one JSON line per model and variant and `{"done": ...}` after each
//! round. `scripts/bench-table.sh` drives it, interleaved with the PyTorch reference.

use std::io::{BufRead, Write};
use std::time::Instant;

use stepguard::guarded_step;
use stepguard::optim::{AdamW, FusedOptimizer};
use stepguard_suite::mlp;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

#[guarded_step(max_norm = 5)]
fn tch_guarded(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

#[guarded_step(max_norm = 5)]
fn fused_guarded(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

#[guarded_step(max_norm = 5, sync = "deferred")]
fn fused_deferred(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

#[guarded_step(max_norm = 5, loss_scale = "dynamic")]
fn tch_scaled(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

#[guarded_step(max_norm = 5, sync = "deferred", loss_scale = "dynamic")]
fn fused_deferred_scaled(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

#[guarded_step(max_norm = 5, on_nan = "skip", spike = 6, rollback = 100)]
fn tch_spike(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

#[guarded_step(max_norm = 5, on_nan = "skip", spike = 6, rollback = 100)]
fn fused_spike(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
}

enum Opt {
    Tch(nn::Optimizer),
    Fused(FusedOptimizer),
}

const NAMES: [&str; 9] = [
    "tch nn::Adam, unguarded",
    "fused AdamW, unguarded",
    "tch nn::Adam + #[guarded_step(max_norm = 5)]",
    "fused AdamW + #[guarded_step(max_norm = 5)]",
    "fused AdamW + #[guarded_step(max_norm = 5, sync = \"deferred\")]",
    "tch nn::Adam + #[guarded_step(max_norm = 5, loss_scale = \"dynamic\")]",
    "fused AdamW + #[guarded_step(max_norm = 5, sync = \"deferred\", loss_scale = \"dynamic\")]",
    "tch nn::Adam + #[guarded_step(max_norm = 5, on_nan = \"skip\", spike = 6, rollback = 100)]",
    "fused AdamW + #[guarded_step(max_norm = 5, on_nan = \"skip\", spike = 6, rollback = 100)]",
];

type Bench = (nn::VarStore, nn::Sequential, Opt);

/// One model per variant (tch's Adam for variants 0, 2, 5 and 7, fused AdamW for the others).
fn build_models(layers: usize, width: i64, device: Device) -> Vec<Bench> {
    (0..NAMES.len())
        .map(|i| {
            let vs = nn::VarStore::new(device);
            let net = mlp(&vs.root(), layers, width);
            let opt = if i == 0 || i == 2 || i == 5 || i == 7 {
                Opt::Tch(nn::Adam::default().build(&vs, 1e-3).unwrap())
            } else {
                Opt::Fused(
                    AdamW {
                        wd: 0.0,
                        ..Default::default()
                    }
                    .build(&vs, 1e-3)
                    .unwrap(),
                )
            };
            (vs, net, opt)
        })
        .collect()
}

/// One step of variant `i` (see [`NAMES`]).
fn run(i: usize, m: &mut Bench, x: &Tensor, y: &Tensor) {
    let (vs, net, opt) = m;
    match (i, opt) {
        (0, Opt::Tch(o)) => o.backward_step(&net.forward(x).cross_entropy_for_logits(y)),
        (1, Opt::Fused(o)) => o.backward_step(&net.forward(x).cross_entropy_for_logits(y)),
        (2, Opt::Tch(o)) => tch_guarded(o, vs, net, x, y),
        (3, Opt::Fused(o)) => fused_guarded(o, vs, net, x, y),
        (4, Opt::Fused(o)) => fused_deferred(o, vs, net, x, y),
        (5, Opt::Tch(o)) => tch_scaled(o, vs, net, x, y),
        (6, Opt::Fused(o)) => fused_deferred_scaled(o, vs, net, x, y),
        (7, Opt::Tch(o)) => tch_spike(o, vs, net, x, y),
        (8, Opt::Fused(o)) => fused_spike(o, vs, net, x, y),
        _ => unreachable!(),
    }
}

fn sync(device: Device) {
    if let Device::Cuda(d) = device {
        tch::Cuda::synchronize(d as i64);
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
            let mut models = build_models(layers, width, device);
            for (i, m) in models.iter_mut().enumerate() {
                (0..warmup).for_each(|_| run(i, m, &x, &y));
            }
            ((layers, width, batch), x, y, models)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{{\"ready\": \"optim\", \"device\": \"{device:?}\", \"threads\": {}}}",
        tch::get_num_threads()
    );
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let round = line.expect("stdin").trim().to_string();
        for ((layers, width, batch), x, y, models) in sets.iter_mut() {
            for (i, m) in models.iter_mut().enumerate() {
                sync(device);
                let t = Instant::now();
                (0..steps).for_each(|_| run(i, m, x, y));
                sync(device);
                let secs = t.elapsed().as_secs_f64();
                let _ = writeln!(
                    out,
                    "{{\"bench\": \"optim\", \"round\": {round}, \"layers\": {layers}, \"width\": {width}, \
                     \"batch\": {batch}, \"variant\": \"{}\", \"steps\": {steps}, \"seconds\": {secs:.6}, \
                     \"steps_per_s\": {:.2}}}",
                    NAMES[i].replace('"', "\\\""),
                    steps as f64 / secs
                );
            }
        }
        let _ = writeln!(out, "{{\"done\": {round}}}");
        let _ = out.flush();
    }
    stepguard::flush().expect("finite");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    tch::set_num_threads(1);
    let smoke = !std::env::args().any(|a| a == "--bench");
    let device = match std::env::var("STEPGUARD_BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let steps: usize = std::env::var("STEPGUARD_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 2 } else { 140 });
    let shapes: &[(usize, i64, i64)] = if device == Device::Cpu {
        &[(8, 256, 64), (50, 64, 32), (200, 32, 32)]
    } else {
        &[(8, 256, 64), (50, 64, 32), (24, 1024, 256)]
    };
    if std::env::var("STEPGUARD_BENCH_SERVE").is_ok() {
        let warmup = std::env::var("STEPGUARD_BENCH_WARMUP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let chosen: Option<Vec<(usize, i64, i64)>> =
            std::env::var("STEPGUARD_BENCH_SHAPES").ok().map(|v| {
                v.split(',')
                    .map(|s| {
                        let v: Vec<i64> = s
                            .split('x')
                            .map(|n| n.trim().parse().expect("layers x width x batch"))
                            .collect();
                        (v[0] as usize, v[1], v[2])
                    })
                    .collect()
            });
        return serve(chosen.as_deref().unwrap_or(shapes), device, steps, warmup);
    }
    let names = NAMES;
    println!("device: {device:?}");
    println!("| model | variant | steps/s | vs tch nn::Adam unguarded |");
    println!("|---|---|---|---|");
    for &(layers, width, batch) in shapes {
        let x = Tensor::randn([batch, 64], (Kind::Float, device));
        let y = Tensor::randint(10, [batch], (Kind::Int64, device));
        let mut models = build_models(layers, width, device);
        let run = |i: usize, m: &mut Bench| run(i, m, &x, &y);
        let mut rates = vec![Vec::new(); names.len()];
        for round in 0..8 {
            for (i, m) in models.iter_mut().enumerate() {
                if let Device::Cuda(d) = device {
                    tch::Cuda::synchronize(d as i64);
                }
                let t = Instant::now();
                for _ in 0..(steps / 7).max(1) {
                    run(i, m);
                }
                if let Device::Cuda(d) = device {
                    tch::Cuda::synchronize(d as i64);
                }
                if round > 0 {
                    rates[i].push((steps / 7).max(1) as f64 / t.elapsed().as_secs_f64());
                }
            }
        }
        let base = median(rates[0].clone());
        for (i, name) in names.iter().enumerate() {
            let r = median(rates[i].clone());
            println!(
                "| {layers} x Linear({width}), batch {batch} | {name} | {r:.0} | {:+.1} % time |",
                (base / r - 1.0) * 100.0
            );
        }
    }
    for name in ["tch_spike", "fused_spike"] {
        if let Some(s) = stepguard::registry().find(|s| s.name() == name) {
            println!(
                "{name}: rollback snapshot {:.2} MiB on the device ({} spikes, {} rollbacks)",
                s.state().snapshot_bytes() as f64 / (1024.0 * 1024.0),
                s.stats().spikes,
                s.stats().rollbacks
            );
        }
    }
    stepguard::flush().expect("finite");
}
