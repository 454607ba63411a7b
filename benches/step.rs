//! One training step of the MLPs of `shared/bench/torch_reference.py`, unguarded and guarded.
//!
//! `cargo bench --bench step` (or `scripts/bench.sh`) prints, per model and variant: steps/s
//! (median of interleaved rounds), overhead against the unguarded step, and host reads per
//! step. CPU, one intra-op thread, SGD, like the PyTorch reference.

use std::time::Instant;

use stepguard::{count_host_reads, guarded_step};
use stepguard_suite::mlp;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

struct Model {
    vs: nn::VarStore,
    net: nn::Sequential,
    opt: nn::Optimizer,
    params: Vec<Tensor>,
}

fn build(layers: usize, width: i64) -> Model {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root(), layers, width);
    let opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let params = opt.trainable_variables();
    Model { vs, net, opt, params }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    TchClip,
    Clip,
    Guard,
}

const VARIANTS: [(Variant, &str); 4] = [
    (Variant::Plain, "unguarded"),
    (Variant::TchClip, "tch Optimizer::clip_grad_norm (1 sync, NaN leaks)"),
    (Variant::Clip, "stepguard::clip_grad_norm"),
    (Variant::Guard, "#[guarded_step(max_norm = 5)], all checks"),
];

#[guarded_step(max_norm = 5)]
fn guarded(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

fn step(m: &mut Model, v: Variant, x: &Tensor, y: &Tensor) {
    if v == Variant::Guard {
        return guarded(&mut m.opt, &m.vs, &m.net, x, y);
    }
    let loss = m.net.forward(x).cross_entropy_for_logits(y);
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

fn main() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    // `cargo test --all-targets` runs this binary without `--bench`: a quick smoke run then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let steps: usize = std::env::var("STEPGUARD_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 7 } else { 350 });
    let rounds = 7;
    println!("| model | tensors | variant | steps/s | overhead | host reads/step |");
    println!("|---|---|---|---|---|---|");
    for (layers, width, batch) in [(8usize, 256i64, 64i64), (50, 64, 32), (200, 32, 32)] {
        let x = Tensor::randn([batch, 64], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
        let mut models: Vec<Model> = VARIANTS.iter().map(|_| build(layers, width)).collect();
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
                let n = steps / rounds;
                let t = Instant::now();
                let ((), r) = count_host_reads(|| (0..n).for_each(|_| step(&mut models[i], *v, &x, &y)));
                rates[i].push(n as f64 / t.elapsed().as_secs_f64());
                reads[i] = r / n as u64;
            }
        }
        let base = median(rates[0].clone());
        for (i, (v, name)) in VARIANTS.iter().enumerate() {
            let r = median(rates[i].clone());
            let overhead = if i == 0 { "-".to_string() } else { format!("{:+.1} %", (base / r - 1.0) * 100.0) };
            let reads = if *v == Variant::TchClip { "1 (tch's own)".into() } else { reads[i].to_string() };
            println!(
                "| {layers} x Linear({width}), batch {batch} | {} | {name} | {r:.0} | {overhead} | {reads} |",
                models[i].params.len()
            );
        }
    }
}
