//! The `strip-release` feature: without debug assertions the checks compile away (no reads,
//! no failure), while clipping and epsilon protection stay. `scripts/test.sh` runs this file in
//! the normal test profile and again with `--profile strip --features strip-release`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::testing::count_host_reads;
use stepguard::{guarded_step, CHECKS_ENABLED};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

#[guarded_step(max_norm = 0.01)]
fn step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Tensor {
    let _ = vs;
    let logits = net.forward(x);
    let loss = logits.cross_entropy_for_logits(y) / (x.abs().sum(Kind::Float) * 0.0);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss
}

#[test]
fn checks_follow_the_strip_constant_and_the_math_stays() {
    let stripped = cfg!(all(feature = "strip-release", not(debug_assertions)));
    assert_eq!(CHECKS_ENABLED, !stripped);

    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 2, 8);
    let mut opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));

    // Epsilon protection stays: the division by an exact zero gives a finite loss.
    let (loss, reads) = count_host_reads(|| step(&mut opt, &vs, &net, &x, &y));
    assert!(f64::try_from(&loss).unwrap().is_finite());
    assert_eq!(
        reads,
        if stripped {
            0
        } else {
            stepguard_suite::reads_per_step(1)
        }
    );
    // Clipping stays: the grads left by the step have a global norm of at most max_norm.
    let norm = f64::try_from(stepguard::grad_norm(opt.trainable_variables(), 2).unwrap()).unwrap();
    assert!(norm <= 0.01 * (1.0 + 1e-4), "clipped to {norm}");

    // A NaN batch: caught with checks, unnoticed when stripped.
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    let r = catch_unwind(AssertUnwindSafe(|| {
        count_host_reads(|| step(&mut opt, &vs, &net, &bad, &y))
    }));
    match r {
        Ok((_, reads)) => assert!(
            stripped && reads == 0,
            "only a stripped build lets it through"
        ),
        Err(_) => assert!(!stripped, "checks on: the NaN batch is caught"),
    }
}

#[guarded_step(loss_scale = "dynamic", on_nan = "skip", spike = 6, rollback = 5)]
fn scaled_step(
    opt: &mut nn::Optimizer,
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

#[test]
fn loss_scaling_stays_and_spike_detection_and_rollback_go_with_the_checks() {
    let site = stepguard::registry()
        .find(|s| s.name() == "scaled_step")
        .expect("registered");
    let c = site.effective_config();
    assert!(c.loss_scale.is_some(), "training math stays");
    assert_eq!(c.spike.is_some(), CHECKS_ENABLED);
    assert_eq!(c.rollback.is_some(), CHECKS_ENABLED);

    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 2, 8);
    let mut opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));
    let before: Vec<Tensor> = vs.trainable_variables().iter().map(Tensor::copy).collect();
    scaled_step(&mut opt, &vs, &net, &x, &y);
    assert_eq!(
        site.state().read_loss_scale(),
        Some(65536.0),
        "the loss was scaled"
    );
    // Unscaled before the update: the parameters moved by lr * grad, not 65536x that.
    let moved = vs
        .trainable_variables()
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 0.0 && moved < 0.1, "{moved}");
}
