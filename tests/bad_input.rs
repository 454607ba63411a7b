//! Bad input at run time: each case is either a clear error with nothing applied, or the
//! result the plain step would give; never a panic, a silent wrong result or a false failure.

#![allow(clippy::result_large_err)] // GuardError travels on the cold path only

use stepguard::safe::{self, Eps};
use stepguard::{
    clip_grad_norm, guarded_step, AdaptiveClip, Check, Config, ConfigError, GuardState, OnNan,
    Spike, StepGuard,
};
use stepguard_suite::{capture_events, test_device, var_bits};
use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Kind, Tensor};

fn linear_model(vs: &nn::VarStore) -> nn::Linear {
    nn::linear(vs.root() / "l", 4, 3, Default::default())
}

/// One update of `net` through the hand API under `config`; the result of `before_update`.
fn hand_step(
    config: &Config,
    state: &GuardState,
    vs: &nn::VarStore,
    net: &nn::Linear,
    lr: f64,
) -> Result<(), stepguard::GuardError> {
    hand_step_then(config, state, vs, net, lr, |_| {})
}

/// [`hand_step`], with `after` applied to the parameters after the optimizer's step.
fn hand_step_then(
    config: &Config,
    state: &GuardState,
    vs: &nn::VarStore,
    net: &nn::Linear,
    lr: f64,
    after: impl Fn(&[Tensor]),
) -> Result<(), stepguard::GuardError> {
    let d = test_device();
    let mut opt = nn::Sgd::default().build(vs, lr).unwrap();
    // The same batch every call: the loss goes down, never spikes.
    let x = Tensor::linspace(-1.0, 1.0, 32, (Kind::Float, d)).reshape([8, 4]);
    let params = vs.trainable_variables();
    let mut g = StepGuard::begin(config, "hand_step", state).with_names(vs);
    let loss = net.forward(&x).square().mean(Kind::Float);
    g.loss(&loss);
    opt.zero_grad();
    loss.backward();
    g.before_update(&params)?;
    opt.step();
    after(&params);
    g.after_update(&params);
    g.finish();
    Ok(())
}

// ---- 1 and 4: a warm-up of 0 updates judges against no statistics ----

#[test]
fn adaptive_clipping_with_no_warmup_is_refused_before_anything_is_clipped() {
    for fast_path in [true, false] {
        stepguard::testing::set_cpu_fast_path(fast_path);
        let config = Config::DEFAULT.with_adaptive_clip(AdaptiveClip::new(2.5, 0, 65));
        assert!(
            matches!(config.validate(), Err(ConfigError::Spike { field, .. }) if field.contains("warmup")),
            "{:?}",
            config.validate()
        );
        let vs = nn::VarStore::new(test_device());
        let net = linear_model(&vs);
        let before = var_bits(&vs);
        let e = hand_step(&config, &GuardState::new(), &vs, &net, 0.1).unwrap_err();
        assert_eq!(e.check, Check::Config, "{e}");
        assert!(e.to_string().contains("warmup"), "{e}");
        assert_eq!(var_bits(&vs), before, "nothing applied");
    }
    stepguard::testing::set_cpu_fast_path(true);
}

#[test]
fn spike_detection_with_no_warmup_is_refused() {
    let config = Config::DEFAULT.with_spike(Spike::new(6.0, 0, 100));
    assert!(
        matches!(config.validate(), Err(ConfigError::Spike { field, .. }) if field.contains("warmup")),
        "{:?}",
        config.validate()
    );
    assert!(Spike::new(6.0, 0, 100).validate().is_err());
    assert!(AdaptiveClip::new(2.5, 0, 65).validate().is_err());
    let vs = nn::VarStore::new(test_device());
    let net = linear_model(&vs);
    let before = var_bits(&vs);
    let e = hand_step(&config, &GuardState::new(), &vs, &net, 0.1).unwrap_err();
    assert_eq!(e.check, Check::Config, "{e}");
    assert_eq!(var_bits(&vs), before, "nothing applied");
    // A warm-up of one update is the smallest: the first update only feeds the statistics.
    let config = Config::DEFAULT.with_spike(Spike::new(6.0, 1, 100));
    let state = GuardState::new();
    for _ in 0..5 {
        hand_step(&config, &state, &vs, &net, 0.1).unwrap();
    }
    assert_ne!(var_bits(&vs), before, "a clean run trains");
}

// ---- 10: a subnormal max_norm would zero the gradients ----

#[test]
fn a_max_norm_below_the_smallest_normal_f32_is_refused() {
    for m in [5e-324, 1e-310, 1e-40] {
        let config = Config::DEFAULT.with_max_norm(m);
        assert!(
            matches!(config.validate(), Err(ConfigError::MaxNorm(v)) if v == m),
            "{m}: {:?}",
            config.validate()
        );
        let vs = nn::VarStore::new(test_device());
        let net = linear_model(&vs);
        let before = var_bits(&vs);
        let e = hand_step(&config, &GuardState::new(), &vs, &net, 0.1).unwrap_err();
        assert_eq!(e.check, Check::Config, "{m}: {e}");
        assert_eq!(var_bits(&vs), before, "{m}: nothing applied");
        let p = Tensor::zeros([3], (Kind::Float, test_device())).set_requires_grad(true);
        p.sum(Kind::Float).backward();
        assert!(
            clip_grad_norm([&p], m, 2).is_err(),
            "{m}: clip_grad_norm refuses it"
        );
        assert_eq!(
            Vec::<f32>::try_from(p.grad()).unwrap(),
            [1.0; 3],
            "{m}: grads untouched"
        );
    }
    // The smallest normal f32 is accepted, and its coefficient is not zero.
    let m = f64::from(f32::MIN_POSITIVE);
    assert!(Config::DEFAULT.with_max_norm(m).validate().is_ok());
    let p = Tensor::zeros([3], (Kind::Float, test_device())).set_requires_grad(true);
    p.sum(Kind::Float).backward();
    let _ = clip_grad_norm([&p], m, 2).unwrap();
    let clipped = Vec::<f32>::try_from(p.grad()).unwrap();
    assert!(clipped.iter().all(|&c| c > 0.0), "{clipped:?}");
}

// ---- 9: a protected log of -inf stays non-finite ----

#[test]
fn protected_logs_keep_non_finite_inputs_non_finite() {
    let d = test_device();
    for kind in [Kind::Half, Kind::BFloat16, Kind::Float, Kind::Double] {
        let x = Tensor::from_slice(&[f64::NEG_INFINITY, f64::INFINITY, f64::NAN, 0.0, -1.0, 2.0])
            .to_kind(kind)
            .to_device(d);
        for (name, f) in [
            ("log", safe::log as fn(&Tensor, Eps) -> Tensor),
            ("log2", safe::log2),
            ("log10", safe::log10),
        ] {
            let y = Vec::<f64>::try_from(f(&x, Eps::DEFAULT).to_kind(Kind::Double)).unwrap();
            assert!(y[0].is_nan(), "{name}({kind:?}) of -inf: {}", y[0]);
            assert_eq!(y[1], f64::INFINITY, "{name}({kind:?}) of inf");
            assert!(y[2].is_nan(), "{name}({kind:?}) of NaN");
            assert!(
                y[3].is_finite() && y[4].is_finite(),
                "{name}({kind:?}) of 0 and -1 protected"
            );
            if name == "log" {
                let plain = x.narrow(0, 5, 1).log().to_kind(Kind::Double);
                let plain = Vec::<f64>::try_from(plain).unwrap();
                assert_eq!(y[5].to_bits(), plain[0].to_bits(), "identity");
            }
        }
    }
    // The gradient stays finite at 0 and below.
    let x = Tensor::from_slice(&[0.0f32, -3.0, 1.0]).set_requires_grad(true);
    safe::log(&x, Eps::DEFAULT).sum(Kind::Float).backward();
    let g = Vec::<f32>::try_from(x.grad()).unwrap();
    assert_eq!(g, [0.0, 0.0, 1.0]);
}

// ---- 2: complex values are checked on both parts ----

/// A complex parameter and one finite clean update of it through the hand API.
fn complex_model(d: tch::Device) -> (nn::VarStore, Tensor) {
    let vs = nn::VarStore::new(d);
    let init = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5, 3.0, -2.0])
        .reshape([3, 2])
        .to_device(d);
    let c = vs.root().add("c", init.view_as_complex().copy(), true);
    (vs, c)
}

fn complex_loss(c: &Tensor) -> Tensor {
    (c * c.conj()).real().sum(Kind::Float)
}

#[test]
fn a_complex_parameter_with_nan_only_in_its_imaginary_part_is_caught() {
    let d = test_device();
    for (bad, fast_path) in [(f64::NAN, true), (f64::INFINITY, true), (f64::NAN, false)] {
        stepguard::testing::set_cpu_fast_path(fast_path);
        let (vs, c) = complex_model(d);
        assert_eq!(c.kind(), Kind::ComplexFloat);
        let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
        let config = Config::DEFAULT.with_on_nan(OnNan::Error);
        let state = GuardState::new();
        let params = vs.trainable_variables();
        let mut g = StepGuard::begin(&config, "complex", &state).with_names(&vs);
        let loss = complex_loss(&c);
        g.loss(&loss);
        opt.zero_grad();
        loss.backward();
        g.before_update(&params).unwrap();
        opt.step();
        // The update went wrong in the imaginary part only.
        tch::no_grad(|| {
            let _ = c.imag().narrow(0, 1, 1).fill_(bad);
        });
        g.after_update(&params);
        g.finish();
        let e = state
            .flush()
            .expect_err("the parameters check sees the imaginary part");
        assert_eq!(e.check, Check::Params, "{e}");
        assert!(e.to_string().contains('c'), "names the parameter: {e}");
    }
    stepguard::testing::set_cpu_fast_path(true);
}

#[test]
fn a_complex_gradient_with_nan_only_in_its_imaginary_part_is_caught() {
    let d = test_device();
    for (bad, max_norm) in [
        (f64::NAN, None),
        (f64::INFINITY, None),
        (f64::NAN, Some(1.0)),
    ] {
        let (vs, c) = complex_model(d);
        let before = var_bits(&vs);
        let mut config = Config::DEFAULT.with_on_nan(OnNan::Error);
        if let Some(m) = max_norm {
            config = config.with_max_norm(m);
        }
        let state = GuardState::new();
        let params = vs.trainable_variables();
        let mut g = StepGuard::begin(&config, "complex", &state).with_names(&vs);
        let loss = complex_loss(&c);
        g.loss(&loss);
        loss.backward();
        tch::no_grad(|| {
            let _ = c.grad().imag().narrow(0, 2, 1).fill_(bad);
        });
        let e = g
            .before_update(&params)
            .expect_err("the grads check sees it");
        assert_eq!(e.check, Check::Grads, "{e}");
        assert_eq!(var_bits(&vs), before);
    }
}

#[test]
fn the_norm_of_complex_gradients_is_the_norm_of_their_moduli() {
    let d = test_device();
    let (_vs, c) = complex_model(d);
    complex_loss(&c).backward();
    let grad = c.grad();
    let moduli = Vec::<f64>::try_from(grad.abs().to_kind(Kind::Double).flatten(0, -1)).unwrap();
    for (p, want) in [
        (2.0, moduli.iter().map(|m| m * m).sum::<f64>().sqrt()),
        (1.0, moduli.iter().sum::<f64>()),
        (f64::INFINITY, moduli.iter().cloned().fold(0.0, f64::max)),
    ] {
        let got = stepguard::grad_norm([&c], p).unwrap().double_value(&[]);
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "p = {p}: {got} vs {want}"
        );
    }
    let _ = c.grad().imag().narrow(0, 0, 1).fill_(f64::NAN);
    assert!(c.grad().real().isfinite().all().int64_value(&[]) == 1);
    let got = stepguard::grad_norm([&c], 2).unwrap().double_value(&[]);
    assert!(got.is_nan(), "{got}");
}

// ---- 3: zero-size first variables do not make two models one ----

#[test]
fn two_models_whose_first_variable_is_empty_keep_their_own_state() {
    let d = test_device();
    let model = || {
        let vs = nn::VarStore::new(d);
        let empty = nn::linear(vs.root() / "empty", 4, 0, Default::default());
        let net = linear_model(&vs);
        (vs, empty, net)
    };
    let (vs_a, _ea, net_a) = model();
    let (vs_b, _eb, net_b) = model();
    assert_eq!(vs_a.trainable_variables()[0].numel(), 0);
    let config = Config::DEFAULT.with_on_nan(OnNan::Error);
    let state = GuardState::new();
    // Model A's update goes wrong: found at A's next update, not B's.
    let poison = |params: &[Tensor]| {
        tch::no_grad(|| {
            let _ = params.last().unwrap().shallow_clone().fill_(f64::NAN);
        })
    };
    hand_step_then(&config, &state, &vs_a, &net_a, 0.1, poison).unwrap();
    let before_b = var_bits(&vs_b);
    hand_step(&config, &state, &vs_b, &net_b, 0.1).expect("B's own update is clean");
    assert_ne!(var_bits(&vs_b), before_b, "B trained");
    let e = hand_step(&config, &state, &vs_a, &net_a, 0.1).unwrap_err();
    assert_eq!(e.check, Check::Params, "{e}");
    let names: Vec<&str> = e.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 1, "{e}");
    assert!(names[0].starts_with("l."), "{e}");
}

// ---- 11: buffers of a VarStore the step does not name ----

#[guarded_step(on_nan = skip(max = 5))]
fn names_another_store(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::BatchNorm,
    x: &Tensor,
) -> f64 {
    let _ = vs;
    let loss = net.forward_t(x, true).square().mean(Kind::Float);
    opt.backward_step(&loss);
    loss.double_value(&[])
}

#[test]
fn a_skip_that_cannot_restore_the_buffers_says_so_and_names_the_fix() {
    let d = test_device();
    let model_vs = nn::VarStore::new(d);
    let bn = nn::batch_norm1d(model_vs.root() / "bn", 4, Default::default());
    let named_vs = nn::VarStore::new(d); // the store the step names holds nothing of the model
    let _other = nn::linear(named_vs.root() / "other", 2, 2, Default::default());
    let mut opt = nn::Sgd::default().build(&model_vs, 0.1).unwrap();
    let mut bad = Tensor::randn([8, 4], (Kind::Float, d));
    let _ = bad.get(0).get(0).fill_(f64::NAN);
    let ((), log) = capture_events(tracing::Level::WARN, || {
        names_another_store(&mut opt, &named_vs, &bn, &bad);
        names_another_store(&mut opt, &named_vs, &bn, &bad);
    });
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("buffers")).collect();
    assert_eq!(warnings.len(), 1, "said once:\n{log}");
    assert!(
        warnings[0].contains("params ="),
        "names the fix: {}",
        warnings[0]
    );
    assert!(
        warnings[0].contains("names_another_store"),
        "{}",
        warnings[0]
    );
    let _ = &mut bad;
}

#[guarded_step(on_nan = skip(max = 5), params = (vs, model_vs))]
fn names_both_stores(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    model_vs: &nn::VarStore,
    net: &nn::BatchNorm,
    x: &Tensor,
) -> f64 {
    let loss = net.forward_t(x, true).square().mean(Kind::Float);
    opt.backward_step(&loss);
    loss.double_value(&[])
}

#[test]
fn with_both_stores_named_the_skip_restores_the_buffers() {
    let d = test_device();
    let model_vs = nn::VarStore::new(d);
    let bn = nn::batch_norm1d(model_vs.root() / "bn", 4, Default::default());
    let named_vs = nn::VarStore::new(d);
    let _other = nn::linear(named_vs.root() / "other", 2, 2, Default::default());
    let mut opt = nn::Sgd::default().build(&model_vs, 0.1).unwrap();
    let bad = Tensor::randn([8, 4], (Kind::Float, d));
    let _ = bad.get(0).get(0).fill_(f64::NAN);
    let before = stepguard_suite::var_bits(&model_vs);
    names_both_stores(&mut opt, &named_vs, &model_vs, &bn, &bad);
    assert_eq!(
        stepguard_suite::var_bits(&model_vs),
        before,
        "running statistics restored"
    );
}

// ---- a libtorch error inside a check is the step's error, never a panic ----

#[test]
fn a_libtorch_error_inside_a_check_is_a_guard_error_naming_it() {
    // A quantized "loss": libtorch has no sum for it, so folding its check fails inside ATen.
    let q = Tensor::from_slice(&[1.0f32, 2.0]).quantize_per_tensor(0.1, 0, Kind::QInt8);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let _net = linear_model(&vs);
    let config = Config::DEFAULT.with_on_nan(OnNan::Error);
    let state = GuardState::new();
    let before = var_bits(&vs);
    let mut g = StepGuard::begin(&config, "quantized_loss", &state).with_names(&vs);
    g.loss(&q);
    let e = g
        .before_update(&vs.trainable_variables())
        .expect_err("the check's libtorch error comes back");
    assert_eq!(e.check, Check::Device, "{e}");
    assert!(
        e.to_string().contains("Quantized"),
        "names libtorch's error: {e}"
    );
    assert_eq!(var_bits(&vs), before, "nothing applied");
}
