//! The stepguard demo: one model, one fault, trained three ways side by side.
//!
//! A 2-32-32-3 MLP learns three Gaussian blobs with a hand-written cross-entropy,
//! `-(onehot * softmax(logits).log())`. At step 20 a learning-rate spike (x10000, a broken
//! warm-up schedule) drives the logits apart until the softmax underflows to exact zeros:
//! `log(0)` is `-inf`, `0 * -inf` is NaN.
//!
//! 1. unguarded: the loss turns NaN and the weights are ruined;
//! 2. `#[guarded_step]` with `on_nan = "panic"`, epsilon protection off: stops at the first bad
//!    step and says which check, which tensor, and what to try;
//! 3. `#[guarded_step(max_norm = 5, on_nan = "skip")]` with epsilon protection: finishes.

use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const STEPS: i64 = 200;
const SPIKE: std::ops::Range<i64> = 20..25;

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(42);
    let n = 300;
    let centers = Tensor::from_slice2(&[[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]]);
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
    let x =
        centers.index_select(0, &labels) + Tensor::randn([n, 2], (Kind::Float, Device::Cpu)) * 0.6;
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

fn lr(step: i64) -> f64 {
    if SPIKE.contains(&step) {
        500.0
    } else {
        0.05
    }
}

/// The step as people write it. The same body three times: plain, and under two attributes.
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
    #[guarded_step(max_norm = 5, on_nan = "skip", max_skips = 10)]
    train_step
);

fn accuracy(net: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    let pred = tch::no_grad(|| net.forward(x).argmax(-1, false));
    f64::try_from(pred.eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float)).unwrap()
}

fn finite_tensors(vs: &nn::VarStore) -> usize {
    vs.variables()
        .values()
        .filter(|t| bool::try_from(t.isfinite().all()).unwrap())
        .count()
}

fn main() {
    tch::set_num_threads(1);
    let (x, y) = data();
    let onehot = y.one_hot(3).to_kind(Kind::Float);

    println!("== 1. unguarded ==");
    let (vs, net, mut opt) = model();
    let mut first_nan = None;
    for step in 0..STEPS {
        opt.set_lr(lr(step));
        let loss = train_step_unguarded(&mut opt, &vs, &net, &x, &onehot);
        if !loss.is_finite() && first_nan.is_none() {
            first_nan = Some(step);
        }
    }
    match first_nan {
        Some(s) => println!(
            "loss became NaN at step {s}; {} of {} weight tensors are ruined; accuracy {:.2}",
            vs.variables().len() - finite_tensors(&vs),
            vs.variables().len(),
            accuracy(&net, &x, &y)
        ),
        None => println!("no NaN; accuracy {:.2}", accuracy(&net, &x, &y)),
    }

    println!("\n== 2. #[guarded_step(protect = \"none\")]: stop at the first bad step ==");
    let (vs, net, mut opt) = model();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        println!("{msg}");
    }));
    let r = catch_unwind(AssertUnwindSafe(|| {
        for step in 0..STEPS {
            opt.set_lr(lr(step));
            train_step_checked(&mut opt, &vs, &net, &x, &onehot);
        }
    }));
    let _ = std::panic::take_hook();
    println!(
        "{}; weights all finite: {}",
        if r.is_err() { "stopped" } else { "finished" },
        finite_tensors(&vs) == vs.variables().len()
    );

    println!("\n== 3. #[guarded_step(max_norm = 5, on_nan = \"skip\")], epsilon-protected log ==");
    let (vs, net, mut opt) = model();
    let mut last = f64::NAN;
    for step in 0..STEPS {
        opt.set_lr(lr(step));
        last = train_step(&mut opt, &vs, &net, &x, &onehot);
    }
    println!(
        "finished: final loss {last:.4}, accuracy {:.2}",
        accuracy(&net, &x, &y)
    );

    println!("\n{}", stepguard::report());
}
