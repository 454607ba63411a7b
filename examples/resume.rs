//! A run that can be killed at any moment and resumed exactly.
//!
//! `cargo run --example resume -- DIR STEPS [sgd | adamw-f16]` trains a small MLP with dropout
//! for STEPS guarded updates, with spike statistics on and a NaN batch every 17 steps (skipped),
//! and saves a verified checkpoint into DIR every 3 updates ([`Checkpoints::save_run`]: the
//! model, the optimizer's moments, the guard's state and counters, the random generators, the
//! position). Started again after a kill, it resumes from the newest checkpoint that verifies
//! ([`Checkpoints::resume_run`]) and goes on as if it had never stopped. At the end it writes
//! the final state into `DIR/final` (the same files), which `scripts/resume-check.sh` compares
//! with an uninterrupted run's, bitwise.
//!
//! - `sgd`: f32 weights, `stepguard::optim` SGD with momentum 0.9, and `rollback = 4`: every
//!   23rd update is made with a NaN learning rate, and the next call rolls the NaN parameters
//!   back to the last snapshot (which the checkpoints keep too);
//! - `adamw-f16`: f32 master weights, the forward in f16 ([`stepguard::amp::autocast`]) with
//!   dynamic loss scaling, `stepguard::optim` AdamW.

use stepguard::checkpoint::{CheckpointError, Checkpoints};
use stepguard::guarded_step;
use stepguard::optim::{AdamW, FusedOptimizer, Sgd};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const SAVE_EVERY: u64 = 3;

fn mlp(vs: &nn::VarStore) -> nn::Sequential {
    let p = vs.root();
    nn::seq()
        .add(nn::linear(&p / "l1", 16, 64, Default::default()))
        .add_fn(|x| x.relu().dropout(0.2, true))
        .add(nn::linear(&p / "l2", 64, 64, Default::default()))
        .add_fn(|x| x.relu().dropout(0.2, true))
        .add(nn::linear(&p / "out", 64, 4, Default::default()))
}

#[guarded_step(
    max_norm = 1,
    on_nan = "skip",
    spike(sigmas = 6, warmup = 5),
    rollback = 4
)]
fn sgd_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[guarded_step(
    max_norm = 1,
    on_nan = "skip",
    spike(sigmas = 6, warmup = 5),
    loss_scale(interval = 4)
)]
fn f16_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let logits = stepguard::amp::autocast(vs.device(), Kind::Half, || net.forward(x))
        .expect("the CPU's autocast");
    let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// The batch of update `step`, drawn from the CPU generator (saved with the checkpoint); every
/// 17th holds a NaN.
fn batch(step: u64) -> (Tensor, Tensor) {
    let x = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(4, [32], (Kind::Int64, Device::Cpu));
    if step % 17 == 7 {
        let _ = x.get(0).get(0).fill_(f64::NAN);
    }
    (x, y)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, steps, variant) = match args.as_slice() {
        [_, dir, steps, rest @ ..] => (
            std::path::PathBuf::from(dir),
            steps.parse::<u64>()?,
            rest.first().map_or("sgd", String::as_str).to_string(),
        ),
        _ => return Err("usage: resume DIR STEPS [sgd | adamw-f16]".into()),
    };
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs);
    let mut opt = match variant.as_str() {
        "sgd" => Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 0.0,
            nesterov: false,
        }
        .build(&vs, 0.05)?,
        "adamw-f16" => AdamW::default().build(&vs, 1e-3)?,
        other => return Err(format!("unknown variant {other}").into()),
    };
    let store = Checkpoints::new(&dir).keep(2);
    let mut next = 0u64;
    if let Some(r) = store.resume_run::<u64>(&vs, Some(&mut opt))? {
        for p in &r.rejected {
            println!("passed over {p}");
        }
        println!("resumed at step {} from {}", r.position, r.path.display());
        next = r.position;
    }
    println!("training from step {next}");
    while next < steps {
        let (x, y) = batch(next);
        match variant.as_str() {
            "sgd" => {
                opt.set_lr(if next % 23 == 11 { f64::NAN } else { 0.05 });
                sgd_step(&mut opt, &vs, &net, &x, &y)
            }
            _ => f16_step(&mut opt, &vs, &net, &x, &y),
        }
        next += 1;
        if next % SAVE_EVERY == 0 {
            match store.save_run(next, &vs, Some(&opt), &next) {
                // Not a verified point (the NaN update's parameters, rolled back by the next
                // call): nothing written, the next save goes through.
                Err(CheckpointError::Unverified(e)) => println!("not saved at step {next}: {e}"),
                r => drop(r?),
            }
        }
    }
    Checkpoints::new(dir.join("final")).save_run(next, &vs, Some(&opt), &next)?;
    println!("done: {next} steps");
    Ok(())
}
