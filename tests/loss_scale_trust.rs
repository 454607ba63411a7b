//! Loss scaling never leaves a scaled gradient behind, and never unscales one twice: each of
//! these steps, under `loss_scale = "dynamic"`, ends with the parameters bitwise equal to the
//! same step without it (the scale is a power of two, so scaling and unscaling are exact).

use stepguard::optim::{FusedOptimizer, Sgd};
use stepguard::{guarded_step, GuardState};
use stepguard_suite::{test_device, var_bits};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

fn model(seed: f64) -> nn::VarStore {
    let vs = nn::VarStore::new(test_device());
    let n = 12;
    let init = (Tensor::arange(n, (Kind::Float, test_device())) * (0.37 + seed)).sin();
    let _ = vs.root().var_copy("w", &init.reshape([3, 4]));
    vs
}

fn loss_of(vs: &[&nn::VarStore], k: usize) -> Tensor {
    let mut loss = Tensor::zeros([], (Kind::Float, test_device()));
    for (i, v) in vs.iter().enumerate() {
        let w = &v.variables()["w"];
        let x = (Tensor::arange(12, (Kind::Float, test_device())) * (0.71 + i as f64) + k as f64)
            .cos()
            .reshape([3, 4]);
        loss = loss + (w * x).sum(Kind::Float) * 3.0 + (w * w).sum(Kind::Float);
    }
    loss
}

macro_rules! twins {
    ($scaled:ident, $plain:ident, ($($args:tt)*), |$($p:ident: $t:ty),*| $body:block) => {
        #[guarded_step(loss_scale = "dynamic", $($args)*)]
        fn $scaled($($p: $t),*) $body
        #[guarded_step($($args)*)]
        fn $plain($($p: $t),*) $body
    };
}

twins!(
    two_opts_scaled,
    two_opts_plain,
    (),
    |a: &mut nn::Optimizer,
     b: &mut nn::Optimizer,
     va: &nn::VarStore,
     vb: &nn::VarStore,
     k: usize| {
        let loss = loss_of(&[va, vb], k);
        a.zero_grad();
        b.zero_grad();
        loss.backward();
        a.step();
        b.step();
    }
);

#[test]
fn two_optimizers_on_one_backward_each_unscale_their_grads() {
    let run = |scaled: bool| {
        let (va, vb) = (model(0.0), model(1.0));
        let mut a = nn::Sgd::default().build(&va, 0.1).unwrap();
        let mut b = nn::Sgd::default().build(&vb, 0.1).unwrap();
        for k in 0..4 {
            if scaled {
                two_opts_scaled(&mut a, &mut b, &va, &vb, k);
            } else {
                two_opts_plain(&mut a, &mut b, &va, &vb, k);
            }
        }
        (var_bits(&va), var_bits(&vb))
    };
    assert_eq!(run(true), run(false));
}

twins!(
    twice_scaled,
    twice_plain,
    (max_norm = 2),
    |o: &mut nn::Optimizer, vs: &nn::VarStore, k: usize| {
        let loss = loss_of(&[vs], k);
        o.zero_grad();
        loss.backward();
        o.step();
        o.step(); // the same grads again (clipped in place by the first update)
    }
);

#[test]
fn grads_updated_twice_are_unscaled_once() {
    let run = |scaled: bool| {
        let vs = model(0.0);
        let mut o = nn::Sgd::default().build(&vs, 0.1).unwrap();
        for k in 0..3 {
            if scaled {
                twice_scaled(&mut o, &vs, k);
            } else {
                twice_plain(&mut o, &vs, k);
            }
        }
        var_bits(&vs)
    };
    assert_eq!(run(true), run(false));
}

twins!(
    fused_twice_scaled,
    fused_twice_plain,
    (sync = "deferred"),
    |o: &mut FusedOptimizer, vs: &nn::VarStore, k: usize| {
        let loss = loss_of(&[vs], k);
        o.zero_grad();
        loss.backward();
        o.step(); // the kernel unscales the grads in place
        o.step();
    }
);

#[test]
fn grads_unscaled_by_the_fused_kernel_are_not_unscaled_again() {
    let run = |scaled: bool| {
        let vs = model(0.0);
        let mut o = Sgd::default().build(&vs, 0.1).unwrap();
        for k in 0..3 {
            if scaled {
                fused_twice_scaled(&mut o, &vs, k);
            } else {
                fused_twice_plain(&mut o, &vs, k);
            }
        }
        stepguard::flush().unwrap();
        var_bits(&vs)
    };
    assert_eq!(run(true), run(false));
}

/// A backward the rewrite cannot see (inside another function): its loss is not scaled, so
/// its grads must not be unscaled either.
fn hidden_backward(loss: &Tensor) {
    loss.backward();
}

twins!(
    hidden_scaled,
    hidden_plain,
    (),
    |o: &mut nn::Optimizer, vs: &nn::VarStore, k: usize| {
        let loss = loss_of(&[vs], k);
        o.zero_grad();
        if k == 1 {
            loss.backward();
        } else {
            hidden_backward(&loss);
        }
        o.step();
    }
);

#[test]
fn grads_of_an_unscaled_backward_are_left_as_they_are() {
    let run = |scaled: bool| {
        let vs = model(0.0);
        let mut o = nn::Sgd::default().build(&vs, 0.1).unwrap();
        for k in 0..4 {
            if scaled {
                hidden_scaled(&mut o, &vs, k);
            } else {
                hidden_plain(&mut o, &vs, k);
            }
        }
        var_bits(&vs)
    };
    assert_eq!(run(true), run(false));
}

twins!(
    late_scaled,
    late_plain,
    (),
    |o: &mut nn::Optimizer, vs: &nn::VarStore, k: usize| {
        // The update of the previous call's grads first, then this call's backward.
        o.step();
        o.zero_grad();
        loss_of(&[vs], k).backward();
    }
);

#[test]
fn a_backward_after_the_step_is_unscaled_by_the_next_call() {
    let run = |scaled: bool| {
        let vs = model(0.0);
        let mut o = nn::Sgd::default().build(&vs, 0.1).unwrap();
        // Many calls: tch's zero_grad sets grads to None, and the next backward may allocate
        // the new grad where the old one was (a grad is not known by its address alone).
        for k in 0..100 {
            if scaled {
                late_scaled(&mut o, &vs, k);
            } else {
                late_plain(&mut o, &vs, k);
            }
        }
        var_bits(&vs)
    };
    assert_eq!(run(true), run(false));
}

static SHARED: GuardState = GuardState::new();

/// Gradient accumulation split in two functions that share the state (and so the scaler).
#[guarded_step(loss_scale = "dynamic", state = SHARED)]
fn accumulate(vs: &nn::VarStore, k: usize) {
    loss_of(&[vs], k).backward();
}

#[guarded_step(state = SHARED)]
fn apply(o: &mut nn::Optimizer) {
    o.step();
}

#[test]
fn a_function_sharing_the_state_unscales_what_the_other_scaled() {
    let run = |scaled: bool| {
        let vs = model(0.0);
        let mut o = nn::Sgd::default().build(&vs, 0.1).unwrap();
        for k in 0..6 {
            if scaled {
                accumulate(&vs, k);
            } else {
                loss_of(&[&vs], k).backward();
            }
            if k % 2 == 1 {
                apply(&mut o);
                o.zero_grad();
            }
        }
        var_bits(&vs)
    };
    assert_eq!(run(true), run(false));
    assert_eq!(SHARED.loss_scale(), Some(65536.0));
}

#[guarded_step(loss_scale = "dynamic")]
fn bn_step(o: &mut nn::Optimizer, vs: &nn::VarStore, bn: &nn::BatchNorm, x: &Tensor, mult: f64) {
    let _ = vs;
    let y = x.apply_t(bn, true);
    let loss = (y * x).sum(Kind::Float) * mult;
    o.zero_grad();
    loss.backward();
    o.step();
}

#[test]
fn an_overflow_skip_leaves_batchnorm_statistics_as_they_were() {
    let vs = nn::VarStore::new(test_device());
    let bn = nn::batch_norm1d(vs.root() / "bn", 4, Default::default());
    let mut o = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = (Tensor::arange(32, (Kind::Float, test_device())) * 0.37)
        .sin()
        .reshape([8, 4]);
    let before = var_bits(&vs);
    // Under the default `panic` policy: an overflow is a skip, and leaves no trace.
    bn_step(&mut o, &vs, &bn, &x, 1e36);
    assert_eq!(var_bits(&vs), before, "weights and running statistics");
    bn_step(&mut o, &vs, &bn, &x, 1.0);
    assert_ne!(var_bits(&vs), before);
}
