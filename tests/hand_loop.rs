//! A hand-written [`StepGuard`] loop, the documented escape hatch, applies the same policy as
//! `#[guarded_step]`: with `on_nan = "skip"` and `rollback = 1` a bad batch is skipped (grads
//! zeroed, BatchNorm statistics restored), an update that made the parameters NaN is rolled
//! back, and both end with the same bits.

use stepguard::policy::SkipReason;
use stepguard::{guarded_step, Config, Decision, GuardState, OnNan, StepGuard};
use stepguard_suite::{test_device, var_bits};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Kind, Tensor};

fn model() -> (nn::VarStore, nn::SequentialT, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = nn::seq_t()
        .add(nn::linear(vs.root() / "fc", 4, 6, Default::default()))
        .add(nn::batch_norm1d(vs.root() / "bn", 6, Default::default()))
        .add(nn::linear(vs.root() / "out", 6, 3, Default::default()));
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, mut t)) in vars.into_iter().enumerate() {
            if name.contains("running") {
                continue;
            }
            let n = t.numel() as i64;
            let v =
                (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (0.4 + i as f64)).sin() * 0.4;
            t.copy_(&v.reshape(t.size()).to_device(t.device()));
        }
    });
    let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    (vs, net, opt)
}

fn batch(k: usize) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(32, (Kind::Float, d)) * (0.15 + k as f64 * 0.29))
        .sin()
        .reshape([8, 4]);
    if k == POISONED {
        let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    }
    (x, Tensor::arange(8, (Kind::Int64, d)).remainder(3))
}

/// The batch with a NaN, and the update run with a NaN learning rate.
const POISONED: usize = 2;
const NAN_LR: usize = 4;

#[guarded_step(on_nan = "skip", rollback = 1)]
fn attr_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

fn grads_zero(vs: &nn::VarStore) -> bool {
    vs.trainable_variables().iter().all(|p| {
        let g = p.grad();
        !g.defined() || g.abs().sum(Kind::Float).double_value(&[]) == 0.0
    })
}

fn buffers(vs: &nn::VarStore) -> Vec<(String, Vec<u32>)> {
    var_bits(vs)
        .into_iter()
        .filter(|(n, _)| n.contains("running"))
        .collect()
}

#[test]
fn a_hand_written_loop_skips_restores_and_rolls_back_like_the_attribute() {
    // The attribute.
    let (avs, anet, mut aopt) = model();
    let mut attr_buffers = Vec::new();
    for k in 0..8 {
        aopt.set_lr(if k == NAN_LR { f64::NAN } else { 0.1 });
        let (x, y) = batch(k);
        let before = buffers(&avs);
        attr_step(&mut aopt, &avs, &anet, &x, &y);
        if k == POISONED {
            assert!(grads_zero(&avs), "the skip zeroed the grads");
            assert_eq!(buffers(&avs), before, "the skip restored the buffers");
        }
        attr_buffers.push(buffers(&avs));
    }
    let site = stepguard::registry()
        .find(|s| s.name() == "attr_step")
        .unwrap();
    let stats = site.stats();
    assert_eq!((stats.skipped, stats.rollbacks, stats.failures), (1, 1, 0));

    // The same by hand.
    let (vs, net, mut opt) = model();
    let config = Config::DEFAULT.with_on_nan(OnNan::Skip).with_rollback(1);
    let state = GuardState::new();
    let params = opt.trainable_variables();
    let mut skips = Vec::new();
    assert_eq!(attr_buffers.len(), 8);
    for (k, attr_after) in attr_buffers.iter().enumerate() {
        opt.set_lr(if k == NAN_LR { f64::NAN } else { 0.1 });
        let (x, y) = batch(k);
        let before = buffers(&vs);
        let mut guard = StepGuard::begin(&config, "by_hand", &state).with_names(&vs);
        let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
        guard.loss(&loss);
        opt.zero_grad();
        loss.backward();
        match guard.decide(&params) {
            Decision::Proceed => {
                guard.refresh_snapshot(&params, Vec::new);
                opt.step();
                guard.after_update(&params);
            }
            Decision::Skip(s) => {
                assert!(grads_zero(&vs), "update {k}: the skip zeroed the grads");
                if k == POISONED {
                    assert_eq!(buffers(&vs), before, "the skip restored the buffers");
                }
                skips.push((k, s.reason));
            }
            Decision::Fail(e) => panic!("update {k}: {e}"),
            _ => unreachable!(),
        }
        guard.finish();
        assert_eq!(&buffers(&vs), attr_after, "buffers after batch {k}");
    }
    state.flush().unwrap();
    assert_eq!(skips.len(), 2, "{skips:?}");
    assert_eq!(skips[0], (POISONED, SkipReason::Policy { consecutive: 1 }));
    assert!(
        matches!(skips[1], (5, SkipReason::RolledBack { .. })),
        "{skips:?}"
    );
    assert_eq!(var_bits(&vs), var_bits(&avs), "same bits as the attribute");
}
