//! The stepguard demo: one model, one fault, trained unguarded and guarded side by side.
//!
//! A 2-32-32-3 MLP learns three Gaussian blobs with a hand-written cross-entropy,
//! `-(onehot * softmax(logits).log())`. At step 60 a learning-rate spike (x400, a bad warm-up
//! schedule) drives the logits apart until the softmax underflows to exact zeros: `log(0)` is
//! `-inf`, `0 * -inf` is NaN, and an unguarded run is ruined. The guarded run protects the log
//! with an epsilon, clips the global gradient norm and skips any step whose checks fail.

use stepguard::{Config, GuardState, OnNan, StepGuard};
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

fn model() -> (nn::VarStore, nn::Sequential) {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let net = nn::seq()
        .add(nn::linear(&p / "layer1", 2, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "layer2", 32, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "out", 32, 3, Default::default()));
    (vs, net)
}

fn lr(step: i64) -> f64 {
    if SPIKE.contains(&step) {
        500.0
    } else {
        0.05
    }
}

fn accuracy(net: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    let pred = tch::no_grad(|| net.forward(x).argmax(-1, false));
    f64::try_from(pred.eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float)).unwrap()
}

fn main() {
    tch::set_num_threads(1);
    let (x, y) = data();
    let onehot = y.one_hot(3).to_kind(Kind::Float);

    println!("== 1. unguarded ==");
    let (vs, net) = model();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let mut first_nan = None;
    let mut last_loss = f64::NAN;
    for step in 0..STEPS {
        opt.set_lr(lr(step));
        let loss = -(&onehot * net.forward(&x).softmax(-1, Kind::Float).log())
            .sum_dim_intlist(-1, false, None)
            .mean(None);
        opt.backward_step(&loss);
        last_loss = f64::try_from(&loss).unwrap();
        if !last_loss.is_finite() && first_nan.is_none() {
            first_nan = Some(step);
        }
    }
    let bad_weights = vs
        .variables()
        .values()
        .filter(|t| !bool::try_from(t.isfinite().all()).unwrap())
        .count();
    match first_nan {
        Some(s) => println!(
            "loss became NaN at step {s}; {bad_weights} of {} weight tensors are non-finite, accuracy {:.2}",
            vs.variables().len(),
            accuracy(&net, &x, &y)
        ),
        None => println!("no NaN (final loss {last_loss:.4})"),
    }

    println!("\n== 2. guarded: epsilon-protected log, clipping, skip on NaN ==");
    let (vs, net) = model();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let config = Config {
        max_norm: Some(5.0),
        on_nan: OnNan::Skip,
        ..Config::DEFAULT
    };
    let mut state = GuardState::new();
    let params = opt.trainable_variables();
    let (mut skipped, mut clipped) = (0, 0);
    for step in 0..STEPS {
        opt.set_lr(lr(step));
        let mut g = StepGuard::begin(&config, "train_step", &mut state).with_names(&vs);
        let p = net.forward(&x).softmax(-1, Kind::Float);
        let loss = -(&onehot * stepguard::safe_log(&p, config.eps))
            .sum_dim_intlist(-1, false, None)
            .mean(None);
        g.loss(&loss);
        opt.zero_grad();
        loss.backward();
        match g.before_update(&params) {
            Ok(norm) => {
                if norm.is_some_and(|n| f64::try_from(&n).unwrap() > 5.0) {
                    clipped += 1;
                }
                opt.step();
                g.after_update(&params);
                g.defer(&mut state);
            }
            Err(e) => {
                skipped += 1;
                if skipped == 1 {
                    println!("skipping step {step}:\n{e}");
                }
                opt.zero_grad();
            }
        }
        last_loss = f64::try_from(&loss).unwrap();
    }
    println!(
        "finished: final loss {last_loss:.4}, accuracy {:.2}, {clipped} steps clipped, {skipped} skipped",
        accuracy(&net, &x, &y)
    );
}
