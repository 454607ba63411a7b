//! `stepguard::clip_grad_norm` against `torch.nn.utils.clip_grad_norm_` (PyTorch 2.11.0), from
//! fixtures written by `scripts/gen_fixtures.py`.

use serde_json::Value;
use stepguard_suite::test_device;
use tch::{Kind, Tensor};

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "nan" => f64::NAN,
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        v => v.as_f64().expect("number"),
    }
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(num).collect()
}

fn kind(s: &str) -> Kind {
    match s {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        other => panic!("dtype {other}"),
    }
}

/// Same value up to 1e-6 relative (NaN matches NaN, infinities match by sign).
fn close(a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) + 1e-30
}

/// A parameter whose `.grad()` is exactly `grad` (or undefined when `None`).
fn param_with_grad(shape: &[i64], kind: Kind, grad: Option<&[f64]>) -> Tensor {
    let dev = test_device();
    let p = Tensor::zeros(shape, (kind, dev)).set_requires_grad(true);
    if let Some(g) = grad {
        let g = Tensor::from_slice(g)
            .to_kind(kind)
            .to_device(dev)
            .reshape(shape);
        // d/dp sum(p * g) = g, exactly.
        (&p * &g).sum(Kind::Double).backward();
    }
    p
}

#[test]
fn matches_pytorch_clip_grad_norm_fused_cpu_path() {
    stepguard::testing::set_cpu_fast_path(true);
    check_fixtures();
}

#[test]
fn matches_pytorch_clip_grad_norm_multi_tensor_path() {
    stepguard::testing::set_cpu_fast_path(false);
    check_fixtures();
}

#[test]
fn matches_pytorch_clip_grad_norm_per_tensor_aten_path() {
    stepguard::testing::set_cpu_fast_path(false);
    stepguard::testing::set_multi_tensor(false);
    check_fixtures();
}

fn check_fixtures() {
    // The build's own tree, or (for a binary carried to another machine) the working directory.
    let built = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clip_grad_norm.json"
    );
    let path = if std::path::Path::new(built).exists() {
        built
    } else {
        "tests/fixtures/clip_grad_norm.json"
    };
    let text = std::fs::read_to_string(path).expect("fixture");
    let fixture: Value = serde_json::from_str(&text).expect("json");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 19, "fixture has every case");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let specs = case["params"].as_array().unwrap();
        let inputs: Vec<Option<Vec<f64>>> = specs
            .iter()
            .map(|s| (!s["grad"].is_null()).then(|| nums(&s["grad"])))
            .collect();
        let params: Vec<Tensor> = specs
            .iter()
            .zip(&inputs)
            .map(|(s, g)| {
                let shape: Vec<i64> = s["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_i64().unwrap())
                    .collect();
                param_with_grad(&shape, kind(s["dtype"].as_str().unwrap()), g.as_deref())
            })
            .collect();
        let expected_total = num(&case["total"]);

        let (total, reads) = stepguard::testing::count_host_reads(|| {
            stepguard::clip_grad_norm(
                &params,
                case["max_norm"].as_f64().unwrap(),
                num(&case["norm_type"]),
            )
            .unwrap()
        });
        assert_eq!(reads, 0, "{name}: clipping read nothing back to the host");
        assert_eq!(
            total.device(),
            test_device(),
            "{name}: the norm stays on the grads' device"
        );
        let total = f64::try_from(total.to_kind(Kind::Double)).unwrap();
        assert!(
            close(total, expected_total),
            "{name}: total {total} vs torch {expected_total}"
        );

        for (i, ((p, spec), input)) in params.iter().zip(specs).zip(&inputs).enumerate() {
            let g = p.grad();
            let Some(input) = input else {
                assert!(
                    !g.defined(),
                    "{name}: param {i} had no grad and still has none"
                );
                continue;
            };
            let got = Vec::<f64>::try_from(
                g.to_kind(Kind::Double)
                    .to_device(tch::Device::Cpu)
                    .flatten(0, -1),
            )
            .unwrap();
            // A non-finite total leaves the grads as they were (PyTorch spreads NaN into all).
            let want = if expected_total.is_finite() {
                nums(&spec["clipped"])
            } else {
                input.clone()
            };
            for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(close(*a, *b), "{name}: grad {i}[{j}] = {a}, expected {b}");
            }
        }
    }
}
