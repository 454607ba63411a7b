//! `stepguard::optim` against PyTorch 2.11's `fused=True` optimizers (fixtures written by
//! `scripts/gen_optim_fixtures.py`), the device-side skip, lazily created buffers when the first
//! step is skipped, checkpoints, and agreement with tch's own optimizers.

use serde_json::Value;
use stepguard::optim::{Adam, AdamW, FusedOptimizer, GuardedOptimizer, Sgd};
use stepguard_suite::ulp;

#[path = "support/optim_case.rs"]
mod optim_case;
use optim_case::build;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// How far a parameter may be from the value PyTorch wrote into the fixture, in f32 ulps of the
/// largest value of that parameter. The fixture comes from one CPU kernel of one machine; the
/// kernels ATen picks elsewhere (`ATEN_CPU_CAPABILITY=default` rounds `a * b + c` twice where the
/// AVX2 and AVX-512 ones fuse it) and the machine's libm (`pow` in Adam's bias correction) move
/// the last bits: up to 2 such ulps measured (53 ulps of the value itself, for an SGD
/// parameter near zero after cancellation). Bitwise claims are checked against runs on the same
/// machine (skipped steps, checkpoints).
const FIXTURE_ULPS: f64 = 4.0;

fn fixtures() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fused_optim.json"
    );
    let path = if std::path::Path::new(path).exists() {
        path.to_string()
    } else {
        "tests/fixtures/fused_optim.json".to_string()
    };
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).unwrap()
}

fn shapes(case: &Value) -> Vec<Vec<i64>> {
    case["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// The parameters and gradients of the fixtures (same formulas as the generator).
fn init(i: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.37 + i as f64)).sin() * 0.5)
        .reshape(shape)
        .to_kind(Kind::Float)
}

fn grad(step: usize, i: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.71 + i as f64)) + step as f64 * 1.3)
        .cos()
        .reshape(shape)
        .to_kind(Kind::Float)
}

fn var_store(shapes: &[Vec<i64>]) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    for (i, s) in shapes.iter().enumerate() {
        let _ = vs.root().var_copy(&format!("p{i}"), &init(i, s));
    }
    vs
}

fn params(vs: &nn::VarStore, n: usize) -> Vec<Tensor> {
    let v = vs.variables();
    (0..n)
        .map(|i| v[&format!("p{i}")].shallow_clone())
        .collect()
}

fn set_grads(ps: &[Tensor], step: usize, shapes: &[Vec<i64>]) {
    for (i, (p, s)) in ps.iter().zip(shapes).enumerate() {
        let mut g = p.grad();
        if !g.defined() {
            // d/dp sum(p * g) = g
            (p * &grad(step, i, s)).sum(Kind::Float).backward();
        } else {
            g.copy_(&grad(step, i, s));
        }
    }
}

fn values(ps: &[Tensor]) -> Vec<Vec<f32>> {
    ps.iter()
        .map(|p| Vec::<f32>::try_from(p.flatten(0, -1)).unwrap())
        .collect()
}

#[test]
fn every_option_matches_pytorchs_fused_optimizers() {
    let fx = fixtures();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let shapes = shapes(case);
        let vs = var_store(&shapes);
        let ps = params(&vs, shapes.len());
        let mut opt = build(case, &vs);
        for (k, expected) in case["steps"].as_array().unwrap().iter().enumerate() {
            set_grads(&ps, k, &shapes);
            opt.step();
            for (i, p) in values(&ps).iter().enumerate() {
                let want: Vec<f64> = expected[i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(p.len(), want.len());
                let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
                let tol = FIXTURE_ULPS * ulp(scale, Kind::Float);
                for (j, (g, w)) in p.iter().zip(&want).enumerate() {
                    let g = f64::from(*g);
                    assert!(
                        (g - w).abs() <= tol,
                        "{} {} step {k} param {i}[{j}]: {g:e} vs PyTorch {w:e} ({:.2} ulps of {scale:e})",
                        case["optimizer"],
                        case["options"],
                        (g - w).abs() / ulp(scale, Kind::Float)
                    );
                }
            }
        }
    }
}

/// Runs `steps` steps; at `skipped` the kernel gets found_inf = 1 (and the grads are garbage).
fn run_with_skip(
    case: &Value,
    steps: usize,
    skipped: Option<usize>,
) -> (Vec<Vec<f32>>, Vec<(String, Tensor)>) {
    let shapes = shapes(case);
    let vs = var_store(&shapes);
    let ps = params(&vs, shapes.len());
    let mut opt = build(case, &vs);
    let mut k = 0;
    for s in 0..steps + usize::from(skipped.is_some()) {
        if Some(s) == skipped {
            set_grads(&ps, 99, &shapes);
            let inf = Tensor::from(1.0f32);
            opt.step_with(None, Some(&inf)).unwrap();
            continue;
        }
        set_grads(&ps, k, &shapes);
        opt.step_with(None, Some(&Tensor::from(0.0f32))).unwrap();
        k += 1;
    }
    (values(&ps), opt.state())
}

#[test]
fn a_step_skipped_on_the_device_leaves_params_moments_and_counters_as_if_it_never_came() {
    let fx = fixtures();
    for case in fx["cases"].as_array().unwrap() {
        for skipped in [0, 2] {
            let (clean, clean_state) = run_with_skip(case, 3, None);
            let (with_skip, skip_state) = run_with_skip(case, 3, Some(skipped));
            let label = format!(
                "{} {} skipped at {skipped}",
                case["optimizer"], case["options"]
            );
            assert_eq!(clean, with_skip, "params: {label}");
            assert_eq!(clean_state.len(), skip_state.len(), "{label}");
            for ((n, a), (_, b)) in clean_state.iter().zip(&skip_state) {
                assert!(a.equal(b), "state {n}: {label}");
            }
        }
    }
}

#[test]
fn a_checkpoint_resumes_bitwise() {
    let fx = fixtures();
    for case in fx["cases"].as_array().unwrap() {
        let shapes = shapes(case);
        let (vs, vs2) = (var_store(&shapes), var_store(&shapes));
        let (ps, ps2) = (params(&vs, shapes.len()), params(&vs2, shapes.len()));
        let mut opt = build(case, &vs);
        for k in 0..2 {
            set_grads(&ps, k, &shapes);
            opt.step();
        }
        // Resume: copy the parameters and the optimizer state into a fresh optimizer.
        tch::no_grad(|| {
            for (a, b) in ps.iter().zip(&ps2) {
                b.shallow_clone().copy_(a);
            }
        });
        let mut resumed = build(case, &vs2);
        let file = std::env::temp_dir().join(format!("stepguard-optim-{}.ot", std::process::id()));
        opt.save(&file).unwrap();
        resumed.load(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        for k in 2..4 {
            set_grads(&ps, k, &shapes);
            set_grads(&ps2, k, &shapes);
            opt.step();
            resumed.step();
        }
        assert_eq!(
            values(&ps),
            values(&ps2),
            "{} {}",
            case["optimizer"],
            case["options"]
        );
    }
}

#[test]
fn close_to_tchs_own_optimizers() {
    let shapes = vec![vec![3, 4], vec![5]];
    for which in 0..3 {
        let (a, b) = (var_store(&shapes), var_store(&shapes));
        let (pa, pb) = (params(&a, 2), params(&b, 2));
        let mut tch_opt = match which {
            0 => nn::Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(&a, 0.1)
            .unwrap(),
            1 => nn::Adam::default().build(&a, 0.01).unwrap(),
            _ => nn::AdamW::default().build(&a, 0.01).unwrap(),
        };
        let mut ours = match which {
            0 => Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(&b, 0.1)
            .unwrap(),
            1 => Adam::default().build(&b, 0.01).unwrap(),
            _ => AdamW::default().build(&b, 0.01).unwrap(),
        };
        for k in 0..5 {
            set_grads(&pa, k, &shapes);
            set_grads(&pb, k, &shapes);
            tch_opt.step();
            ours.step();
        }
        for (x, y) in values(&pa)
            .iter()
            .flatten()
            .zip(values(&pb).iter().flatten())
        {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "{which}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn parameter_groups_have_their_own_learning_rate_and_the_guard_sees_the_optimizer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let a = vs
        .root()
        .var_copy("a", &Tensor::ones([2], (Kind::Float, Device::Cpu)));
    let b = vs
        .root()
        .set_group(1)
        .var_copy("b", &Tensor::ones([2], (Kind::Float, Device::Cpu)));
    let mut opt = Sgd::default().build(&vs, 0.1).unwrap();
    opt.set_lr_group(1, 0.5);
    assert_eq!(opt.guard_params().len(), 2);
    (&a + &b).sum(Kind::Float).backward();
    opt.step();
    assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![0.9, 0.9]);
    assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![0.5, 0.5]);
}

#[test]
fn invalid_hyper_parameters_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    assert!(Adam {
        beta1: 1.0,
        ..Default::default()
    }
    .build(&vs, 1e-3)
    .is_err());
    assert!(Sgd::default().build(&vs, f64::NAN).is_err());
    assert!(AdamW {
        eps: -1.0,
        ..Default::default()
    }
    .build(&vs, 1e-3)
    .is_err());
}

#[stepguard::guarded_step(max_norm = 1, on_nan = "skip")]
fn guarded(opt: &mut FusedOptimizer, vs: &nn::VarStore, w: &Tensor, x: &Tensor) {
    let _ = vs;
    let loss = (x.matmul(w)).pow_tensor_scalar(2).sum(Kind::Float);
    opt.backward_step(&loss);
}

#[test]
fn switching_to_a_fused_optimizer_under_the_attribute_is_one_line() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var_copy("w", &init(0, &[4, 2]));
    let mut opt = AdamW::default().build(&vs, 1e-2).unwrap();
    let x = init(1, &[3, 4]) * 10.0;
    guarded(&mut opt, &vs, &w, &x);
    let after_one = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
    let state = opt.state();
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    guarded(&mut opt, &vs, &w, &bad);
    assert_eq!(
        Vec::<f32>::try_from(w.flatten(0, -1)).unwrap(),
        after_one,
        "skipped"
    );
    for ((n, a), (_, b)) in state.iter().zip(opt.state().iter()) {
        assert!(a.equal(b), "{n} untouched by the skipped batch");
    }
}

#[test]
fn backward_step_clip_norm_clips_before_the_step() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs
        .root()
        .var_copy("w", &Tensor::zeros([2], (Kind::Float, Device::Cpu)));
    let mut opt = Sgd::default().build(&vs, 1.0).unwrap();
    let loss = (&w * Tensor::from_slice(&[30.0f32, 40.0])).sum(Kind::Float);
    opt.backward_step_clip_norm(&loss, 1.0);
    let v = Vec::<f32>::try_from(&w).unwrap();
    assert!(
        (v[0] + 0.6).abs() < 1e-5 && (v[1] + 0.8).abs() < 1e-5,
        "{v:?}"
    );
}

/// Every parameter and every state entry, copied.
fn everything(ps: &[Tensor], opt: &FusedOptimizer) -> Vec<(String, Tensor)> {
    let params = ps
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("param {i}"), p.copy()));
    params.chain(opt.state()).collect()
}

fn assert_untouched(before: &[(String, Tensor)], after: &[(String, Tensor)], label: &str) {
    let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(before), names(after), "{label}: the state's entries");
    for ((n, a), (_, b)) in before.iter().zip(after) {
        assert!(a.equal(b), "{label}: {n} changed");
    }
}

fn each_optimizer(vs: &nn::VarStore) -> Vec<(&'static str, FusedOptimizer)> {
    vec![
        (
            "sgd",
            Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(vs, 0.1)
            .unwrap(),
        ),
        ("adam", Adam::default().build(vs, 0.01).unwrap()),
        ("adamw", AdamW::default().build(vs, 0.01).unwrap()),
    ]
}

#[test]
fn a_step_the_kernel_rejects_leaves_params_moments_and_counters_untouched() {
    // A float parameter next to a complex one, which no fused kernel takes.
    let vs = nn::VarStore::new(Device::Cpu);
    let real = vs.root().var_copy("real", &init(0, &[3]));
    let complex = vs.root().add(
        "complex",
        Tensor::ones([2], (Kind::ComplexFloat, Device::Cpu)),
        true,
    );
    let ps = [real.shallow_clone(), complex.shallow_clone()];
    for (name, mut opt) in each_optimizer(&vs) {
        opt.zero_grad();
        (real.sum(Kind::Float) + complex.abs().sum(Kind::Float)).backward();
        let before = everything(&ps, &opt);
        let e = opt
            .try_step()
            .expect_err("no fused kernel for complex tensors");
        assert!(!e.to_string().is_empty());
        assert_untouched(&before, &everything(&ps, &opt), name);
    }
}

#[test]
fn a_checkpoint_of_another_dtype_is_refused_and_changes_nothing() {
    let shapes = vec![vec![3], vec![2, 2]];
    let vs = var_store(&shapes);
    let ps = params(&vs, 2);
    for (name, mut opt) in each_optimizer(&vs) {
        set_grads(&ps, 0, &shapes);
        opt.step();
        let good = opt.state();
        // The second parameter's first moment (momentum buffer) in f64, its parameter in f32.
        let bad: Vec<(String, Tensor)> = good
            .iter()
            .map(|(n, t)| {
                let t = if n == "1.first" {
                    t.to_kind(Kind::Double)
                } else {
                    t.copy()
                };
                (n.clone(), t)
            })
            .collect();
        let before = everything(&ps, &opt);
        assert!(opt.load_state(&bad).is_err(), "{name}: refused");
        assert_untouched(&before, &everything(&ps, &opt), name);
        // The next step is the one of an optimizer that never saw the bad checkpoint.
        set_grads(&ps, 1, &shapes);
        assert!(opt.try_step().is_ok(), "{name}");
    }
}
