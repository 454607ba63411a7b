//! Properties of the hand API under random input: shapes (zero-size included), dtypes (f16,
//! bf16, f32, f64, complex), layouts (contiguous, transposed) and numbers (`max_norm`, norm
//! orders, eps) with their edges (0, subnormal, huge, NaN, inf). Whatever comes in: no panic;
//! either a clear error with nothing changed, or the result of the reference computation
//! (computed here in f64 from the same values).

use proptest::prelude::*;
use stepguard::safe::{self, Eps};
use stepguard::{clip_grad_norm, Check, Config, GuardState, NormType, OnNan, StepGuard};
use tch::{Kind, Tensor};

const KINDS: [Kind; 6] = [
    Kind::Half,
    Kind::BFloat16,
    Kind::Float,
    Kind::Double,
    Kind::ComplexFloat,
    Kind::ComplexDouble,
];

/// One parameter: its dtype, shape, layout and the values of its gradient.
#[derive(Debug, Clone)]
struct ParamSpec {
    kind: Kind,
    rows: i64,
    cols: i64,
    transposed: bool,
    values: Vec<f64>,
}

fn param_spec() -> impl Strategy<Value = ParamSpec> {
    (0usize..KINDS.len(), 0i64..4, 0i64..5, any::<bool>()).prop_flat_map(|(k, rows, cols, t)| {
        let kind = KINDS[k];
        let n = (rows * cols) as usize * if is_complex(kind) { 2 } else { 1 };
        prop::collection::vec(-4.0f64..4.0, n).prop_map(move |values| ParamSpec {
            kind,
            rows,
            cols,
            transposed: t,
            values,
        })
    })
}

fn is_complex(kind: Kind) -> bool {
    matches!(kind, Kind::ComplexFloat | Kind::ComplexDouble)
}

/// `max_norm`: the edges and ordinary values.
fn max_norm() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(-1.0),
        Just(5e-324),
        Just(1e-40),
        Just(f64::from(f32::MIN_POSITIVE)),
        Just(1e300),
        Just(f64::NAN),
        Just(f64::INFINITY),
        1e-3f64..10.0,
    ]
}

/// Norm orders: valid ones and the edges.
fn norm_order() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(1.0),
        Just(2.0),
        Just(f64::INFINITY),
        Just(0.5),
        Just(3.0),
        Just(7.5),
        Just(0.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::NEG_INFINITY),
    ]
}

/// A leaf parameter of `spec`'s dtype and layout whose gradient holds `spec`'s values
/// (scaled by `scale`); `plant`: the gradient's first element made NaN.
fn parameter(spec: &ParamSpec, scale: f64, plant: bool) -> Tensor {
    let d = stepguard_suite::test_device();
    let (r, c) = (spec.rows, spec.cols);
    let values = Tensor::from_slice(&spec.values).to_device(d) * scale;
    let g = if is_complex(spec.kind) {
        values.reshape([r, c, 2]).view_as_complex()
    } else {
        values.reshape([r, c])
    };
    let g = g.to_kind(spec.kind);
    let p = if spec.transposed {
        Tensor::zeros([c, r], (spec.kind, d)).tr()
    } else {
        Tensor::zeros([r, c], (spec.kind, d))
    };
    let mut p = p;
    let _ = p.fill_(0.5);
    let p = p.set_requires_grad(true);
    let loss = if is_complex(spec.kind) {
        (&p * &g).real().sum(Kind::Double)
    } else {
        (&p * &g).sum(Kind::Double)
    };
    loss.backward();
    if plant && p.numel() > 0 {
        // A view of the first element (a flattened transposed grad would be a copy).
        let _ = p.grad().get(0).get(0).fill_(f64::NAN);
    }
    p
}

/// The elements of `t` as f64 (complex: real and imaginary parts), bit patterns included.
fn values(t: &Tensor) -> Vec<f64> {
    let t = if t.is_complex() {
        t.to_kind(Kind::ComplexDouble).view_as_real()
    } else {
        t.to_kind(Kind::Double)
    };
    Vec::<f64>::try_from(t.to_device(tch::Device::Cpu).contiguous().flatten(0, -1))
        .unwrap_or_default()
}

fn bits(ts: &[Tensor]) -> Vec<Vec<u64>> {
    ts.iter()
        .map(|t| values(t).iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// The moduli of a gradient's elements, in f64.
fn moduli(g: &Tensor) -> Vec<f64> {
    let m = if g.is_complex() {
        g.to_kind(Kind::ComplexDouble).abs()
    } else {
        g.to_kind(Kind::Double).abs()
    };
    Vec::<f64>::try_from(m.to_device(tch::Device::Cpu).contiguous().flatten(0, -1))
        .unwrap_or_default()
}

/// The total `p`-norm of `grads`, as torch.nn.utils.get_total_norm defines it, in f64.
fn reference_norm(grads: &[Tensor], p: f64) -> f64 {
    let all: Vec<f64> = grads.iter().flat_map(moduli).collect();
    let m = all.iter().cloned().fold(0.0, f64::max);
    if p.is_infinite() || m == 0.0 {
        return m;
    }
    m * all
        .iter()
        .map(|x| (x / m).powf(p))
        .sum::<f64>()
        .powf(1.0 / p)
}

/// The relative error of a value rounded to `kind`.
fn tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Half => 2e-3,
        Kind::BFloat16 => 1.6e-2,
        Kind::Float | Kind::ComplexFloat => 2e-6,
        _ => 1e-12,
    }
}

/// The absolute error of a product near the bottom of `kind`'s range (a coefficient of a
/// `max_norm` near f32's smallest normal number is subnormal in f32, and the products
/// underflow f16).
fn underflow(kind: Kind) -> f64 {
    match kind {
        Kind::Half => 6e-8,
        Kind::BFloat16 => 1e-40,
        Kind::Float | Kind::ComplexFloat => 2e-42,
        _ => 1e-300,
    }
}

/// The relative error allowed of a total norm: f64 accumulation when every grad is f64 (or
/// complex f64), else per-tensor norms accumulated in f32 (f16 grads, the multi-tensor
/// operator's).
fn total_tolerance(kinds: &[Kind]) -> f64 {
    if kinds
        .iter()
        .all(|k| matches!(k, Kind::Double | Kind::ComplexDouble))
    {
        1e-12
    } else {
        4e-6
    }
}

fn valid(max_norm: f64, p: f64) -> bool {
    max_norm.is_finite() && max_norm >= f64::from(f32::MIN_POSITIVE) && p > 0.0 && !p.is_nan()
}

/// Every grad equals its value before, times `coef` (within the total's precision and the
/// dtype's rounding).
fn assert_scaled(before: &[Vec<f64>], after: &[Tensor], coef: f64, kinds: &[Kind]) {
    let coef_tol = total_tolerance(kinds);
    for ((b, a), kind) in before.iter().zip(after).zip(kinds) {
        let a = values(a);
        assert_eq!(a.len(), b.len());
        for (x, y) in b.iter().zip(&a) {
            let want = x * coef;
            let tol = (coef_tol + tolerance(*kind)) * want.abs() + underflow(*kind);
            assert!(
                (y - want).abs() <= tol,
                "{kind:?}: {y} vs {x} * {coef} = {want}"
            );
        }
    }
}

fn grads_of(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(Tensor::grad).collect()
}

proptest! {
    // PROPTEST_CASES raises the number of cases (256 by default).
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)) })]

    /// `clip_grad_norm`: an invalid `max_norm` or order is a `ConfigError` with the grads
    /// untouched; else the total is the reference's and every grad is scaled by
    /// `min(max_norm / (total + 1e-6), 1)`.
    #[test]
    fn clip_grad_norm_is_an_error_or_the_reference(
        specs in prop::collection::vec(param_spec(), 1..4),
        m in max_norm(),
        p in norm_order(),
        scale in prop_oneof![Just(1.0), Just(1e-3), Just(300.0)],
    ) {
        let params: Vec<Tensor> = specs.iter().map(|s| parameter(s, scale, false)).collect();
        let before = bits(&grads_of(&params));
        let before_values: Vec<Vec<f64>> = grads_of(&params).iter().map(values).collect();
        let kinds: Vec<Kind> = specs.iter().map(|s| s.kind).collect();
        let r = clip_grad_norm(&params, m, p);
        if !valid(m, p) {
            prop_assert!(r.is_err(), "max_norm {m}, p {p}: {r:?}");
            prop_assert_eq!(bits(&grads_of(&params)), before, "grads untouched");
            return Ok(());
        }
        let total = r.map_err(|e| TestCaseError::fail(e.to_string()))?.double_value(&[]);
        let want = reference_norm(&grads_of_values(&before_values, &kinds), p);
        let tol = total_tolerance(&kinds);
        prop_assert!(
            (total - want).abs() <= tol * want + 1e-300,
            "p {p}: total {total} vs {want} ({kinds:?})"
        );
        let coef = (m / (want + 1e-6)).min(1.0);
        assert_scaled(&before_values, &grads_of(&params), coef, &kinds);
    }

    /// `StepGuard::before_update` under a `Config` of these numbers: an invalid one is a
    /// `Check::Config` error, a NaN grad a `Check::Grads` error, each with parameters and
    /// grads unchanged; else the grads are clipped as the reference clips them.
    #[test]
    fn before_update_is_an_error_with_nothing_changed_or_the_reference(
        specs in prop::collection::vec(param_spec(), 1..4),
        m in max_norm(),
        p in norm_order(),
        plant in any::<bool>(),
    ) {
        let plant = plant && specs[0].rows * specs[0].cols > 0;
        let params: Vec<Tensor> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| parameter(s, 1.0, plant && i == 0))
            .collect();
        let kinds: Vec<Kind> = specs.iter().map(|s| s.kind).collect();
        let (params_before, grads_before) = (bits(&params), bits(&grads_of(&params)));
        let before_values: Vec<Vec<f64>> = grads_of(&params).iter().map(values).collect();
        let config = Config::DEFAULT
            .with_max_norm(m)
            .with_norm_type(NormType::from(p))
            .with_on_nan(OnNan::Error);
        let state = GuardState::new();
        let mut guard = StepGuard::begin(&config, "props", &state);
        let r = guard.before_update(&params);
        prop_assert_eq!(bits(&params), params_before, "parameters unchanged");
        if !valid(m, p) {
            let e = r.expect_err("an invalid configuration is refused");
            prop_assert_eq!(e.check, Check::Config, "{}", e);
            prop_assert_eq!(bits(&grads_of(&params)), grads_before, "grads untouched");
            return Ok(());
        }
        if plant {
            let e = r.expect_err("a NaN grad is found");
            prop_assert_eq!(e.check, Check::Grads, "{}", e);
            return Ok(());
        }
        prop_assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
        let want = reference_norm(&grads_of_values(&before_values, &kinds), p);
        let coef = (m / (want + 1e-6)).min(1.0);
        assert_scaled(&before_values, &grads_of(&params), coef, &kinds);
    }

    /// `Eps::new` refuses exactly what is not finite and above zero; the protected log and
    /// division are the plain operation where the argument is safe, finite where it was
    /// replaced, and non-finite where the input was.
    #[test]
    fn protected_ops_are_identity_on_safe_inputs_and_never_hide_non_finite_ones(
        eps in prop_oneof![Just(0.0), Just(-1e-8), Just(5e-324), Just(1e-8), Just(1e-3),
                           Just(1e300), Just(f64::NAN), Just(f64::INFINITY)],
        kind in prop_oneof![Just(Kind::Half), Just(Kind::BFloat16), Just(Kind::Float), Just(Kind::Double)],
        xs in prop::collection::vec(prop_oneof![
            -10.0f64..10.0, Just(0.0), Just(-0.0), Just(1e-12), Just(f64::NAN),
            Just(f64::INFINITY), Just(f64::NEG_INFINITY)], 0..12),
    ) {
        let e = Eps::new(eps);
        prop_assert_eq!(e.is_ok(), eps.is_finite() && eps > 0.0, "Eps::new({})", eps);
        let Ok(e) = e else { return Ok(()) };
        let d = stepguard_suite::test_device();
        let x = Tensor::from_slice(&xs).to_kind(kind).to_device(d);
        let xv = values(&x);
        let log = values(&safe::log(&x, e));
        let plain = values(&x.log());
        let q = values(&safe::div(&Tensor::ones_like(&x), &x, e));
        let plain_q = values(&(Tensor::ones_like(&x) / &x));
        let max = values(&Tensor::from(f64::MAX).to_kind(kind))[0];
        for (i, &v) in xv.iter().enumerate() {
            if v.is_nan() || v == f64::NEG_INFINITY {
                prop_assert!(log[i].is_nan(), "log({v}) = {}", log[i]);
            } else if v >= eps.max(1e-4) {
                prop_assert_eq!(log[i].to_bits(), plain[i].to_bits(), "log({}) is the plain log", v);
            } else {
                prop_assert!(log[i].is_finite(), "log({v}) = {}", log[i]);
            }
            if v.is_nan() {
                prop_assert!(q[i].is_nan(), "1 / NaN = {}", q[i]);
            } else if v.abs() >= eps.max(1e-4) {
                prop_assert_eq!(q[i].to_bits(), plain_q[i].to_bits(), "1 / {} is the plain quotient", v);
            } else {
                prop_assert!(q[i].is_finite() && q[i].abs() <= max, "1 / {v} = {}", q[i]);
            }
        }
    }
}

/// The grads as tensors again, from their values before the call (for the reference).
fn grads_of_values(values: &[Vec<f64>], kinds: &[Kind]) -> Vec<Tensor> {
    values
        .iter()
        .zip(kinds)
        .map(|(v, k)| {
            let t = Tensor::from_slice(v);
            if is_complex(*k) {
                t.reshape([-1, 2]).view_as_complex()
            } else {
                t
            }
        })
        .collect()
}
