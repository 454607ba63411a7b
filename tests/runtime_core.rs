//! Runtime core on real tensors: sync budget, safe ops, attribution, diagnosis, errors.

#![allow(clippy::result_large_err)] // GuardError is returned only on failure

use stepguard::safe::{self, Eps};
use stepguard::testing::count_host_reads;
use stepguard::{
    clip_grad_norm, Check, ClipError, Config, ConfigError, Diagnosis, GuardState, NormType,
    StepGuard,
};
use stepguard_suite::{mlp, reads_per_step, test_device};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn bits(t: &Tensor) -> Vec<u32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1))
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .unwrap()
}

/// The model of `seed`: the same weights whatever the process-wide generator holds (tests run
/// in parallel, and others draw from it), from `sin` of a ramp whose step depends on `seed`.
fn model(seed: i64) -> (nn::VarStore, nn::Sequential, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = mlp(&vs.root(), 3, 16);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (_, mut t)) in vars.into_iter().enumerate() {
            let size = t.size();
            let fan_in = *size.last().unwrap() as f64;
            let n = t.numel() as i64;
            let v = (Tensor::arange(n, (Kind::Float, Device::Cpu))
                * (0.37 + seed as f64 + 0.11 * i as f64))
                .sin()
                * (1.5 / fan_in.sqrt());
            t.copy_(&v.reshape(size).to_device(t.device()));
        }
    });
    let opt = nn::Sgd::default().build(&vs, 1e-2).unwrap();
    (vs, net, opt)
}

/// A fixed batch of 8: inputs from `sin`, labels 0, 3, 6, 9, 2, ... (no generator involved).
fn batch() -> (Tensor, Tensor) {
    let d = test_device();
    (
        (Tensor::arange(8 * 64, (Kind::Float, d)) * 0.73)
            .sin()
            .reshape([8, 64])
            * 1.3,
        (Tensor::arange(8, (Kind::Int64, d)) * 3).remainder(10),
    )
}

/// One step through the StepGuard API; returns the guard's result.
fn guarded_step(
    config: &Config,
    state: &GuardState,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    opt: &mut nn::Optimizer,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), stepguard::GuardError> {
    let params = opt.trainable_variables();
    let mut g = StepGuard::begin(config, "guarded_step", state).with_names(vs);
    let loss = net.forward(x).cross_entropy_for_logits(y);
    g.loss(&loss);
    opt.zero_grad();
    loss.backward();
    g.before_update(&params)?;
    opt.step();
    g.after_update(&params);
    g.finish();
    Ok(())
}

#[test]
fn fixtures_do_not_depend_on_the_global_generator() {
    let bits_of = |vs: &nn::VarStore| {
        let mut v: Vec<(String, Vec<u32>)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, bits(&t)))
            .collect();
        v.sort();
        v
    };
    let (vs_a, _, _) = model(3);
    let (xa, ya) = batch();
    // What a test running beside this one may do between two fixtures: seed and draw.
    tch::manual_seed(12345);
    let (vs_b, _, _) = model(3);
    let _ = Tensor::randn([17], (Kind::Float, Device::Cpu));
    let (xb, yb) = batch();
    assert_eq!(
        bits_of(&vs_a),
        bits_of(&vs_b),
        "same weights for the same seed"
    );
    assert_eq!(
        (bits(&xa), values(&ya)),
        (bits(&xb), values(&yb)),
        "same batch"
    );
    let (vs_c, _, _) = model(4);
    assert_ne!(
        bits_of(&vs_a),
        bits_of(&vs_c),
        "another seed, other weights"
    );
    let labels = values(&ya);
    assert!(labels.iter().all(|l| (0.0..10.0).contains(l)), "{labels:?}");
}

#[test]
fn clipping_makes_no_host_read_and_full_check_makes_one() {
    let (vs, net, mut opt) = model(0);
    let (x, y) = batch();
    let config = Config::DEFAULT.with_max_norm(0.1);
    let state = GuardState::new();

    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    opt.zero_grad();
    loss.backward();
    let (_, reads) =
        count_host_reads(|| clip_grad_norm(opt.trainable_variables(), 0.1, 2).unwrap());
    assert_eq!(reads, 0);

    for _ in 0..4 {
        let (r, reads) =
            count_host_reads(|| guarded_step(&config, &state, &vs, &net, &mut opt, &x, &y));
        r.unwrap();
        assert_eq!(
            reads,
            reads_per_step(1),
            "loss + grads + previous params: one read per step"
        );
    }
}

#[test]
fn guarded_step_changes_nothing_when_finite_and_clipping_off() {
    let (vs_a, net_a, mut opt_a) = model(7);
    let (mut vs_b, net_b, mut opt_b) = model(8);
    vs_b.copy(&vs_a).unwrap();
    let (x, y) = batch();
    let state = GuardState::new();
    for _ in 0..5 {
        let loss = net_a.forward(&x).cross_entropy_for_logits(&y);
        opt_a.backward_step(&loss);
        guarded_step(&Config::DEFAULT, &state, &vs_b, &net_b, &mut opt_b, &x, &y).unwrap();
    }
    for (a, b) in opt_a
        .trainable_variables()
        .iter()
        .zip(opt_b.trainable_variables())
    {
        assert_eq!(bits(a), bits(&b), "bitwise identical parameters");
    }
    drop((vs_a, vs_b));
}

#[test]
fn clipping_in_the_guard_clips_to_max_norm() {
    let (vs, net, mut opt) = model(3);
    let (x, y) = batch();
    let config = Config::DEFAULT.with_max_norm(0.01);
    let params = opt.trainable_variables();
    let state = GuardState::new();
    let mut g = StepGuard::begin(&config, "f", &state).with_names(&vs);
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    g.loss(&loss);
    opt.zero_grad();
    loss.backward();
    let before = values(&stepguard::grad_norm(&params, 2).unwrap())[0];
    let total = g.before_update(&params).unwrap().unwrap();
    assert!(
        (values(&total)[0] - before).abs() <= 1e-6 * before,
        "returns the norm before clipping"
    );
    let after = values(&stepguard::grad_norm(&params, 2).unwrap())[0];
    assert!(
        before > 0.01 && (after - 0.01).abs() < 1e-5,
        "norm {before} clipped to {after}"
    );
}

#[test]
fn attribution_names_the_grad_with_the_planted_nan() {
    let (vs, net, mut opt) = model(1);
    let (x, y) = batch();
    let params = opt.trainable_variables();
    let state = GuardState::new();
    let mut g = StepGuard::begin(&Config::DEFAULT, "train_step", &state).with_names(&vs);
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    g.loss(&loss);
    opt.zero_grad();
    loss.backward();
    let w = &vs.variables()["layer1.weight"];
    let _ = w.grad().narrow(0, 2, 1).narrow(1, 3, 1).fill_(f64::NAN);
    let before: Vec<Vec<u32>> = params.iter().map(bits).collect();
    let err = g.before_update(&params).unwrap_err();
    assert_eq!(err.check, Check::Grads);
    assert_eq!(err.function, "train_step");
    assert_eq!(err.step, 0);
    assert_eq!(err.tensors.len(), 1);
    assert_eq!(err.tensors[0].name, "grad of layer1.weight");
    assert_eq!((err.tensors[0].nan, err.tensors[0].inf), (1, 0));
    assert!(matches!(
        err.diagnosis,
        Diagnosis::ExplodingGradients {
            norm_overflow: false,
            ..
        }
    ));
    let text = err.to_string();
    assert!(
        text.contains("grad of layer1.weight: 1 NaN, 0 Inf"),
        "{text}"
    );
    assert!(text.contains("max_norm = 1"), "suggests clipping: {text}");
    // The parameters are untouched by the failed check.
    assert_eq!(before, params.iter().map(bits).collect::<Vec<_>>());
}

#[test]
fn unnamed_parameters_are_reported_by_index() {
    let (_vs, net, mut opt) = model(1);
    let (x, y) = batch();
    let params = opt.trainable_variables();
    let state = GuardState::new();
    let mut g = StepGuard::begin(&Config::DEFAULT, "f", &state);
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    opt.zero_grad();
    loss.backward();
    let _ = params[3].grad().fill_(f64::INFINITY);
    let err = g.before_update(&params).unwrap_err();
    assert_eq!(err.tensors[0].name, "grad of param[3]");
    assert_eq!(err.tensors[0].inf, params[3].numel() as i64);
}

#[test]
fn nan_loss_is_diagnosed_as_the_forward_pass() {
    let (vs, net, mut opt) = model(2);
    let (x, y) = batch();
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN); // a NaN in the batch
    let err = guarded_step(
        &Config::DEFAULT,
        &GuardState::new(),
        &vs,
        &net,
        &mut opt,
        &x,
        &y,
    )
    .unwrap_err();
    assert_eq!(err.check, Check::Loss);
    assert_eq!(err.tensors[0].name, "loss");
    assert_eq!(
        err.diagnosis,
        Diagnosis::Forward {
            protected: Some(true)
        }
    );
    assert!(err.to_string().contains("forward pass produced it"));
}

#[test]
fn params_corrupted_before_the_step_are_told_apart() {
    let (vs, net, mut opt) = model(4);
    let (x, y) = batch();
    tch::no_grad(|| {
        let _ = vs.variables()["out.bias"].narrow(0, 0, 1).fill_(f64::NAN);
    });
    let err = guarded_step(
        &Config::DEFAULT,
        &GuardState::new(),
        &vs,
        &net,
        &mut opt,
        &x,
        &y,
    )
    .unwrap_err();
    assert_eq!(err.check, Check::Params);
    assert_eq!(err.diagnosis, Diagnosis::CorruptedBefore);
    assert_eq!(err.tensors[0].name, "out.bias");
}

#[test]
fn huge_learning_rate_is_diagnosed_as_divergence() {
    let (vs, net, _) = model(5);
    let mut opt = nn::Sgd::default().build(&vs, 1e30).unwrap();
    let (x, y) = batch();
    let state = GuardState::new();
    guarded_step(&Config::DEFAULT, &state, &vs, &net, &mut opt, &x, &y).expect("step 0 is finite");
    let err = guarded_step(&Config::DEFAULT, &state, &vs, &net, &mut opt, &x, &y).unwrap_err();
    assert_eq!((err.check, err.step), (Check::Loss, 1));
    let Diagnosis::Diverged { param, max_abs } = &err.diagnosis else {
        panic!("{err}")
    };
    assert!(
        *max_abs > 1e10 && vs.variables().contains_key(param),
        "{param} {max_abs}"
    );
    assert!(
        err.to_string().contains("learning rate is too large"),
        "{err}"
    );
}

#[test]
fn non_finite_update_is_caught_by_the_next_steps_single_read() {
    let (vs, net, mut opt) = model(5);
    let (x, y) = batch();
    let state = GuardState::new();
    let (r, reads) =
        count_host_reads(|| guarded_step(&Config::DEFAULT, &state, &vs, &net, &mut opt, &x, &y));
    r.unwrap();
    assert_eq!(reads, reads_per_step(1));
    // An update that overflows (what an absurd learning rate does to some weights).
    let params = opt.trainable_variables();
    let mut g = StepGuard::begin(&Config::DEFAULT, "guarded_step", &state).with_names(&vs);
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    g.loss(&loss);
    opt.zero_grad();
    loss.backward();
    g.before_update(&params).expect("the grads are finite");
    opt.step();
    tch::no_grad(|| {
        let _ = vs.variables()["layer2.weight"]
            .narrow(0, 0, 1)
            .fill_(f64::INFINITY);
    });
    g.after_update(&params);
    g.finish();
    assert!(state.has_pending(), "the update's own check is read later");
    let err = guarded_step(&Config::DEFAULT, &state, &vs, &net, &mut opt, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Params);
    assert_eq!(err.step, 1, "blamed on update 1, whose check failed");
    assert_eq!(err.diagnosis, Diagnosis::Update);
    assert_eq!(err.tensors[0].name, "layer2.weight");
    assert!(err.to_string().contains("learning rate too large"), "{err}");
}

#[test]
fn corruption_between_calls_is_not_blamed_on_the_previous_update() {
    let (vs, net, mut opt) = model(5);
    let (x, y) = batch();
    let state = GuardState::new();
    for _ in 0..2 {
        guarded_step(&Config::DEFAULT, &state, &vs, &net, &mut opt, &x, &y).unwrap();
    }
    // A bad checkpoint, or user code, writes Inf into a weight between two steps.
    tch::no_grad(|| {
        let _ = vs.variables()["layer2.weight"]
            .narrow(0, 0, 1)
            .fill_(f64::INFINITY);
    });
    let err = guarded_step(&Config::DEFAULT, &state, &vs, &net, &mut opt, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Params);
    assert_eq!(err.diagnosis, Diagnosis::CorruptedBefore, "{err}");
    assert_eq!(
        err.step, 2,
        "the update that was refused, not an earlier one"
    );
    assert_eq!(err.tensors[0].name, "layer2.weight");
    assert_eq!(err.tensors[0].inf, 16);
}

#[test]
fn flush_reads_the_last_updates_check() {
    let (vs, net, mut opt) = model(6);
    let (x, y) = batch();
    let state = GuardState::new();
    let params = opt.trainable_variables();
    let mut g = StepGuard::begin(&Config::DEFAULT, "f", &state).with_names(&vs);
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    g.loss(&loss);
    opt.zero_grad();
    loss.backward();
    g.before_update(&params).unwrap();
    opt.step();
    tch::no_grad(|| {
        let _ = vs.variables()["out.bias"].shallow_clone().fill_(f64::NAN);
    });
    g.after_update(&params);
    g.finish();
    let err = state
        .flush()
        .expect_err("the last update made the parameters non-finite");
    assert_eq!((err.check, err.step), (Check::Params, 0));
    assert_eq!(err.diagnosis, Diagnosis::Update);
    assert_eq!(err.tensors[0].name, "out.bias", "{err}");
    // The failure stays for the next call (or flush) while the parameters are non-finite...
    assert!(state.has_pending());
    let again = state.flush().expect_err("still non-finite");
    assert_eq!((again.step, again.diagnosis), (0, Diagnosis::Update));
    // ...and is gone once they are finite again.
    tch::no_grad(|| {
        let _ = vs.variables()["out.bias"].shallow_clone().fill_(0.0);
    });
    assert!(state.flush().is_ok(), "finite again");
    assert!(!state.has_pending());
}

#[test]
fn clip_rejects_bad_max_norm_and_handles_no_grads() {
    let p = Tensor::zeros([3], (Kind::Float, test_device())).set_requires_grad(true);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(
                clip_grad_norm([&p], bad, 2),
                Err(ClipError::Config(ConfigError::MaxNorm(_)))
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        clip_grad_norm([&p], 1.0, NormType::P(-1.0)),
        Err(ClipError::Config(ConfigError::NormType(_)))
    ));
    let n = clip_grad_norm([&p], 1.0, 2).unwrap();
    assert_eq!(values(&n), vec![0.0]);
    let n = clip_grad_norm(Vec::<Tensor>::new(), 1.0, 2).unwrap();
    assert_eq!(values(&n), vec![0.0]);
    assert!(ConfigError::MaxNorm(0.0)
        .to_string()
        .contains("max_norm must be"));
}

#[test]
fn safe_ops_are_bitwise_identical_on_safe_inputs() {
    let d = test_device();
    let a = Tensor::randn([1000], (Kind::Float, d));
    let b = Tensor::randn([1000], (Kind::Float, d)) + 0.5; // some |b| small but >= eps
    let b = b.where_scalarother(&b.abs().ge(1e-8), 0.25);
    assert_eq!(bits(&safe::div(&a, &b, Eps::DEFAULT)), bits(&(&a / &b)));
    let x = Tensor::rand([1000], (Kind::Float, d)) + 1e-7;
    assert_eq!(bits(&safe::log(&x, Eps::DEFAULT)), bits(&x.log()));
    assert_eq!(bits(&safe::log2(&x, Eps::DEFAULT)), bits(&x.log2()));
    assert_eq!(bits(&safe::log10(&x, Eps::DEFAULT)), bits(&x.log10()));
}

#[test]
fn safe_ops_are_finite_at_zero_with_finite_grads_and_keep_the_sign() {
    let d = test_device();
    let a = Tensor::from_slice(&[1.0f32, 1.0, -2.0, 3.0])
        .to_device(d)
        .set_requires_grad(true);
    let b = Tensor::from_slice(&[0.0f32, -0.0, 1e-12, -1e-12])
        .to_device(d)
        .set_requires_grad(true);
    let q = safe::div(&a, &b, Eps::DEFAULT);
    let v = values(&q);
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    assert!(
        v[0] > 0.0 && v[1] < 0.0 && v[2] < 0.0 && v[3] < 0.0,
        "sign of the divisor kept: {v:?}"
    );
    q.sum(Kind::Float).backward();
    assert!(values(&a.grad())
        .iter()
        .chain(values(&b.grad()).iter())
        .all(|g| g.is_finite()));

    let x = Tensor::from_slice(&[0.0f32, 1.0])
        .to_device(d)
        .set_requires_grad(true);
    let l = safe::log(&x, Eps::DEFAULT);
    assert!(values(&l).iter().all(|v| v.is_finite()));
    assert!((values(&l)[0] - (1e-8f32 as f64).ln()).abs() < 1e-3);
    l.sum(Kind::Float).backward();
    assert!(values(&x.grad()).iter().all(|g| g.is_finite()));

    // NaN is not hidden.
    let n = Tensor::from_slice(&[f32::NAN]).to_device(d);
    assert!(values(&safe::div(&n, &n, Eps::DEFAULT))[0].is_nan());
    // Half precision: 1e-8 would underflow to zero; the smallest normal is used instead.
    // (On every device the tests run on: the CPU and CUDA both divide in f16.)
    let h = Tensor::from_slice(&[0.0f32, -0.0])
        .to_kind(Kind::Half)
        .to_device(d);
    let q = safe::div(&h.ones_like(), &h, Eps::DEFAULT);
    assert!(values(&q)[0].is_finite());
    assert_eq!(q.kind(), Kind::Half);
    assert_eq!(
        values(&q),
        vec![16384.0, -16384.0],
        "1 / ±2^-14, the smallest normal f16, with the divisor's sign"
    );
    assert!(
        values(&(h.ones_like() / (&h + 1e-8)))[0].is_infinite(),
        "1e-8 itself is zero in f16: the floor is what keeps it finite"
    );
}

#[test]
fn integer_division_is_left_to_the_plain_op() {
    let a = Tensor::from_slice(&[7i64, 1]);
    let b = Tensor::from_slice(&[2i64, 0]);
    assert_eq!(values(&safe::div(&a, &b, Eps::DEFAULT)), values(&(&a / &b)));
}

#[test]
fn aten_path_makes_exactly_one_read_per_step() {
    // The path every CUDA (and bf16, non-contiguous) tensor takes, forced on CPU tensors.
    stepguard::testing::set_cpu_fast_path(false);
    let (vs, net, mut opt) = model(11);
    let (x, y) = batch();
    let config = Config::DEFAULT.with_max_norm(0.1);
    let state = GuardState::new();
    for _ in 0..3 {
        let (r, reads) =
            count_host_reads(|| guarded_step(&config, &state, &vs, &net, &mut opt, &x, &y));
        r.unwrap();
        assert_eq!(reads, 1);
    }
    let (_, reads) =
        count_host_reads(|| clip_grad_norm(opt.trainable_variables(), 0.1, 2).unwrap());
    assert_eq!(reads, 0);
    stepguard::testing::set_cpu_fast_path(true);
}

#[test]
fn fused_and_aten_paths_agree_on_the_grad_norm() {
    let (_vs, net, mut opt) = model(12);
    let (x, y) = batch();
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    opt.zero_grad();
    loss.backward();
    let params = opt.trainable_variables();
    for p in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)] {
        stepguard::testing::set_cpu_fast_path(true);
        let fused = values(&stepguard::grad_norm(&params, p).unwrap())[0];
        stepguard::testing::set_cpu_fast_path(false);
        let aten = values(&stepguard::grad_norm(&params, p).unwrap())[0];
        stepguard::testing::set_cpu_fast_path(true);
        assert!(
            (fused - aten).abs() <= 1e-5 * aten,
            "{p}: {fused} vs {aten}"
        );
    }
}

#[test]
fn fused_norm_of_a_large_grad_matches_aten() {
    let p = Tensor::zeros([1 << 20], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::randn([1 << 20], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
    (&p * &g).sum(Kind::Float).backward();
    for nt in [NormType::L1, NormType::L2] {
        stepguard::testing::set_cpu_fast_path(true);
        let fused = values(&stepguard::grad_norm([&p], nt).unwrap())[0];
        stepguard::testing::set_cpu_fast_path(false);
        let aten = values(&stepguard::grad_norm([&p], nt).unwrap())[0];
        stepguard::testing::set_cpu_fast_path(true);
        let g64 = p.grad().to_kind(Kind::Double);
        let exact = values(&if nt == NormType::L1 {
            g64.abs().sum(Kind::Double)
        } else {
            g64.square().sum(Kind::Double).sqrt()
        })[0];
        // The fused sum (f32 lanes, f64 across blocks) is closer to the exact value than ATen's
        // own f32 reduction, which is off by about 2e-5 here.
        assert!(
            (fused - exact).abs() <= 1e-6 * exact,
            "{nt}: fused {fused} vs exact {exact}"
        );
        assert!(
            (fused - aten).abs() <= 1e-4 * aten,
            "{nt}: {fused} vs {aten}"
        );
    }
}
