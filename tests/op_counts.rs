//! The guard dispatches a constant number of ATen operators per step, whatever the number of
//! tensors: the multi-tensor path (`_foreach_norm`, `_foreach_mul_` through the ATen shim).
//! Run on the ATen path (the CPU fast path off) so the count is what a GPU step dispatches.

#![allow(clippy::result_large_err)]

use stepguard::testing::{count_aten_ops, set_cpu_fast_path, set_multi_tensor};
use stepguard::{guarded_step, Config, GuardState, StepGuard};
use stepguard_suite::{mlp, test_device};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

fn model(layers: usize) -> (nn::VarStore, nn::Sequential, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = mlp(&vs.root(), layers, 8);
    let opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    (vs, net, opt)
}

fn batch() -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(4 * 64, (Kind::Float, d)) * 0.1)
        .sin()
        .reshape([4, 64]);
    (x, Tensor::arange(4, (Kind::Int64, d)))
}

/// Operators of the guard alone in one step (loss check, clipping, grads and params checks,
/// the read, the params check after the update), through the runtime API.
fn guard_ops(layers: usize) -> (usize, u64) {
    let (vs, net, mut opt) = model(layers);
    let (x, y) = batch();
    let config = Config::DEFAULT.with_max_norm(0.01);
    let state = GuardState::new();
    let params = opt.trainable_variables();
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    opt.zero_grad();
    loss.backward();
    let (r, ops) = count_aten_ops(|| {
        let mut g = StepGuard::begin(&config, "count", &state).with_names(&vs);
        g.loss(&loss);
        let r = g.before_update(&params).map(|_| ());
        g.after_update(&params);
        r
    });
    r.unwrap();
    (params.len(), ops)
}

#[guarded_step(max_norm = 0.01)]
fn guarded(
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

fn plain(opt: &mut nn::Optimizer, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// Operators a `#[guarded_step]` call dispatches beyond its unannotated twin.
fn attribute_ops(layers: usize) -> u64 {
    let (vs, net, mut opt) = model(layers);
    let (x, y) = batch();
    // Warm both (the first call of a site registers its state) and count the second calls.
    guarded(&mut opt, &vs, &net, &x, &y);
    plain(&mut opt, &net, &x, &y);
    let ((), g) = count_aten_ops(|| guarded(&mut opt, &vs, &net, &x, &y));
    let ((), p) = count_aten_ops(|| plain(&mut opt, &net, &x, &y));
    g - p
}

#[test]
fn the_guard_dispatches_a_constant_number_of_operators() {
    set_cpu_fast_path(false);
    let counts: Vec<(usize, u64)> = [8, 50, 200].iter().map(|l| guard_ops(*l)).collect();
    let attr: Vec<u64> = [8, 50, 200].iter().map(|l| attribute_ops(*l)).collect();
    set_cpu_fast_path(true);
    let tensors: Vec<usize> = counts.iter().map(|c| c.0).collect();
    assert_eq!(tensors, vec![18, 102, 402]);
    let ops: Vec<u64> = counts.iter().map(|c| c.1).collect();
    println!("guard operators per step with 18/102/402 tensors: {ops:?}; #[guarded_step] beyond its twin: {attr:?}");
    assert!(ops[0] > 0, "the counter sees the guard's operators");
    assert!(ops.iter().all(|o| *o == ops[0]), "constant: {ops:?}");
    assert!(attr.iter().all(|o| *o == attr[0]), "constant: {attr:?}");
    assert!(
        ops[0] < 60,
        "a few dozen operators, not one per tensor: {ops:?}"
    );
}

#[test]
fn without_the_multi_tensor_operators_the_count_grows_with_the_tensors() {
    set_cpu_fast_path(false);
    set_multi_tensor(false);
    let ops: Vec<u64> = [8, 50, 200].iter().map(|l| guard_ops(*l).1).collect();
    set_multi_tensor(true);
    set_cpu_fast_path(true);
    println!("per-tensor path: {ops:?}");
    assert!(ops[0] < ops[1] && ops[1] < ops[2], "{ops:?}");
    assert!(ops[2] > 9 * 402, "about nine operators per tensor: {ops:?}");
}

#[test]
fn the_counter_counts_what_it_is_given() {
    let t = Tensor::ones([3], (Kind::Float, test_device()));
    let ((), none) = count_aten_ops(|| {});
    let (_, three) = count_aten_ops(|| (&t + 1.0, &t * 2.0, t.sum(Kind::Float)));
    assert_eq!(none, 0);
    assert_eq!(three, 3);
}
