//! Right numbers on every dtype and path: norms that do not overflow while the true value is
//! representable, the same total on the fast path and the ATen path, every `max_norm`
//! validated, and no panic inside stepguard for tensors the plain step accepts.

#![allow(clippy::result_large_err)]

use stepguard::testing::set_cpu_fast_path;
use stepguard::{
    clip_grad_norm, grad_norm, Check, Config, ConfigError, Diagnosis, FiniteFlag, GuardState,
    NormType, StepGuard,
};
use stepguard_suite::test_device;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// A leaf parameter whose grad is exactly `grad` (in `kind`).
fn param_with_grad(grad: &Tensor, kind: Kind) -> Tensor {
    let g = grad.to_kind(kind).to_device(test_device());
    let p = Tensor::zeros(g.size(), (kind, test_device())).set_requires_grad(true);
    (&p * &g).sum(Kind::Double).backward();
    p
}

fn grad_values(p: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        p.grad()
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .unwrap()
}

fn norm_of(ps: &[Tensor]) -> f64 {
    ps.iter()
        .flat_map(grad_values)
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
}

fn on_both_paths<R>(f: impl Fn() -> R) -> (R, R) {
    set_cpu_fast_path(true);
    let fast = f();
    set_cpu_fast_path(false);
    let aten = f();
    set_cpu_fast_path(true);
    (fast, aten)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    if a.is_nan() || b.is_nan() || a.is_infinite() || b.is_infinite() {
        return a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    }
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-300
}

#[test]
fn f16_grads_whose_norm_exceeds_65504_are_clipped() {
    // PyTorch computes this norm in f16: 3000 * sqrt(1000) = 94868 overflows to inf and the
    // grads are not clipped (or, with error_if_nonfinite, the step fails).
    let p = param_with_grad(
        &Tensor::full([1000], 3000.0, (Kind::Float, Device::Cpu)),
        Kind::Half,
    );
    let total = f64::try_from(clip_grad_norm([&p], 1.0, 2).unwrap()).unwrap();
    assert!(close(total, 3000.0 * 1000f64.sqrt(), 1e-3), "{total}");
    let after = norm_of(&[p]);
    assert!(
        (after - 1.0).abs() < 1e-2,
        "clipped to max_norm = 1, got {after}"
    );
}

#[test]
fn bf16_and_f32_grads_with_huge_elements_are_clipped_by_the_guard_on_both_paths() {
    for (kind, v) in [(Kind::BFloat16, 1e30), (Kind::Float, 1e20)] {
        let (fast, aten) = on_both_paths(|| {
            let p = param_with_grad(&Tensor::from_slice(&[v, v, 1.0]), kind);
            let config = Config::DEFAULT.with_max_norm(1.0);
            let state = GuardState::new();
            let mut g = StepGuard::begin(&config, "huge", &state);
            g.before_update(std::slice::from_ref(&p))
                .expect("every grad is finite: the guard clips, it does not fail");
            (g.last_grad_norm().unwrap(), norm_of(&[p]))
        });
        for (total, after) in [fast, aten] {
            assert!(
                close(total, v * 2f64.sqrt(), 1e-2),
                "{kind:?}: total {total}"
            );
            assert!(
                (after - 1.0).abs() < 1e-2,
                "{kind:?}: clipped to 1, got {after}"
            );
        }
    }
}

#[test]
fn the_public_clip_overflows_only_where_pytorch_does_and_then_leaves_grads_alone() {
    // The documented choice for `clip_grad_norm` off the CPU fast path: per-tensor norms come
    // from `_foreach_norm`, accumulated in f32 like PyTorch's, so f32 elements of 1e20 give an
    // infinite total there (as in PyTorch); the grads are then left as they were, never
    // multiplied by NaN or 0. The fast path accumulates in f64 and clips.
    let (fast, aten) = on_both_paths(|| {
        let p = param_with_grad(&Tensor::from_slice(&[1e20f32, 1e20, 1.0]), Kind::Float);
        let total = f64::try_from(clip_grad_norm([&p], 1.0, 2).unwrap()).unwrap();
        (total, grad_values(&p))
    });
    assert!(close(fast.0, 1e20 * 2f64.sqrt(), 1e-6));
    assert!((fast.1.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
    assert!(aten.0.is_infinite(), "{}", aten.0);
    assert_eq!(aten.1, vec![1e20f32 as f64, 1e20f32 as f64, 1.0]);
}

#[test]
fn the_guard_applies_a_clipped_update_where_pytorchs_norm_overflows() {
    // f16 model, all grads 3000: with max_norm = 1 the step must clip, not skip or apply 3000s.
    let vs = nn::VarStore::new(test_device());
    let w = vs.root().zeros("w", &[1000]).to_kind(Kind::Half);
    let _ = w;
    let p = param_with_grad(
        &Tensor::full([1000], 3000.0, (Kind::Float, Device::Cpu)),
        Kind::Half,
    );
    let config = Config::DEFAULT.with_max_norm(1.0);
    let state = GuardState::new();
    let mut g = StepGuard::begin(&config, "f16_step", &state);
    let total = g
        .before_update(std::slice::from_ref(&p))
        .expect("every grad is finite");
    let total = f64::try_from(total.unwrap()).unwrap();
    assert!(total.is_finite() && total > 65504.0, "{total}");
    assert!((norm_of(&[p]) - 1.0).abs() < 1e-2);
}

#[test]
fn a_total_that_really_overflows_is_an_error_and_nothing_is_clipped() {
    // L1 of two f64 values near f64::MAX: the true total is not representable.
    let p = param_with_grad(&Tensor::from_slice(&[1.5e308f64, 1.5e308]), Kind::Double);
    let config = Config::DEFAULT
        .with_max_norm(1.0)
        .with_norm_type(NormType::L1);
    let state = GuardState::new();
    let mut g = StepGuard::begin(&config, "f", &state);
    let err = g.before_update(std::slice::from_ref(&p)).unwrap_err();
    assert_eq!(err.check, Check::Grads);
    assert_eq!(
        err.diagnosis,
        Diagnosis::ExplodingGradients {
            max_norm: Some(1.0),
            norm_overflow: true
        }
    );
    assert_eq!(grad_values(&p), vec![1.5e308, 1.5e308], "left as they were");
}

#[test]
fn every_norm_type_dtype_and_layout_gives_one_answer_on_both_paths() {
    let norms = [
        NormType::L1,
        NormType::L2,
        NormType::Inf,
        NormType::P(1.0),
        NormType::P(2.0),
        NormType::P(f64::INFINITY),
        NormType::P(3.0),
        NormType::P(0.5),
        NormType::P(200.0),
    ];
    let base = (Tensor::arange(24, (Kind::Double, Device::Cpu)) * 0.77).sin() * 40.0;
    for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
        for transposed in [false, true] {
            let make = || {
                let a = param_with_grad(&base.narrow(0, 0, 12).reshape([3, 4]), kind);
                let b = param_with_grad(&base.narrow(0, 12, 12), kind);
                if transposed {
                    let mut g = a.grad();
                    let t = g.transpose(0, 1).contiguous().transpose(0, 1);
                    let _ = g.set_source_tensor_(&t);
                    assert!(!a.grad().is_contiguous());
                }
                [a, b]
            };
            // The exact value, from the grads as stored (after rounding to `kind`).
            let stored: Vec<f64> = make().iter().flat_map(grad_values).collect();
            for p in norms {
                let q = p.p();
                let exact = if q.is_infinite() {
                    stored.iter().fold(0.0f64, |m, x| m.max(x.abs()))
                } else {
                    let m = stored.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    m * stored
                        .iter()
                        .map(|x| (x.abs() / m).powf(q))
                        .sum::<f64>()
                        .powf(1.0 / q)
                };
                let (fast, aten) =
                    on_both_paths(|| f64::try_from(grad_norm(make().iter(), p).unwrap()).unwrap());
                // The total is returned in f32 unless a grad is f64.
                let tol = if kind == Kind::Double { 1e-9 } else { 1e-5 };
                assert!(
                    close(fast, exact, tol),
                    "{kind:?} {p:?} t={transposed}: fast {fast} vs {exact}"
                );
                assert!(
                    close(aten, exact, tol.max(1e-6)),
                    "{kind:?} {p:?} t={transposed}: aten {aten} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn infinite_p_is_the_max_norm_on_both_paths() {
    let (fast, aten) = on_both_paths(|| {
        let p = param_with_grad(&Tensor::from_slice(&[0.3f32, 0.4]), Kind::Float);
        f64::try_from(grad_norm([&p], NormType::P(f64::INFINITY)).unwrap()).unwrap()
    });
    assert!(
        close(fast, 0.4, 1e-6) && close(aten, 0.4, 1e-6),
        "{fast} {aten}"
    );
}

#[test]
fn mixed_dtypes_on_cpu_still_report_the_norm_and_clip() {
    let a = param_with_grad(&Tensor::from_slice(&[3.0f32, 4.0]), Kind::Float);
    let b = param_with_grad(&Tensor::from_slice(&[12.0f32]), Kind::BFloat16);
    let config = Config::DEFAULT.with_max_norm(1.0);
    let state = GuardState::new();
    let mut g = StepGuard::begin(&config, "mixed", &state);
    g.before_update(&[a.shallow_clone(), b.shallow_clone()])
        .unwrap();
    let n = g
        .last_grad_norm()
        .expect("the total is read back with the step's flag");
    assert!(close(n, 13.0, 1e-6), "{n}");
    assert!((norm_of(&[a, b]) - 1.0).abs() < 1e-2);
}

// --- every max_norm validated at one place ----------------------------------------------

#[stepguard::guarded_step(on_nan = "error")]
fn clip_norm_at_run_time(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    m: f64,
) -> Result<(), stepguard::GuardError> {
    let _ = vs;
    let loss = net.forward(x).pow_tensor_scalar(2).mean(Kind::Float);
    opt.backward_step_clip_norm(&loss, m);
    Ok(())
}

#[test]
fn an_invalid_max_norm_at_run_time_is_an_error_and_nothing_moves() {
    let vs = nn::VarStore::new(test_device());
    let net = nn::linear(vs.root() / "fc", 3, 2, Default::default());
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::ones([4, 3], (Kind::Float, test_device()));
    let snapshot = || -> Vec<Vec<f32>> {
        let mut v: Vec<_> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter()
            .map(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1).to_device(Device::Cpu)).unwrap())
            .collect()
    };
    let before = snapshot();
    for m in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
        let err = clip_norm_at_run_time(&mut opt, &vs, &net, &x, m).unwrap_err();
        assert_eq!(err.check, Check::Config, "{err}");
        assert!(
            matches!(err.diagnosis, Diagnosis::Config(ConfigError::MaxNorm(v)) if v.to_bits() == m.to_bits())
        );
        assert_eq!(
            before,
            snapshot(),
            "max_norm = {m}: no ascent, no NaN, nothing applied"
        );
    }
    clip_norm_at_run_time(&mut opt, &vs, &net, &x, 0.5).unwrap();
    assert_ne!(before, snapshot());
}

#[test]
fn a_hand_built_config_is_validated() {
    let mut config = Config::DEFAULT.with_max_norm(-1.0);
    assert_eq!(config.validate(), Err(ConfigError::MaxNorm(-1.0)));
    let p = param_with_grad(&Tensor::from_slice(&[1.0f32, 2.0]), Kind::Float);
    let state = GuardState::new();
    let err = StepGuard::begin(&config, "f", &state)
        .before_update(std::slice::from_ref(&p))
        .unwrap_err();
    assert_eq!(err.diagnosis, Diagnosis::Config(ConfigError::MaxNorm(-1.0)));
    assert_eq!(
        grad_values(&p),
        vec![1.0, 2.0],
        "the grads were not flipped"
    );
    config = Config::DEFAULT.with_eps(0.0);
    assert_eq!(config.validate(), Err(ConfigError::Eps(0.0)));
    config = Config::DEFAULT.with_norm_type(NormType::P(-2.0));
    assert_eq!(config.validate(), Err(ConfigError::NormType(-2.0)));
}

// --- no panic inside stepguard -------------------------------------------------------------

#[test]
fn a_grad_that_is_part_of_a_graph_is_scaled_through_autograd() {
    // The fast path must not write behind autograd's back: the graph that saved the grad
    // sees the in-place change, as it would with PyTorch's own clipping.
    let p = param_with_grad(&Tensor::from_slice(&[30.0f32, 40.0]), Kind::Float);
    let g = p.grad().set_requires_grad(true);
    let y = (&g * &g).sum(Kind::Float);
    let _ = clip_grad_norm([&p], 1.0, 2).unwrap();
    assert!(y.f_backward().is_err(), "modified by an inplace operation");
    assert!((norm_of(&[p]) - 1.0).abs() < 1e-5);
}

#[test]
fn empty_tensors_and_undefined_grads_are_fine() {
    let empty = param_with_grad(&Tensor::zeros([0], (Kind::Float, Device::Cpu)), Kind::Float);
    let no_grad = Tensor::zeros([3], (Kind::Float, test_device())).set_requires_grad(true);
    let p = param_with_grad(&Tensor::from_slice(&[3.0f32, 4.0]), Kind::Float);
    let (fast, aten) =
        on_both_paths(|| f64::try_from(grad_norm([&empty, &no_grad, &p], 2).unwrap()).unwrap());
    assert!(close(fast, 5.0, 1e-6) && close(aten, 5.0, 1e-6));
}

#[test]
fn an_error_from_libtorch_while_folding_is_reported_by_the_read() {
    let mut flag = FiniteFlag::new();
    flag.fold(&Tensor::new()); // undefined: libtorch refuses to detach it
    let e = flag.read().expect_err("the read reports it, no panic");
    assert!(!e.message().is_empty());
}

#[test]
fn the_multi_tensor_path_names_the_bad_grad_in_mixed_dtype_groups() {
    // f32 and f64 grads interleaved: two (device, dtype) groups, whose per-tensor norms come
    // back in the order of the parameters.
    let params: Vec<Tensor> = (0..6)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Kind::Float
            } else {
                Kind::Double
            };
            let g = Tensor::full([3], 1.0 + i as f64, (Kind::Double, Device::Cpu));
            if i == 3 {
                let _ = g.narrow(0, 1, 1).fill_(f64::NAN);
            }
            param_with_grad(&g, kind)
        })
        .collect();
    for multi in [true, false] {
        set_cpu_fast_path(false);
        stepguard::testing::set_multi_tensor(multi);
        let state = GuardState::new();
        let mut g = StepGuard::begin(&Config::DEFAULT, "mixed", &state);
        let err = g.before_update(&params).unwrap_err();
        stepguard::testing::set_multi_tensor(true);
        set_cpu_fast_path(true);
        assert_eq!(err.check, Check::Grads);
        let names: Vec<&str> = err.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["grad of param[3]"], "multi = {multi}");
        assert_eq!((err.tensors[0].nan, err.tensors[0].numel), (1, 3));
    }
}

#[test]
fn complex_grads_are_measured_by_their_modulus() {
    let p = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::complex(
        &Tensor::from_slice(&[3.0f32, 0.0]),
        &Tensor::from_slice(&[4.0f32, 12.0]),
    );
    (&p * &g).real().sum(Kind::Float).backward();
    assert!(p.grad().defined());
    let total = f64::try_from(grad_norm([&p], 2).unwrap()).unwrap();
    let modulus = f64::try_from(p.grad().abs().norm().to_kind(Kind::Double)).unwrap();
    assert!(close(total, modulus, 1e-6), "{total} vs {modulus}");
}
