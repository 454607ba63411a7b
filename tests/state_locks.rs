//! What one update changes in its `GuardState` changes at once: the state is locked once when
//! a call begins, and each update takes its parameters' state under one lock and gives it back,
//! with everything it changed (counters, pending check, skips, spike statistics, rollback
//! snapshot, the scaler's notes), under one more. Nothing in between touches the state.

use stepguard::optim::{AdamW, FusedOptimizer};
use stepguard::testing::state_locks;
use stepguard::{guarded_step, GuardState};
use stepguard_suite::{serial, test_device};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

fn net(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "fc", 4, 6, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "out", 6, 3, Default::default()))
}

fn batch(k: usize, bad: bool) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(32, (Kind::Float, d)) * (0.15 + k as f64 * 0.29))
        .sin()
        .reshape([8, 4]);
    if bad {
        let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    }
    (x, Tensor::arange(8, (Kind::Int64, d)).remainder(3))
}

static EVERY: GuardState = GuardState::new();
static DEFERRED: GuardState = GuardState::new();
static SCALED: GuardState = GuardState::new();

#[guarded_step(
    max_norm = 5,
    checks = "loss,params,grads",
    on_nan = "skip",
    spike(sigmas = 6, warmup = 2),
    rollback = 2,
    state = EVERY
)]
fn every_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[guarded_step(sync = "deferred", max_norm = 5, on_nan = "skip", state = DEFERRED)]
fn deferred(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[guarded_step(loss_scale = "dynamic", max_norm = 5, on_nan = "skip", state = SCALED)]
fn scaled(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

/// The locks each call took, for good batches and a bad one (a skip). One test at a time: a
/// failed call is replayed only while no other call is (the replay's observer is the
/// process's), and a replay takes locks of its own.
fn locks_per_call(state: &GuardState, mut call: impl FnMut(usize, bool)) -> Vec<u64> {
    let _serial = serial();
    (0..6)
        .map(|k| {
            let before = state_locks(state);
            call(k, k == 3);
            state_locks(state) - before
        })
        .collect()
}

#[test]
fn an_update_locks_its_state_once_to_take_it_and_once_to_give_it_back() {
    let vs = nn::VarStore::new(test_device());
    let n = net(&vs);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let locks = locks_per_call(&EVERY, |k, bad| {
        let (x, y) = batch(k, bad);
        every_step(&mut opt, &vs, &n, &x, &y);
    });
    // The call's start, the update's state taken, given back. The bad batch's call runs twice
    // (its first failure is replayed under the ATen observer): the first run's three, then the
    // replay's start, the call counted as the first run's, its update's state taken and given
    // back.
    assert_eq!(locks, vec![3, 3, 3, 7, 3, 3], "locks per call");
    assert!(
        EVERY.has_pending(),
        "the last update's check is kept for the next"
    );
}

#[test]
fn a_deferred_update_locks_its_state_once_to_take_it_and_once_to_give_it_back() {
    let vs = nn::VarStore::new(test_device());
    let n = net(&vs);
    let mut opt = AdamW::default().build(&vs, 1e-2).unwrap();
    let locks = locks_per_call(&DEFERRED, |k, bad| {
        let (x, y) = batch(k, bad);
        // The skip is read (and returned as `Ok`) one update late.
        deferred(&mut opt, &vs, &n, &x, &y);
    });
    assert_eq!(locks, vec![3; 6], "locks per call");
    DEFERRED.flush().unwrap();
}

#[test]
fn a_scaled_update_notes_the_scaler_when_it_gives_its_state_back() {
    let vs = nn::VarStore::new(test_device());
    let n = net(&vs);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let locks = locks_per_call(&SCALED, |k, bad| {
        let (x, y) = batch(k, bad);
        scaled(&mut opt, &vs, &n, &x, &y);
    });
    // + the loss scaled (the scaler), + the scale updated when the call ends. The bad batch's
    // call is replayed: 3 + 1 for the first run (its loss scaled), 5 for the replay (its start,
    // the call counted as the first's, the loss scaled, the state taken and given back); no
    // scale update (a NaN loss is not an overflow: the scale stays).
    assert_eq!(locks, vec![5, 5, 5, 9, 5, 5], "locks per call");
    assert!(SCALED.loss_scale().is_some());
}
