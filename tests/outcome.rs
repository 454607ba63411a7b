//! `stepguard::last_outcome()`: after a guarded call returns, the loop asks what the guard
//! decided for it (applied, skipped, rolled back, overflowed, no update, failed), without
//! comparing the registry's counters; under `sync = "deferred"`, one call late.

#![allow(clippy::result_large_err)]

use stepguard::optim::{AdamW, FusedOptimizer};
use stepguard::{guarded_step, last_outcome, Check, GuardError, Outcome};
use stepguard_suite::{mlp, test_device};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

/// A small MLP with weights from `sin` (no generator), and plain SGD.
fn model() -> (nn::VarStore, nn::Sequential, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = mlp(&vs.root(), 2, 16);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (_, mut t)) in vars.into_iter().enumerate() {
            let n = t.numel() as i64;
            let v = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (0.37 + i as f64)).sin()
                * 0.2;
            t.copy_(&v.reshape(t.size()).to_device(t.device()));
        }
    });
    let opt = nn::Sgd::default().build(&vs, 1e-2).unwrap();
    (vs, net, opt)
}

/// Batch `k` of 8 (64 features, labels 0..10); `nan`: one NaN input.
fn batch(k: usize, nan: bool) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(8 * 64, (Kind::Float, d)) * (0.13 + 0.29 * k as f64))
        .sin()
        .reshape([8, 64]);
    if nan {
        let _ = x.narrow(0, 2, 1).fill_(f64::NAN);
    }
    (
        x,
        (Tensor::arange(8, (Kind::Int64, d)) * 3 + k as i64).remainder(10),
    )
}

#[guarded_step(on_nan = "skip")]
fn skip_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

#[test]
fn a_skipped_call_says_so_and_the_next_healthy_one_is_applied() {
    let (vs, net, mut opt) = model();
    let (x, y) = batch(0, false);
    skip_step(&mut opt, &vs, &net, &x, &y);
    assert_eq!(last_outcome(), Some(Outcome::Applied { clipped: false }));

    let (x, y) = batch(1, true);
    let loss = skip_step(&mut opt, &vs, &net, &x, &y);
    assert!(
        loss.is_nan(),
        "the call returned normally, with the NaN loss"
    );
    let o = last_outcome().expect("recorded");
    assert_eq!(
        o,
        Outcome::Skipped {
            check: Check::Loss,
            consecutive: 1
        }
    );
    assert!(o.skipped());

    let (x, y) = batch(2, false);
    skip_step(&mut opt, &vs, &net, &x, &y);
    assert_eq!(last_outcome(), Some(Outcome::Applied { clipped: false }));
}

#[guarded_step(max_norm = 1e-6)]
fn clip_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor) {
    let _ = vs;
    opt.backward_step(&net.forward(x).square().mean(Kind::Float));
}

#[test]
fn an_applied_call_says_whether_its_grads_were_clipped() {
    let (vs, net, mut opt) = model();
    clip_step(&mut opt, &vs, &net, &batch(0, false).0);
    assert_eq!(last_outcome(), Some(Outcome::Applied { clipped: true }));
}

#[guarded_step(on_nan = "skip")]
fn mean_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    loss.double_value(&[])
}

#[test]
fn the_epoch_mean_leaves_the_skipped_batch_out() {
    const BAD: usize = 3;
    let (vs, net, mut opt) = model();
    let (mut sum, mut n, mut naive) = (0.0, 0, 0.0);
    for k in 0..6 {
        let (x, y) = batch(k, k == BAD);
        let loss = mean_step(&mut opt, &vs, &net, &x, &y);
        naive += loss;
        if !last_outcome().is_some_and(|o| o.skipped()) {
            sum += loss;
            n += 1;
        }
    }
    let mean = sum / n as f64;
    assert!(naive.is_nan(), "the skipped batch's loss is NaN");
    assert_eq!(n, 5);
    assert!(mean.is_finite(), "{mean}");

    // By hand: the same model trained, unguarded, on the good batches only (a skip leaves
    // the parameters and plain SGD as they were).
    let (vs2, net2, mut opt2) = model();
    let mut by_hand = 0.0;
    for k in (0..6).filter(|k| *k != BAD) {
        let (x, y) = batch(k, false);
        let loss = net2.forward(&x).cross_entropy_for_logits(&y);
        opt2.backward_step(&loss);
        by_hand += loss.double_value(&[]);
    }
    let _ = vs2;
    let by_hand = by_hand / 5.0;
    assert!(
        (mean - by_hand).abs() <= 1e-6 * by_hand.abs(),
        "{mean} vs {by_hand}"
    );
}

/// A parameter and a loss whose grads overflow at the default scale with `mult = 1e36`.
fn scaled_loss(vs: &nn::VarStore, mult: f64) -> Tensor {
    let p = &vs.variables()["p"];
    (p * mult).sum(Kind::Float) + (p * p).sum(Kind::Float) * 0.5
}

#[guarded_step(loss_scale = "dynamic", on_nan = "skip")]
fn scaled_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, mult: f64) {
    let loss = scaled_loss(vs, mult);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn a_loss_scaling_overflow_says_the_scale_and_its_back_off() {
    let vs = nn::VarStore::new(test_device());
    let init = Tensor::ones([4], (Kind::Float, test_device())) * 0.5;
    let _ = vs.root().var_copy("p", &init);
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    scaled_step(&mut opt, &vs, 1e36);
    let o = last_outcome().expect("recorded");
    assert_eq!(
        o,
        Outcome::Overflow {
            scale: 65536.0,
            next: 32768.0
        }
    );
    assert!(o.skipped());
    scaled_step(&mut opt, &vs, 1.0);
    assert_eq!(last_outcome(), Some(Outcome::Applied { clipped: false }));
}

#[guarded_step(on_nan = skip(max = 3), rollback = 1)]
fn rollback_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor) {
    let _ = vs;
    opt.backward_step(&net.forward(x).square().mean(Kind::Float));
}

#[test]
fn a_rolled_back_call_names_the_update_it_went_back_to() {
    let (vs, net, mut opt) = model();
    let x = batch(0, false).0;
    for _ in 0..3 {
        rollback_step(&mut opt, &vs, &net, &x);
    }
    // A NaN learning rate: finite grads, NaN parameters after update 3, found by the next
    // call's read, which restores the snapshot taken before update 3.
    opt.set_lr(f64::NAN);
    rollback_step(&mut opt, &vs, &net, &x);
    assert_eq!(last_outcome(), Some(Outcome::Applied { clipped: false }));
    opt.set_lr(1e-2);
    rollback_step(&mut opt, &vs, &net, &x);
    assert_eq!(
        last_outcome(),
        Some(Outcome::RolledBack {
            check: Check::Params,
            to_update: 3
        })
    );
    rollback_step(&mut opt, &vs, &net, &x);
    assert_eq!(last_outcome(), Some(Outcome::Applied { clipped: false }));
}

/// Gradient accumulation: a backward, no optimizer step.
#[guarded_step(on_nan = "skip")]
fn accumulate(vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    loss.backward();
}

#[test]
fn a_call_without_an_optimizer_step_made_no_update() {
    let (vs, net, _opt) = model();
    let (x, y) = batch(0, false);
    accumulate(&vs, &net, &x, &y);
    assert_eq!(last_outcome(), Some(Outcome::NoUpdate));
    // Its loss read at once: a NaN batch's grads are skipped (zeroed).
    let (x, y) = batch(1, true);
    accumulate(&vs, &net, &x, &y);
    assert!(matches!(
        last_outcome(),
        Some(Outcome::Skipped {
            check: Check::Loss,
            ..
        })
    ));
}

#[guarded_step(on_nan = "error")]
fn error_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
    Ok(())
}

#[test]
fn a_call_that_returns_the_guards_error_failed() {
    let (vs, net, mut opt) = model();
    let (x, y) = batch(0, true);
    let e = error_step(&mut opt, &vs, &net, &x, &y).expect_err("a NaN batch");
    assert_eq!(last_outcome(), Some(Outcome::Failed { check: e.check }));
    assert!(!last_outcome().is_some_and(|o| o.skipped()));
}

#[guarded_step(on_nan = "panic")]
fn panic_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor) {
    let _ = vs;
    opt.backward_step(&net.forward(x).square().mean(Kind::Float));
}

#[test]
fn a_call_that_panics_with_the_guards_error_failed() {
    let (vs, net, mut opt) = model();
    let x = batch(0, true).0;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        panic_step(&mut opt, &vs, &net, &x)
    }));
    assert!(r.is_err(), "on_nan = \"panic\"");
    assert_eq!(last_outcome(), Some(Outcome::Failed { check: Check::Loss }));
}

fn deferred_model() -> (nn::VarStore, nn::Sequential, FusedOptimizer) {
    let (vs, net, _) = model();
    let opt = AdamW::default().build(&vs, 1e-2).unwrap();
    (vs, net, opt)
}

#[guarded_step(sync = "deferred", on_nan = "skip")]
fn deferred_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

#[test]
fn under_deferred_sync_the_outcome_is_the_previous_calls_update() {
    let (vs, net, mut opt) = deferred_model();
    let mut seen = Vec::new();
    for k in 0..5 {
        let (x, y) = batch(k, k == 2);
        deferred_step(&mut opt, &vs, &net, &x, &y);
        seen.push(last_outcome());
    }
    let applied = Some(Outcome::Applied { clipped: false });
    let skipped = Some(Outcome::Skipped {
        check: Check::Loss,
        consecutive: 1,
    });
    assert_eq!(
        seen,
        [
            Some(Outcome::NoUpdate), // nothing read yet
            applied.clone(),         // call 0's update
            applied.clone(),         // call 1's (call 2, bad, is on its way)
            skipped,                 // call 2's update, skipped on the device
            applied,                 // call 3's
        ]
    );
    // The last call's verdict comes with flush: a last bad batch is its error.
    let (x, y) = batch(5, true);
    deferred_step(&mut opt, &vs, &net, &x, &y);
    let site = stepguard::registry()
        .find(|s| s.name() == "deferred_step")
        .expect("registered");
    let e = site.state().flush().expect_err("the last batch was bad");
    assert_eq!(e.check, Check::Loss);
}

#[guarded_step(on_nan = "error")]
fn error_step_x(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    opt.backward_step(&net.forward(x).square().mean(Kind::Float));
    Ok(())
}

#[test]
fn a_failure_flush_found_is_the_next_calls_with_the_same_diagnosis() {
    let (vs, net, mut opt) = model();
    let x = batch(0, false).0;
    error_step_x(&mut opt, &vs, &net, &x).unwrap();
    // A NaN learning rate: NaN parameters after this update, found by flush (before a
    // checkpoint, say).
    opt.set_lr(f64::NAN);
    error_step_x(&mut opt, &vs, &net, &x).unwrap();
    opt.set_lr(1e-2);
    let site = stepguard::registry()
        .find(|s| s.name() == "error_step_x")
        .expect("registered");
    let flushed = site
        .state()
        .flush()
        .expect_err("the update made NaN parameters");
    assert_eq!(flushed.diagnosis, stepguard::Diagnosis::Update);
    // The next call acts on that failure as it would have without the flush: the update is
    // named as the cause, not parameters "already non-finite when the step began".
    let next = error_step_x(&mut opt, &vs, &net, &x).expect_err("the parameters are NaN");
    assert_eq!(next.check, Check::Params);
    assert_eq!(next.diagnosis, stepguard::Diagnosis::Update, "{next}");
    assert_eq!(next.step, flushed.step, "{next}");
}
