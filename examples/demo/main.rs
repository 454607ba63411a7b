//! The stepguard demo: one model, four faults, trained four ways side by side.
//!
//! A 2-32-32-3 MLP learns three Gaussian blobs with a hand-written cross-entropy,
//! `-(onehot * softmax(logits).log())`, full batch, plain SGD. The faults, each a thing real
//! runs suffer:
//! - step 60: a batch that drives one row's softmax to an exact 0: `log(0)` = -inf, and
//!   `0 * -inf` = NaN;
//! - steps 100-101: the data pipeline delivers a batch with a NaN row;
//! - step 140: an exploding batch: its loss weights are 1000x (a class-weight bug), so its
//!   gradients are huge but finite;
//! - steps 200-204: a broken schedule multiplies the learning rate by 10000: every value stays
//!   finite, but one update saturates the softmax and freezes the model.
//!
//! The arms:
//! 1. unguarded;
//! 2. `#[guarded_step(protect = "none")]`: stops at the first fault and explains it;
//! 3. `#[guarded_step(max_norm = 5, on_nan = "skip")]`: survives what is non-finite or
//!    bounded by clipping, not the learning-rate spike (finite, so no check fires);
//! 4. the same with `spike = 6, rollback = 50`: the spike is detected, skipped, and when it
//!    persists the state of a good step is restored; it learns again after every fault.
//!
//! It prints `stepguard::report()`, draws `out/stepguard-demo.svg` (the loss of the model on the
//! clean data after each step, and the grad norm, with every skip, clip, spike and rollback
//! marked), and ends with one line per arm: final loss, best loss before the first fault,
//! accuracy.

use std::panic::{catch_unwind, AssertUnwindSafe};

use indicatif::{ProgressBar, ProgressStyle};
use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

mod plot;

pub const STEPS: usize = 300;
pub const FIRST_FAULT: usize = 60;
const LOG_ZERO_BATCH: usize = 60;
const NAN_BATCH: [usize; 2] = [100, 101];
const EXPLODING_BATCH: usize = 140;
const LR_SPIKE: std::ops::Range<usize> = 200..205;

/// The faults, for the plot: (first step, last step, label).
pub const FAULTS: [(usize, usize, &str); 4] = [
    (LOG_ZERO_BATCH, LOG_ZERO_BATCH, "log(0) batch"),
    (NAN_BATCH[0], NAN_BATCH[1], "NaN batch"),
    (EXPLODING_BATCH, EXPLODING_BATCH, "exploding batch"),
    (LR_SPIKE.start, LR_SPIKE.end - 1, "LR x10000"),
];

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(42);
    let n = 300;
    let centers = Tensor::from_slice2(&[[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]]);
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
    let x =
        centers.index_select(0, &labels) + Tensor::randn([n, 2], (Kind::Float, Device::Cpu)) * 0.8;
    (x, labels)
}

fn model() -> (nn::VarStore, nn::Sequential, nn::Optimizer) {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let net = nn::seq()
        .add(nn::linear(&p / "layer1", 2, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "layer2", 32, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "out", 32, 3, Default::default()));
    let opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    (vs, net, opt)
}

fn lr(step: usize) -> f64 {
    if LR_SPIKE.contains(&step) {
        500.0
    } else {
        0.05
    }
}

/// The targets of `step`: one-hot, weighted 1000x in the exploding batch.
fn targets(onehot: &Tensor, step: usize) -> Tensor {
    if step == EXPLODING_BATCH {
        onehot * 1000.0
    } else {
        onehot.shallow_clone()
    }
}

/// The batch of `step`: the data, or what the faults make of it.
fn batch(x: &Tensor, step: usize) -> Tensor {
    let bad = x.copy();
    if NAN_BATCH.contains(&step) {
        let _ = bad.narrow(0, (step % 7) as i64, 1).fill_(f64::NAN);
    } else if step == LOG_ZERO_BATCH {
        // One far-away point: its softmax is an exact 0 for every class but one.
        let _ = bad.narrow(0, 1, 1).fill_(-1e5);
    } else {
        return x.shallow_clone();
    }
    bad
}

/// The step as people write it. The same body four times: plain, and under three attributes.
macro_rules! step_fn {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        fn $name(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, onehot: &Tensor) -> f64 {
            let _ = vs; // names parameters in error messages
            let p = net.forward(x).softmax(-1, Kind::Float);
            let loss = -(onehot * p.log()).sum_dim_intlist(-1, false, None).mean(None);
            opt.zero_grad();
            loss.backward();
            opt.step();
            f64::try_from(&loss).unwrap()
        }
    };
}

step_fn!(train_step_unguarded);
step_fn!(
    #[guarded_step(protect = "none")]
    train_step_checked
);
step_fn!(
    #[guarded_step(max_norm = 5, on_nan = skip(max = 10))]
    train_step_skip
);
step_fn!(
    #[guarded_step(max_norm = 5, on_nan = "skip", spike = 6, rollback = 50)]
    train_step
);

/// What one arm recorded, per step.
#[derive(Default)]
pub struct Run {
    pub name: &'static str,
    /// The model's loss on the clean data after the step (NaN once ruined).
    pub loss: Vec<f64>,
    /// The total grad norm of the step.
    pub grad_norm: Vec<f64>,
    pub clipped: Vec<usize>,
    pub skipped: Vec<usize>,
    pub spikes: Vec<usize>,
    pub rollbacks: Vec<usize>,
    /// Where the run stopped (a panic), if it did.
    pub stopped: Option<usize>,
    pub accuracy: f64,
}

impl Run {
    /// The best loss before the first fault.
    pub fn best_before_fault(&self) -> f64 {
        self.loss[..FIRST_FAULT.min(self.loss.len())]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    pub fn final_loss(&self) -> f64 {
        self.loss.last().copied().unwrap_or(f64::NAN)
    }

    /// The step where the loss first became non-finite.
    pub fn nan_at(&self) -> Option<usize> {
        self.loss.iter().position(|l| !l.is_finite())
    }
}

fn clean_loss(net: &nn::Sequential, x: &Tensor, onehot: &Tensor) -> f64 {
    tch::no_grad(|| {
        let logp = net.forward(x).log_softmax(-1, Kind::Float);
        f64::try_from(-(onehot * logp).sum_dim_intlist(-1, false, None).mean(None)).unwrap()
    })
}

fn accuracy(net: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    let pred = tch::no_grad(|| net.forward(x).argmax(-1, false));
    f64::try_from(pred.eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float)).unwrap()
}

fn site(name: &str) -> &'static stepguard::registry::Site {
    stepguard::registry()
        .find(|s| s.name() == name)
        .expect("registered")
}

type StepFn = fn(&mut nn::Optimizer, &nn::VarStore, &nn::Sequential, &Tensor, &Tensor) -> f64;

/// Trains one arm; `guarded`: the name of its guarded function (for its statistics).
fn arm(
    name: &'static str,
    step_fn: StepFn,
    guarded: Option<&str>,
    bar: Option<&ProgressBar>,
) -> Run {
    let (x, y) = data();
    let onehot = y.one_hot(3).to_kind(Kind::Float);
    let (vs, net, mut opt) = model();
    let mut run = Run {
        name,
        ..Run::default()
    };
    let site = guarded.map(site);
    let r = catch_unwind(AssertUnwindSafe(|| {
        for step in 0..STEPS {
            opt.set_lr(lr(step));
            let before = site.map(|s| s.stats());
            step_fn(
                &mut opt,
                &vs,
                &net,
                &batch(&x, step),
                &targets(&onehot, step),
            );
            let g = match site {
                Some(s) => s.stats().last_grad_norm.unwrap_or(f64::NAN),
                None => f64::try_from(stepguard::grad_norm(opt.trainable_variables(), 2).unwrap())
                    .unwrap_or(f64::NAN),
            };
            if let (Some(b), Some(s)) = (before, site) {
                let a = s.stats();
                let mark = |n: u64, m: u64, v: &mut Vec<usize>| {
                    if n > m {
                        v.push(step);
                    }
                };
                mark(a.clipped, b.clipped, &mut run.clipped);
                mark(a.skipped, b.skipped, &mut run.skipped);
                mark(a.spikes, b.spikes, &mut run.spikes);
                mark(a.rollbacks, b.rollbacks, &mut run.rollbacks);
            }
            run.loss.push(clean_loss(&net, &x, &onehot));
            run.grad_norm.push(g);
            if let Some(b) = bar {
                b.set_message(format!("loss {:.4}  |g| {g:.3}", run.final_loss()));
                b.inc(1);
            }
        }
    }));
    if let Err(e) = r {
        run.stopped = Some(run.loss.len());
        if bar.is_some() {
            println!(
                "{}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            );
        }
    }
    run.accuracy = accuracy(&net, &x, &y);
    run
}

/// The four arms of the demo (quiet: no progress bars; the test runs this).
pub fn scenario(bars: bool) -> Vec<Run> {
    let arms: [(&'static str, StepFn, Option<&str>); 4] = [
        ("unguarded", train_step_unguarded, None),
        (
            "guarded, panic",
            train_step_checked,
            Some("train_step_checked"),
        ),
        ("skip + clip", train_step_skip, Some("train_step_skip")),
        (
            "skip + clip + spike + rollback",
            train_step,
            Some("train_step"),
        ),
    ];
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // a stopped arm's message is printed once, below
    let runs = arms
        .into_iter()
        .map(|(name, f, guarded)| {
            let bar = bars.then(|| {
                println!("\n== {name} ==");
                let pb = ProgressBar::new(STEPS as u64).with_prefix(name);
                pb.set_style(
                    ProgressStyle::with_template("{prefix:>30} [{bar:30}] {pos:>3}/{len} {msg}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                pb
            });
            let run = arm(name, f, guarded, bar.as_ref());
            if let Some(b) = bar {
                b.finish();
            }
            run
        })
        .collect();
    std::panic::set_hook(hook);
    runs
}

/// One line per arm: what its curve shows.
pub fn summary(r: &Run) -> String {
    let end = match (r.stopped, r.nan_at()) {
        (Some(s), _) => format!("stopped at step {s} with a diagnosis"),
        (None, Some(s)) => format!("loss NaN from step {s}, weights ruined"),
        (None, None) => format!("finished {STEPS} steps"),
    };
    format!(
        "{:<32} final loss {:>8.4}  best before the first fault {:.4}  accuracy {:.2}  ({end}; {} skipped, {} clipped, {} spikes, {} rollbacks)",
        r.name,
        r.final_loss(),
        r.best_before_fault(),
        r.accuracy,
        r.skipped.len(),
        r.clipped.len(),
        r.spikes.len(),
        r.rollbacks.len()
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(1);
    let runs = scenario(true);
    println!("\n{}", stepguard::report());
    std::fs::create_dir_all("out")?;
    let path = std::path::Path::new("out/stepguard-demo.svg");
    plot::plot(&runs, path)?;
    println!(
        "loss and grad norm per step: {}\n",
        std::fs::canonicalize(path)?.display()
    );
    // The end: one line per arm, what its curve shows.
    for r in &runs {
        println!("{}", summary(r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protected_arm_learns_again_after_every_fault() {
        let runs = scenario(false);
        let (unguarded, panic, skip, full) = (&runs[0], &runs[1], &runs[2], &runs[3]);
        // Each arm's story, as its curve tells it.
        assert_eq!(
            unguarded.nan_at(),
            Some(LOG_ZERO_BATCH),
            "unguarded: NaN at log(0)"
        );
        assert_eq!(
            panic.stopped,
            Some(LOG_ZERO_BATCH),
            "panic: stops at the first fault"
        );
        assert!(
            skip.nan_at().is_none(),
            "skip + clip keeps the weights finite"
        );
        assert!(
            skip.final_loss() > 1.5 * skip.best_before_fault(),
            "the LR spike ruins skip + clip: {}",
            summary(skip)
        );
        assert!(
            full.final_loss() <= 1.5 * full.best_before_fault(),
            "{}",
            summary(full)
        );
        let after = &full.grad_norm[LR_SPIKE.end + 10..];
        assert!(after.iter().all(|g| *g > 0.0), "learning again, not frozen");
        assert!(
            !full.spikes.is_empty() && !full.rollbacks.is_empty(),
            "{}",
            summary(full)
        );
        assert!(full.accuracy > 0.8, "{}", summary(full));
    }
}
