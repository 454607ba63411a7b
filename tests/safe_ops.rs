#![allow(clippy::approx_constant)] // reference values written by PyTorch, not constants
//! The epsilon-protected operations on every floating dtype (f16, bf16, f32, f64): the exact
//! divisor, bitwise identity with the plain op where it is safe, finite values and gradients at
//! zero, saturation instead of overflow where the divisor was replaced, NaN kept.
//!
//! Reference values come from PyTorch 2.11.0 on the CPU (`torch.tensor(a, dtype=d) /
//! torch.tensor(b, dtype=d)`, `.log()` ..., printed with `repr` after `.double()`). Division is
//! correctly rounded on every CPU, so its reference values are compared bitwise. Logs are not
//! bitwise reproducible across CPUs and libm builds: they are compared with PyTorch's values
//! within [`LOG_ULPS`], and bitwise with the plain op run here.

use stepguard::safe::{self, Eps};
use stepguard_suite::{assert_within_ulps, test_device};
use tch::{Device, Kind, Tensor};

const KINDS: [Kind; 4] = [Kind::Half, Kind::BFloat16, Kind::Float, Kind::Double];

/// How far (in ulps of the result's dtype) a log computed here may be from the one PyTorch
/// wrote on another machine: each side is within an ulp of the exact value (Sleef's and
/// glibc's logs; f16 and bf16 are computed in f32 and rounded once).
const LOG_ULPS: u64 = 2;

/// The eps of a test, written as a number: valid in every test that calls the operations
/// (`Eps::new` itself is tested in section 4).
fn eps_of(eps: f64) -> Eps {
    Eps::new(eps).expect("a valid eps")
}

fn safe_div(a: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    safe::div(a, b, eps_of(eps))
}

fn safe_rdiv(s: f64, b: &Tensor, eps: f64) -> Tensor {
    safe::rdiv(s, b, eps_of(eps))
}

fn protect_divisor(b: &Tensor, eps: f64) -> Tensor {
    safe::protect_divisor(b, eps_of(eps))
}

fn safe_log(x: &Tensor, eps: f64) -> Tensor {
    safe::log(x, eps_of(eps))
}

fn safe_log2(x: &Tensor, eps: f64) -> Tensor {
    safe::log2(x, eps_of(eps))
}

fn safe_log10(x: &Tensor, eps: f64) -> Tensor {
    safe::log10(x, eps_of(eps))
}

/// eps values that are fine in f64 but below the smallest normal number of narrower dtypes
/// (1e-320 is even subnormal in f64).
const EPSES: [f64; 4] = [1e-8, 1e-4, 1e-50, 1e-320];

/// The largest finite value of each floating dtype.
fn finite_max(kind: Kind) -> f64 {
    match kind {
        Kind::Half => 65504.0,
        Kind::BFloat16 => 3.389_531_389_251_535_5e38,
        Kind::Float => f32::MAX as f64,
        _ => f64::MAX,
    }
}

/// The smallest normal value of each floating dtype (`torch.finfo(d).tiny`).
fn finite_min_normal(kind: Kind) -> f64 {
    match kind {
        Kind::Half => 2f64.powi(-14),
        Kind::BFloat16 | Kind::Float => 2f64.powi(-126),
        _ => f64::MIN_POSITIVE,
    }
}

fn tensor(v: &[f64], kind: Kind, d: Device) -> Tensor {
    Tensor::from_slice(v).to_kind(kind).to_device(d)
}

/// Exact values (every floating dtype converts to f64 exactly).
fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .unwrap()
}

/// Bit patterns of the exact f64 values, with every NaN the same, so that NaN == NaN.
fn bits(v: &[f64]) -> Vec<u64> {
    v.iter()
        .map(|x| {
            if x.is_nan() {
                f64::NAN.to_bits()
            } else {
                x.to_bits()
            }
        })
        .collect()
}

/// Bitwise equality of two value lists; on failure names the first few differing positions.
#[track_caller]
fn assert_same(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let diff: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| bits(&[**g]) != bits(&[**w]))
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g:e}, want {w:e}"))
        .collect();
    assert!(diff.is_empty(), "{what}: {}", diff.join("; "));
}

fn grad_values(t: &Tensor) -> Vec<f64> {
    values(&t.grad())
}

// --- 1. the replaced divisor is the eps of the divisor's own dtype ---------------------------

#[test]
fn f64_divisor_is_exactly_the_f64_eps() {
    let d = test_device();
    let b = tensor(&[0.0, -0.0, 1e-9, -1e-12], Kind::Double, d);
    assert_eq!(
        bits(&values(&protect_divisor(&b, 1e-8))),
        bits(&[1e-8, -1e-8, 1e-8, -1e-8])
    );
    let q = safe_div(
        &tensor(&[1.0, 1.0], Kind::Double, d),
        &b.narrow(0, 0, 2),
        1e-8,
    );
    // torch: float64 1 / 1e-8 == 100000000.0 exactly (not 100000000.60774711).
    assert_eq!(bits(&values(&q)), bits(&[1e8, -1e8]));
    let r = safe_rdiv(1.0, &b.narrow(0, 0, 1), 1e-8);
    assert_eq!(bits(&values(&r)), bits(&[1e8]));
}

#[test]
fn f32_divisor_is_the_f32_rounding_of_eps() {
    let d = test_device();
    let b = tensor(&[0.0, -0.0], Kind::Float, d);
    let e = 1e-8f32 as f64; // 9.99999993922529e-09
    assert_eq!(bits(&values(&protect_divisor(&b, 1e-8))), bits(&[e, -e]));
    let q = safe_div(&tensor(&[1.0, 1.0], Kind::Float, d), &b, 1e-8);
    // torch: float32 1 / float32(1e-8) == 100000000.0
    assert_eq!(bits(&values(&q)), bits(&[1e8, -1e8]));
}

#[test]
fn narrow_divisor_dtype_sets_the_eps_wide_numerator_sets_the_result() {
    // f64 numerator, f32 divisor: the divisor is f32(eps), the quotient f64.
    let d = test_device();
    let q = safe_div(
        &tensor(&[1.0], Kind::Double, d),
        &tensor(&[0.0], Kind::Float, d),
        1e-8,
    );
    assert_eq!(q.kind(), Kind::Double);
    assert_eq!(bits(&values(&q)), bits(&[1.0 / (1e-8f32 as f64)]));
}

// --- 2. bitwise identity where the op is safe, against PyTorch -------------------------------

const A: [f64; 6] = [1.0, -3.0, 7.0, 0.1, 65000.0, -2.5];
const B: [f64; 6] = [3.0, 7.0, -0.3, 1e-3, 2.0, 1e-4];
const X: [f64; 6] = [0.5, 2.0, 10.0, 1e-3, 7.0, 1e-4];

fn torch_div(kind: Kind) -> [f64; 6] {
    match kind {
        Kind::Half => [
            0.333251953125,
            -0.428466796875,
            -23.328125,
            99.9375,
            32496.0,
            -24992.0,
        ],
        Kind::BFloat16 => [0.333984375, -0.427734375, -23.25, 100.0, 32512.0, -24960.0],
        Kind::Float => [
            0.3333333432674408,
            -0.4285714328289032,
            -23.333332061767578,
            100.0,
            32500.0,
            -25000.0,
        ],
        _ => [
            0.3333333333333333,
            -0.42857142857142855,
            -23.333333333333336,
            100.0,
            32500.0,
            -25000.0,
        ],
    }
}

fn torch_log(kind: Kind) -> [[f64; 6]; 3] {
    match kind {
        Kind::Half => [
            [
                -0.693359375,
                0.693359375,
                2.302734375,
                -6.90625,
                1.9462890625,
                -9.2109375,
            ],
            [-1.0, 1.0, 3.322265625, -9.96875, 2.806640625, -13.2890625],
            [
                -0.301025390625,
                0.301025390625,
                1.0,
                -3.0,
                0.84521484375,
                -4.0,
            ],
        ],
        Kind::BFloat16 => [
            [
                -0.69140625,
                0.69140625,
                2.296875,
                -6.90625,
                1.9453125,
                -9.1875,
            ],
            [-1.0, 1.0, 3.328125, -9.9375, 2.8125, -13.3125],
            [-0.30078125, 0.30078125, 1.0, -3.0, 0.84375, -4.0],
        ],
        Kind::Float => [
            [
                -0.6931471824645996,
                0.6931471824645996,
                2.3025851249694824,
                -6.907755374908447,
                1.945910096168518,
                -9.21034049987793,
            ],
            [
                -1.0,
                1.0,
                3.321928024291992,
                -9.965784072875977,
                2.8073549270629883,
                -13.287712097167969,
            ],
            [
                -0.3010300099849701,
                0.3010300099849701,
                1.0,
                -3.0,
                0.8450980186462402,
                -4.0,
            ],
        ],
        _ => [
            [
                -0.6931471805599453,
                0.6931471805599453,
                2.302585092994046,
                -6.907755278982137,
                1.9459101490553132,
                -9.210340371976182,
            ],
            [
                -1.0,
                1.0,
                3.321928094887362,
                -9.965784284662087,
                2.807354922057604,
                -13.287712379549449,
            ],
            [
                -0.3010299956639812,
                0.3010299956639812,
                1.0,
                -3.0,
                0.8450980400142568,
                -4.0,
            ],
        ],
    }
}

#[test]
fn safe_division_matches_pytorch_bitwise_on_every_dtype() {
    // IEEE division is correctly rounded, and f16 / bf16 quotients computed in f32 and rounded
    // again are still the correctly rounded ones: the same bits on every CPU.
    let d = Device::Cpu; // the reference values are CPU results
    for kind in KINDS {
        let (a, b) = (tensor(&A, kind, d), tensor(&B, kind, d));
        // Every |b| is >= 1e-4 >= the eps in use (for f16, eps is raised to 2^-14).
        for eps in [1e-8, 1e-50, 1e-320] {
            let q = safe_div(&a, &b, eps);
            assert_eq!(q.kind(), kind);
            assert_eq!(
                bits(&values(&q)),
                bits(&torch_div(kind)),
                "{kind:?} eps {eps:e}"
            );
        }
    }
}

#[test]
fn safe_logs_match_pytorch_within_ulps_and_the_plain_op_bitwise_on_every_dtype() {
    let d = Device::Cpu; // the reference values are CPU results
    type LogFn = fn(&Tensor, f64) -> Tensor;
    for kind in KINDS {
        let x = tensor(&X, kind, d);
        // Every x is >= 1e-4 >= the eps in use: the protected op is the plain one.
        for eps in [1e-8, 1e-50, 1e-320] {
            let [ln, l2, l10] = torch_log(kind);
            let cases: [(&str, LogFn, Tensor, [f64; 6]); 3] = [
                ("log", safe_log, x.log(), ln),
                ("log2", safe_log2, x.log2(), l2),
                ("log10", safe_log10, x.log10(), l10),
            ];
            for (name, f, plain, torch) in cases {
                let what = format!("{kind:?} {name} {eps:e}");
                let got = f(&x, eps);
                assert_eq!(got.kind(), kind, "{what}");
                let got = values(&got);
                assert_same(&got, &values(&plain), &format!("{what} vs the plain op"));
                assert_within_ulps(&got, &torch, kind, LOG_ULPS, &format!("{what} vs PyTorch"));
            }
        }
    }
}

#[test]
fn safe_inputs_are_bitwise_the_plain_op_on_every_dtype() {
    let d = test_device();
    tch::manual_seed(7);
    for kind in KINDS {
        for eps in EPSES {
            let a = (Tensor::randn([4000], (Kind::Double, d)) * 100.0).to_kind(kind);
            let b = Tensor::randn([4000], (Kind::Double, d)).to_kind(kind);
            // Keep |b| >= eps (as the dtype sees it): replace the small ones by 0.25, and put
            // the threshold itself in, where the plain op must still be used.
            let eps_k = values(&protect_divisor(&tensor(&[0.0], kind, d), eps))[0];
            let b = b.where_scalarother(&b.abs().ge(eps_k), 0.25);
            let edge = tensor(&[eps_k, -eps_k, eps_k, 1.0], kind, d);
            let a_edge = tensor(&[1.0, 5.0, -1e4, 1.0], kind, d);
            let a = Tensor::cat(&[a, a_edge], 0);
            let b = Tensor::cat(&[b, edge], 0);
            let what = format!("{kind:?} eps {eps:e}");
            assert_same(&values(&safe_div(&a, &b, eps)), &values(&(&a / &b)), &what);
            assert_same(
                &values(&safe_rdiv(3.0, &b, eps)),
                &values(&(3.0 / &b)),
                &what,
            );
            let x = b.abs();
            assert_same(&values(&safe_log(&x, eps)), &values(&x.log()), &what);
            assert_same(&values(&safe_log2(&x, eps)), &values(&x.log2()), &what);
            assert_same(&values(&safe_log10(&x, eps)), &values(&x.log10()), &what);
        }
    }
}

// --- 3. finite values and gradients at zero, on every dtype and eps --------------------------

#[test]
fn division_by_zero_is_finite_with_finite_grads_on_every_dtype() {
    let d = test_device();
    let av = [1.0, 5.0, 100.0, -3.0, 0.0, 1e4, -7.0];
    let bv = [0.0, -0.0, 1e-6, 0.0, 0.0, -1e-45, -0.0];
    for kind in KINDS {
        for eps in EPSES {
            let what = format!("{kind:?} eps {eps:e}");
            let a = tensor(&av, kind, d).set_requires_grad(true);
            let b = tensor(&bv, kind, d).set_requires_grad(true);
            let q = safe_div(&a, &b, eps);
            assert_eq!(q.kind(), kind);
            let v = values(&q);
            assert!(v.iter().all(|x| x.is_finite()), "{what}: {v:?}");
            let signs: Vec<bool> = v.iter().map(|x| x.is_sign_negative()).collect();
            assert_eq!(
                signs,
                [false, true, false, true, false, true, false],
                "{what}: {v:?}"
            );
            q.sum(Kind::Double).backward();
            let (ga, gb) = (grad_values(&a), grad_values(&b));
            assert!(
                ga.iter().chain(&gb).all(|g| g.is_finite()),
                "{what}: {ga:?} {gb:?}"
            );

            let r = safe_rdiv(-5.0, &tensor(&bv, kind, d), eps);
            assert!(values(&r).iter().all(|x| x.is_finite()), "{what} rdiv");
        }
    }
}

#[test]
fn half_quotients_saturate_instead_of_overflowing() {
    // Today: [16384, -inf, inf].
    let d = test_device();
    let q = safe_div(
        &tensor(&[1.0, 5.0, 100.0], Kind::Half, d),
        &tensor(&[0.0, -0.0, 1e-6], Kind::Half, d),
        1e-8,
    );
    assert_eq!(values(&q), [16384.0, -65504.0, 65504.0]);
    let q = safe_div(
        &tensor(&[1.0, 5.0, -1e38], Kind::BFloat16, d),
        &tensor(&[0.0, -0.0, 1e-9], Kind::BFloat16, d),
        1e-8,
    );
    let v = values(&q);
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    assert_eq!(v[2], -finite_max(Kind::BFloat16));
}

#[test]
fn overflow_saturates_only_where_the_divisor_was_replaced() {
    let d = test_device();
    for kind in [Kind::Float, Kind::Double] {
        let big = finite_max(kind) / 4.0;
        let a = tensor(&[big, -big, big, big], kind, d).set_requires_grad(true);
        let b = tensor(&[0.0, 0.0, 1e-30, 0.1], kind, d);
        let q = safe_div(&a, &b, 1e-8);
        let v = values(&q);
        let max = finite_max(kind);
        assert_eq!(v[..2], [max, -max], "{kind:?}");
        // 1e-30 < eps: replaced as well.
        assert_eq!(v[2], max, "{kind:?}");
        // |b| >= eps: the plain op, overflow included (it is a real overflow, not ours).
        assert_eq!(v[3], f64::INFINITY, "{kind:?}");
        q.narrow(0, 0, 3).sum(Kind::Double).backward();
        assert!(grad_values(&a).iter().all(|g| g.is_finite()), "{kind:?}");
    }
    // eps below the smallest normal: f32 1 / 2^-126 is finite, 5 / 2^-126 saturates.
    let q = safe_div(
        &tensor(&[1.0, 5.0], Kind::Float, d),
        &tensor(&[0.0, 0.0], Kind::Float, d),
        1e-50,
    );
    assert_eq!(values(&q), [8.507059173023462e37, f32::MAX as f64]);
    let q = safe_div(
        &tensor(&[1.0, 5.0], Kind::Double, d),
        &tensor(&[0.0, 0.0], Kind::Double, d),
        1e-320,
    );
    assert_eq!(values(&q), [4.49423283715579e307, f64::MAX]);
}

#[test]
fn nan_and_inf_inputs_are_not_hidden() {
    let d = test_device();
    let inf = f64::INFINITY;
    for kind in KINDS {
        let a = tensor(&[f64::NAN, 1.0, inf, -inf, 0.0, f64::NAN], kind, d);
        let b = tensor(&[0.0, f64::NAN, 0.0, -0.0, 0.0, 1.0], kind, d);
        let v = values(&safe_div(&a, &b, 1e-8));
        assert!(
            v[0].is_nan() && v[1].is_nan() && v[5].is_nan(),
            "{kind:?} {v:?}"
        );
        assert_eq!(v[2..5], [inf, inf, 0.0], "{kind:?}");
        let r = values(&safe_rdiv(f64::NAN, &tensor(&[0.0], kind, d), 1e-8));
        assert!(r[0].is_nan(), "{kind:?}");
        let r = values(&safe_rdiv(-inf, &tensor(&[0.0], kind, d), 1e-8));
        assert_eq!(r, [-inf], "{kind:?}");
        let x = tensor(&[f64::NAN, 0.0], kind, d);
        for l in [
            safe_log(&x, 1e-8),
            safe_log2(&x, 1e-8),
            safe_log10(&x, 1e-8),
        ] {
            let v = values(&l);
            assert!(v[0].is_nan() && v[1].is_finite(), "{kind:?} {v:?}");
        }
    }
}

#[test]
fn log_of_zero_is_finite_with_finite_grads_on_every_dtype() {
    let d = test_device();
    for kind in KINDS {
        for eps in EPSES {
            let what = format!("{kind:?} eps {eps:e}");
            type LogFn = fn(&Tensor, f64) -> Tensor;
            let fs: [LogFn; 3] = [safe_log, safe_log2, safe_log10];
            for f in fs {
                let x = tensor(&[0.0, -0.0, -1.0, 1e-300, 1.0], kind, d).set_requires_grad(true);
                let l = f(&x, eps);
                assert_eq!(l.kind(), kind);
                let v = values(&l);
                assert!(v.iter().all(|y| y.is_finite()), "{what}: {v:?}");
                l.sum(Kind::Double).backward();
                let g = grad_values(&x);
                assert!(g.iter().all(|y| y.is_finite()), "{what}: {g:?}");
            }
        }
    }
}

#[test]
fn log_below_the_smallest_normal_is_the_log_of_the_smallest_normal() {
    // torch: torch.tensor([torch.finfo(d).tiny], dtype=d).log() / .log2() / .log10()
    let d = test_device();
    let cases = [
        (Kind::Half, [-9.703125, -14.0, -4.21484375]),
        (Kind::BFloat16, [-87.5, -126.0, -38.0]),
        (
            Kind::Float,
            [-87.3365478515625, -126.0, -37.929779052734375],
        ),
        (
            Kind::Double,
            [-708.3964185322641, -1022.0, -307.6526555685888],
        ),
    ];
    for (kind, expected) in cases {
        let x = tensor(&[0.0], kind, d);
        let got = [
            values(&safe_log(&x, 1e-320))[0],
            values(&safe_log2(&x, 1e-320))[0],
            values(&safe_log10(&x, 1e-320))[0],
        ];
        // Bitwise the plain op on the smallest normal, run here.
        let tiny = tensor(&[finite_min_normal(kind)], kind, d);
        let plain = [
            values(&tiny.log())[0],
            values(&tiny.log2())[0],
            values(&tiny.log10())[0],
        ];
        assert_same(&got, &plain, &format!("{kind:?} vs the plain op"));
        if d == Device::Cpu {
            assert_within_ulps(&got, &expected, kind, LOG_ULPS, &format!("{kind:?}"));
        } else {
            assert!(got
                .iter()
                .zip(&expected)
                .all(|(g, e)| (g - e).abs() < 1e-2 * e.abs()));
        }
    }
}

#[test]
fn in_place_division_is_protected_like_safe_div() {
    let d = test_device();
    let mut a = tensor(&[1.0, 5.0, 100.0, f64::INFINITY, 3.0], Kind::Half, d);
    let b = tensor(&[0.0, -0.0, 1e-6, 0.0, 7.0], Kind::Half, d);
    let want = values(&safe_div(&a, &b, 1e-8));
    safe::div_assign(&mut a, &b, eps_of(1e-8));
    assert_same(&values(&a), &want, "f16 in place");
    assert_eq!(values(&a)[..4], [16384.0, -65504.0, 65504.0, f64::INFINITY]);
    for kind in KINDS {
        let mut a = (Tensor::randn([1000], (Kind::Double, d)) * 10.0).to_kind(kind);
        let b = Tensor::randn([1000], (Kind::Double, d)).to_kind(kind);
        let b = b.where_scalarother(&b.abs().ge(1e-3), 0.0);
        let want = values(&safe_div(&a, &b, 1e-8));
        safe::div_assign(&mut a, &b, eps_of(1e-8));
        assert_same(&values(&a), &want, &format!("{kind:?} in place"));
    }
}

// --- 4. eps validation -----------------------------------------------------------------------

#[test]
fn eps_new_rejects_zero_negative_nan_and_infinite() {
    use stepguard::ConfigError;
    for ok in [1e-8, 1e-320, 0.5, 1e30, f64::MAX] {
        assert_eq!(Eps::new(ok).map(Eps::get), Ok(ok));
        assert_eq!(Eps::try_from(ok).map(f64::from), Ok(ok));
    }
    for bad in [0.0, -0.0, -1e-8, -1.0, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(Eps::new(bad), Err(ConfigError::Eps(bad)), "{bad}");
        assert_eq!(Eps::try_from(bad), Err(ConfigError::Eps(bad)), "{bad}");
    }
    assert!(matches!(Eps::new(f64::NAN), Err(ConfigError::Eps(v)) if v.is_nan()));
    for (bad, message) in [
        (0.0, "stepguard: eps must be a finite number > 0, got 0"),
        (
            f64::NAN,
            "stepguard: eps must be a finite number > 0, got NaN",
        ),
        (
            -1e-3,
            "stepguard: eps must be a finite number > 0, got -0.001",
        ),
    ] {
        assert_eq!(Eps::new(bad).unwrap_err().to_string(), message);
    }
    // Usable in a const.
    const EPS: Eps = match Eps::new(1e-6) {
        Ok(e) => e,
        Err(_) => panic!("1e-6 is a valid eps"),
    };
    assert_eq!(EPS.get(), 1e-6);
}

#[test]
fn the_default_eps_is_the_attributes_1e_8() {
    assert_eq!(Eps::DEFAULT.get(), 1e-8);
    assert_eq!(Eps::default(), Eps::DEFAULT);
    let d = test_device();
    let a = tensor(&[1.0, 5.0, -2.0], Kind::Float, d);
    let b = tensor(&[0.0, -0.0, 4.0], Kind::Float, d);
    assert_same(
        &values(&safe::div(&a, &b, Eps::DEFAULT)),
        &values(&(&a / tensor(&[1e-8, -1e-8, 4.0], Kind::Float, d))),
        "div by the default eps",
    );
}
