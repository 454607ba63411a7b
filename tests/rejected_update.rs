//! A rejected update leaves nothing that reaches a later one: the grads of a batch the guard
//! refused (`on_nan = "error"`, `"panic"`, by hand) are cleared, so the next good batch trains
//! as if the bad one never came, whatever the checks and the shape of the body.
//!
//! Each test here failed before the rejection cleared the grads: with
//! `backward(); step(); zero_grad()` every later batch failed too (backward accumulated onto
//! the NaN grads), and under gradient accumulation with `checks = "loss"` the next window's
//! update wrote NaN into the parameters without an error.

#![allow(clippy::result_large_err)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::{guarded_step, Check, Config, Decision, GuardError, GuardState, StepGuard};
use stepguard_suite::{test_device, var_bits};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

fn model() -> (nn::VarStore, nn::Linear, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (_, mut t)) in vars.into_iter().enumerate() {
            let n = t.numel() as i64;
            let v =
                (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (0.7 + i as f64)).sin() * 0.3;
            t.copy_(&v.reshape(t.size()).to_device(t.device()));
        }
    });
    let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    (vs, net, opt)
}

fn batch(k: usize) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(32, (Kind::Float, d)) * (0.2 + k as f64 * 0.31))
        .sin()
        .reshape([8, 4]);
    (x, Tensor::arange(8, (Kind::Int64, d)).remainder(3))
}

fn poisoned(k: usize) -> (Tensor, Tensor) {
    let (x, y) = batch(k);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    (x, y)
}

/// The state of one guarded function of this file (a global `flush()` would also read the
/// checks of the tests running in parallel).
fn own_state(function: &str) -> &'static GuardState {
    stepguard::registry()
        .find(|s| s.name() == function)
        .expect("a guarded function of this file")
        .state()
}

fn finite(vs: &nn::VarStore) -> bool {
    vs.trainable_variables().iter().all(|t| {
        t.isfinite()
            .all()
            .to_device(tch::Device::Cpu)
            .int64_value(&[])
            != 0
    })
}

// --- (a) `backward(); step(); zero_grad()`: the error leaves before `zero_grad` ------------

#[guarded_step(on_nan = "error")]
fn step_then_zero(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    loss.backward();
    opt.step();
    opt.zero_grad();
    Ok(())
}

#[guarded_step]
fn step_then_zero_panics(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    loss.backward();
    opt.step();
    opt.zero_grad();
}

#[guarded_step(checks = "loss", on_nan = "error")]
fn step_then_zero_loss_only(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    loss.backward();
    opt.step();
    opt.zero_grad();
    Ok(())
}

/// The same three good batches, without the bad one.
fn reference(good: &[usize]) -> Vec<(String, Vec<u32>)> {
    let (vs, net, mut opt) = model();
    for &k in good {
        let (x, y) = batch(k);
        let loss = net.forward(&x).cross_entropy_for_logits(&y);
        loss.backward();
        opt.step();
        opt.zero_grad();
    }
    var_bits(&vs)
}

#[test]
fn after_an_error_the_next_good_batches_train_as_if_the_bad_one_never_came() {
    let (vs, net, mut opt) = model();
    let (x, y) = poisoned(0);
    let err = step_then_zero(&mut opt, &vs, &net, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Loss, "{err}");
    for k in 1..4 {
        let (x, y) = batch(k);
        step_then_zero(&mut opt, &vs, &net, &x, &y)
            .unwrap_or_else(|e| panic!("good batch {k} refused after the bad one: {e}"));
    }
    assert!(finite(&vs));
    assert_eq!(var_bits(&vs), reference(&[1, 2, 3]));
    own_state("step_then_zero").flush().unwrap();
}

#[test]
fn after_a_caught_panic_the_next_good_batches_train_as_if_the_bad_one_never_came() {
    let (vs, net, mut opt) = model();
    let (x, y) = poisoned(0);
    let r = catch_unwind(AssertUnwindSafe(|| {
        step_then_zero_panics(&mut opt, &vs, &net, &x, &y)
    }));
    assert!(r.is_err(), "the bad batch panics");
    for k in 1..4 {
        let (x, y) = batch(k);
        let r = catch_unwind(AssertUnwindSafe(|| {
            step_then_zero_panics(&mut opt, &vs, &net, &x, &y)
        }));
        assert!(r.is_ok(), "good batch {k} panicked after the bad one");
    }
    assert_eq!(var_bits(&vs), reference(&[1, 2, 3]));
    own_state("step_then_zero_panics").flush().unwrap();
}

#[test]
fn with_the_loss_check_only_an_error_leaves_no_nan_grads_behind() {
    let (vs, net, mut opt) = model();
    let (x, y) = poisoned(0);
    let err = step_then_zero_loss_only(&mut opt, &vs, &net, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Loss, "{err}");
    for k in 1..4 {
        let (x, y) = batch(k);
        step_then_zero_loss_only(&mut opt, &vs, &net, &x, &y).unwrap();
    }
    assert!(finite(&vs), "no NaN written into the parameters");
    assert_eq!(var_bits(&vs), reference(&[1, 2, 3]));
}

// --- (b) gradient accumulation with `checks = "loss"` --------------------------------------

#[guarded_step(checks = "loss", on_nan = "error")]
fn accumulate(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
    i: usize,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y) / 4.0;
    loss.backward();
    if i % 4 == 3 {
        opt.step();
        opt.zero_grad();
    }
    Ok(())
}

#[guarded_step(checks = "loss")]
fn accumulate_panics(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
    i: usize,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y) / 4.0;
    loss.backward();
    if i % 4 == 3 {
        opt.step();
        opt.zero_grad();
    }
}

/// One good window of four micro-batches (4..8), accumulated by hand.
fn reference_window() -> Vec<(String, Vec<u32>)> {
    let (vs, net, mut opt) = model();
    for k in 4..8 {
        let (x, y) = batch(k);
        (net.forward(&x).cross_entropy_for_logits(&y) / 4.0).backward();
    }
    opt.step();
    opt.zero_grad();
    var_bits(&vs)
}

#[test]
fn a_rejected_window_leaves_no_nan_grads_for_the_next_window() {
    let (vs, net, mut opt) = model();
    for i in 0..8 {
        let (x, y) = if i == 1 { poisoned(i) } else { batch(i) };
        let r = accumulate(&mut opt, &vs, &net, &x, &y, i);
        match i {
            3 => assert_eq!(r.unwrap_err().check, Check::Loss),
            _ => r.unwrap_or_else(|e| panic!("micro-batch {i}: {e}")),
        }
    }
    assert!(finite(&vs), "the next window's update wrote NaN");
    assert_eq!(var_bits(&vs), reference_window());
}

#[test]
fn a_rejected_window_that_panicked_leaves_no_nan_grads_for_the_next_window() {
    let (vs, net, mut opt) = model();
    for i in 0..8 {
        let (x, y) = if i == 1 { poisoned(i) } else { batch(i) };
        let r = catch_unwind(AssertUnwindSafe(|| {
            accumulate_panics(&mut opt, &vs, &net, &x, &y, i)
        }));
        assert_eq!(r.is_err(), i == 3, "micro-batch {i}");
    }
    assert!(finite(&vs), "the next window's update wrote NaN");
    assert_eq!(var_bits(&vs), reference_window());
}

// --- by hand ----------------------------------------------------------------------------

#[test]
fn a_hand_written_loop_that_goes_on_after_an_error_trains_on_good_batches() {
    let (vs, net, mut opt) = model();
    let config = Config::DEFAULT;
    let state = GuardState::new();
    let params = opt.trainable_variables();
    let mut errors = 0;
    for k in 0..4 {
        let (x, y) = if k == 0 { poisoned(k) } else { batch(k) };
        let mut guard = StepGuard::begin(&config, "by_hand", &state).with_names(&vs);
        let loss = net.forward(&x).cross_entropy_for_logits(&y);
        guard.loss(&loss);
        loss.backward();
        match guard.decide(&params) {
            Decision::Proceed => {
                opt.step();
                guard.after_update(&params);
                opt.zero_grad();
            }
            Decision::Fail(e) => {
                assert_eq!(k, 0, "good batch {k} refused: {e}");
                errors += 1;
            }
            other => panic!("{other:?}"),
        }
        guard.finish();
    }
    state.flush().unwrap();
    assert_eq!(errors, 1);
    assert_eq!(var_bits(&vs), reference(&[1, 2, 3]));
}

// --- `sync = "deferred"`: the update refused with the earlier one's error -------------------

#[guarded_step(sync = "deferred", on_nan = "error")]
fn deferred_step_then_zero(
    opt: &mut stepguard::optim::FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    loss.backward();
    opt.step();
    opt.zero_grad();
    Ok(())
}

fn fused_model() -> (nn::VarStore, nn::Linear, stepguard::optim::FusedOptimizer) {
    let (vs, net, _) = model();
    let opt = stepguard::optim::Sgd::default().build(&vs, 0.1).unwrap();
    (vs, net, opt)
}

#[test]
fn under_deferred_the_update_refused_with_the_earlier_error_leaves_no_grads_behind() {
    let (vs, net, mut opt) = fused_model();
    let (x, y) = poisoned(0);
    deferred_step_then_zero(&mut opt, &vs, &net, &x, &y).expect("read one update late");
    let (x, y) = batch(1);
    let err = deferred_step_then_zero(&mut opt, &vs, &net, &x, &y).unwrap_err();
    assert_eq!((err.check, err.step), (Check::Loss, 0), "{err}");
    for k in 2..4 {
        let (x, y) = batch(k);
        deferred_step_then_zero(&mut opt, &vs, &net, &x, &y).unwrap();
    }
    own_state("deferred_step_then_zero").flush().unwrap();
    // Batch 1 was refused with the error: only batches 2 and 3 trained.
    let (rvs, rnet, mut ropt) = fused_model();
    for k in 2..4 {
        let (x, y) = batch(k);
        rnet.forward(&x).cross_entropy_for_logits(&y).backward();
        ropt.step();
        ropt.zero_grad();
    }
    assert_eq!(var_bits(&vs), var_bits(&rvs));
}
