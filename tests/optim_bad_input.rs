//! `stepguard::optim` on inputs its fused kernels do not take as they are: sparse gradients
//! (an `nn::embedding` with `sparse: true`), parameters whose dtype or device changed after the
//! optimizer state was created (`vs.double()`, `vs.set_device(..)`), grads of another dtype than
//! their parameter, parameters resized under their state. What PyTorch and tch accept steps as
//! they do (numbers from `scripts/gen_optim_follow_fixtures.py`, and bitwise against the same op
//! run here); what they refuse is an `Err` that names the parameter and changes nothing. On
//! every path: `try_step`, `step_with`, `step`, `backward_step`, `#[guarded_step]`.

#![allow(clippy::result_large_err)]

use serde_json::Value;
use stepguard::optim::{Adam, AdamW, FusedOptimizer, Sgd};
use stepguard::{guarded_step, GuardError};
use stepguard_suite::ulp;

#[path = "support/optim_case.rs"]
mod optim_case;
use optim_case::build;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// See `tests/fused_optim.rs`: PyTorch's fixture comes from one CPU kernel of one machine;
/// kernels and libm of another move the last bits. Bitwise claims are checked against the same
/// op run here.
const FIXTURE_ULPS: f64 = 4.0;

/// The guarded functions share their sites: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fixtures() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/optim_follow.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).unwrap()
}

/// The generator's formulas, in f64.
fn init(i: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.37 + i as f64)).sin() * 0.5)
        .reshape(shape)
}

fn grad(step: usize, i: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.71 + i as f64)) + step as f64 * 1.3)
        .cos()
        .reshape(shape)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        t.to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .flatten(0, -1),
    )
    .unwrap()
}

fn bits(ts: &[Tensor]) -> Vec<Vec<u64>> {
    ts.iter()
        .map(|t| values(t).iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// The fixture's values: decimal strings, parsed exactly (serde_json's own parsing of numbers
/// may be an ulp off in f64).
fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().parse().unwrap())
        .collect()
}

/// Within [`FIXTURE_ULPS`] ulps (of `kind`) of the largest value of the reference.
#[track_caller]
fn assert_near(got: &[f64], want: &[f64], kind: Kind, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let tol = FIXTURE_ULPS * ulp(scale, kind);
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{j}]: {g:e} vs PyTorch {w:e} ({:.2} ulps of {scale:e})",
            (g - w).abs() / ulp(scale, kind)
        );
    }
}

/// Every parameter and every state entry, copied.
fn everything(ps: &[Tensor], opt: &FusedOptimizer) -> Vec<(String, Tensor)> {
    let params = ps
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("param {i}"), p.copy()));
    params.chain(opt.state()).collect()
}

#[track_caller]
fn assert_untouched(before: &[(String, Tensor)], after: &[(String, Tensor)], label: &str) {
    let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(before), names(after), "{label}: the state's entries");
    for ((n, a), (_, b)) in before.iter().zip(after) {
        assert!(
            a.kind() == b.kind() && a.device() == b.device() && a.equal(b),
            "{label}: {n} changed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Sparse gradients.

/// How a test drives one step.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    TryStep,
    Step,
    StepWith,
    BackwardStep,
    Guarded,
    GuardedDeferred,
}

const PATHS: [Path; 6] = [
    Path::TryStep,
    Path::Step,
    Path::StepWith,
    Path::BackwardStep,
    Path::Guarded,
    Path::GuardedDeferred,
];

#[guarded_step(on_nan = "error")]
fn guarded_backward_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    loss: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    opt.backward_step(loss);
    Ok(())
}

#[guarded_step(sync = "deferred", on_nan = "error")]
fn deferred_backward_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    loss: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    opt.backward_step(loss);
    Ok(())
}

/// One step of `opt` on `loss` along `path`.
fn step_along(
    path: Path,
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    loss: &Tensor,
) -> Result<(), String> {
    let backward = |opt: &mut FusedOptimizer| {
        opt.zero_grad();
        loss.backward();
    };
    match path {
        Path::TryStep => {
            backward(opt);
            opt.try_step().map_err(|e| e.to_string())
        }
        Path::Step => {
            backward(opt);
            opt.step();
            Ok(())
        }
        Path::StepWith => {
            backward(opt);
            let no = Tensor::from(0.0f32);
            opt.step_with(None, Some(&no)).map_err(|e| e.to_string())
        }
        Path::BackwardStep => {
            opt.backward_step(loss);
            Ok(())
        }
        Path::Guarded => guarded_backward_step(opt, vs, loss).map_err(|e| e.to_string()),
        Path::GuardedDeferred => {
            let r = deferred_backward_step(opt, vs, loss).map_err(|e| e.to_string());
            // The verdict is read at the next update or here.
            r.and(stepguard::flush().map_err(|e| e.to_string()))
        }
    }
}

/// A `VarStore` with a dense linear layer (`dense.weight`, `dense.bias`) and an embedding with
/// sparse grads (`emb.weight`) initialised as the fixture's.
fn sparse_model(rows: i64, dim: i64) -> (nn::VarStore, nn::Linear, nn::Embedding) {
    let vs = nn::VarStore::new(Device::Cpu);
    let dense = nn::linear(vs.root() / "dense", dim, 2, Default::default());
    let emb = nn::embedding(
        vs.root() / "emb",
        rows,
        dim,
        nn::EmbeddingConfig {
            sparse: true,
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        let mut w = emb.ws.shallow_clone();
        w.copy_(&init(0, &[rows, dim]).to_kind(Kind::Float));
        let mut dw = dense.ws.shallow_clone();
        dw.copy_(&init(2, &[2, dim]).to_kind(Kind::Float));
    });
    (vs, dense, emb)
}

/// The fixture's loss of step `k`: `sum(emb(idx) * w_k)`, whose grad is sparse with `idx`'s
/// rows (repeated rows not summed), plus, with `dense`, a term of the dense layer.
fn sparse_loss(
    emb: &nn::Embedding,
    dense: Option<&nn::Linear>,
    idx: &[i64],
    dim: i64,
    k: usize,
) -> Tensor {
    let w = grad(k, 1, &[idx.len() as i64, dim]).to_kind(Kind::Float);
    let x = emb.forward(&Tensor::from_slice(idx));
    let loss = (&x * w).sum(Kind::Float);
    match dense {
        Some(d) => loss + d.forward(&x.detach()).sum(Kind::Float),
        None => loss,
    }
}

fn sparse_fixture() -> (Value, i64, i64, Vec<Vec<i64>>) {
    let fx = fixtures();
    let s = fx["sparse"].clone();
    let (rows, dim) = (s["rows"].as_i64().unwrap(), s["dim"].as_i64().unwrap());
    let indices = s["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect();
    (s, rows, dim, indices)
}

#[test]
fn sparse_grads_step_sgd_as_torch_optim_sgd_does_on_every_path() {
    let _serial = serial();
    let (fx, rows, dim, indices) = sparse_fixture();
    let lr = fx["lr"].as_f64().unwrap();
    for path in PATHS {
        let (vs, _, emb) = sparse_model(rows, dim);
        // tch's own SGD on a copy: the same libtorch op, on this machine.
        let (tvs, _, temb) = sparse_model(rows, dim);
        let mut opt = Sgd::default().build(&vs, lr).unwrap();
        let mut theirs = nn::Sgd::default().build(&tvs, lr).unwrap();
        for (k, idx) in indices.iter().enumerate() {
            let loss = sparse_loss(&emb, None, idx, dim, k);
            step_along(path, &mut opt, &vs, &loss).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            assert!(emb.ws.grad().is_sparse(), "{path:?}: the grads were sparse");
            theirs.backward_step(&sparse_loss(&temb, None, idx, dim, k));
            let label = format!("{path:?} step {k}");
            assert_near(
                &values(&emb.ws),
                &numbers(&fx["steps"][k]),
                Kind::Float,
                &label,
            );
            assert_eq!(
                bits(&[emb.ws.shallow_clone()]),
                bits(&[temb.ws.shallow_clone()]),
                "{label}: tch's nn::Sgd"
            );
        }
    }
}

#[test]
fn sparse_and_dense_grads_in_one_sgd_step() {
    let (fx, rows, dim, indices) = sparse_fixture();
    let lr = fx["lr"].as_f64().unwrap();
    let (vs, dense, emb) = sparse_model(rows, dim);
    let (tvs, tdense, temb) = sparse_model(rows, dim);
    let mut opt = Sgd::default().build(&vs, lr).unwrap();
    let mut theirs = nn::Sgd::default().build(&tvs, lr).unwrap();
    for (k, idx) in indices.iter().enumerate() {
        opt.backward_step(&sparse_loss(&emb, Some(&dense), idx, dim, k));
        theirs.backward_step(&sparse_loss(&temb, Some(&tdense), idx, dim, k));
        assert_near(
            &values(&emb.ws),
            &numbers(&fx["steps"][k]),
            Kind::Float,
            "emb",
        );
        let ours = [emb.ws.shallow_clone(), dense.ws.shallow_clone()];
        let tchs = [temb.ws.shallow_clone(), tdense.ws.shallow_clone()];
        assert_eq!(bits(&ours), bits(&tchs), "step {k}");
    }
}

#[test]
fn a_sparse_step_skipped_on_the_device_changes_nothing_and_its_grad_scale_divides() {
    let (fx, rows, dim, indices) = sparse_fixture();
    let lr = fx["lr"].as_f64().unwrap();
    let (vs, _, emb) = sparse_model(rows, dim);
    let mut opt = Sgd::default().build(&vs, lr).unwrap();
    // A skipped step whose grads are garbage.
    opt.zero_grad();
    let loss = sparse_loss(&emb, None, &indices[0], dim, 0) * f64::NAN;
    loss.backward();
    let before = emb.ws.copy();
    opt.step_with(None, Some(&Tensor::from(1.0f32))).unwrap();
    assert!(
        emb.ws.equal(&before),
        "a skipped step leaves the weight bitwise"
    );
    // grad_scale = 2 on twice the loss: the step of the loss (a power of two: exact).
    opt.zero_grad();
    (sparse_loss(&emb, None, &indices[0], dim, 0) * 2.0).backward();
    opt.step_with(Some(&Tensor::from(2.0f32)), Some(&Tensor::from(0.0f32)))
        .unwrap();
    assert_near(
        &values(&emb.ws),
        &numbers(&fx["steps"][0]),
        Kind::Float,
        "scaled",
    );
    // The grad was divided in place, as the fused kernels write the unscaled grads back.
    let (_, _, e2) = sparse_model(rows, dim);
    sparse_loss(&e2, None, &indices[0], dim, 0).backward();
    assert!(emb
        .ws
        .grad()
        .to_dense(None, false)
        .equal(&e2.ws.grad().to_dense(None, false)));
}

/// Builds an optimizer of a `VarStore`.
type Build = fn(&nn::VarStore) -> FusedOptimizer;

#[test]
fn sparse_grads_where_the_optimizer_takes_none_are_errors_that_name_the_parameter_and_change_nothing(
) {
    let _serial = serial();
    let (_, rows, dim, indices) = sparse_fixture();
    let refusing: Vec<(&str, Build)> = vec![
        ("adam", |vs| Adam::default().build(vs, 0.01).unwrap()),
        ("adamw", |vs| AdamW::default().build(vs, 0.01).unwrap()),
        ("sgd momentum", |vs| {
            Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(vs, 0.1)
            .unwrap()
        }),
        ("sgd weight decay", |vs| {
            Sgd {
                wd: 0.01,
                ..Default::default()
            }
            .build(vs, 0.1)
            .unwrap()
        }),
    ];
    for (name, build) in refusing {
        let (vs, dense, emb) = sparse_model(rows, dim);
        let ps = [dense.ws.shallow_clone(), emb.ws.shallow_clone()];
        let mut opt = build(&vs);
        // A first step with dense grads only creates state.
        opt.zero_grad();
        dense
            .forward(&Tensor::ones([1, dim], (Kind::Float, Device::Cpu)))
            .sum(Kind::Float)
            .backward();
        opt.try_step().unwrap();
        // Every path that returns a `Result`: the guarded steps under `on_nan = "error"` too.
        for path in [
            Path::TryStep,
            Path::StepWith,
            Path::Guarded,
            Path::GuardedDeferred,
        ] {
            let loss = sparse_loss(&emb, Some(&dense), &indices[0], dim, 0);
            let before = everything(&ps, &opt);
            let e = step_along(path, &mut opt, &vs, &loss).unwrap_err();
            let label = format!("{name} {path:?}");
            assert!(
                e.contains("`emb.weight`"),
                "{label}: names the parameter: {e}"
            );
            assert!(e.contains("sparse"), "{label}: says why: {e}");
            assert!(
                e.contains("Sgd without momentum"),
                "{label}: says what takes them: {e}"
            );
            assert_untouched(&before, &everything(&ps, &opt), &label);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters whose dtype or device changed after the state was created.

fn dtype_cases() -> (Vec<Value>, Vec<Vec<i64>>, usize) {
    let fx = fixtures();
    let shapes = fx["shapes"]
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
        .collect();
    let n = fx["f32_steps"].as_u64().unwrap() as usize;
    (fx["dtype"].as_array().unwrap().clone(), shapes, n)
}

/// Parameters `p{i}` of the generator's (f32) values, in `kind` on `device`.
fn dense_model(shapes: &[Vec<i64>], kind: Kind, device: Device) -> (nn::VarStore, Vec<Tensor>) {
    let mut vs = nn::VarStore::new(device);
    let ps = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vs.root()
                .var_copy(&format!("p{i}"), &init(i, s).to_kind(Kind::Float))
        })
        .collect();
    if kind == Kind::Double {
        vs.double();
    }
    (vs, ps)
}

/// `sum(p_i * g_i)` with the generator's grads of step `k` in `kind`: its grads are `g_i`.
fn dense_loss(ps: &[Tensor], shapes: &[Vec<i64>], k: usize, kind: Kind) -> Tensor {
    ps.iter()
        .zip(shapes)
        .enumerate()
        .map(|(i, (p, s))| (p * grad(k, i, s).to_kind(kind).to_device(p.device())).sum(kind))
        .reduce(|a, b| a + b)
        .unwrap()
}

/// The state of `opt` cast as PyTorch's `load_state_dict` casts it: moments and buffers to
/// `kind` on `device`, the step counters kept f32 and moved to `device`.
fn cast_state(opt: &FusedOptimizer, kind: Kind, device: Device) -> Vec<(String, Tensor)> {
    opt.state()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with(".step") || n == "sgd_started" {
                t.to_device(device)
            } else {
                t.to_device(device).to_kind(kind)
            };
            (n, t)
        })
        .collect()
}

#[test]
fn after_vs_double_the_state_follows_the_parameters_as_pytorchs_load_state_dict_casts_it() {
    let _serial = serial();
    let (cases, shapes, f32_steps) = dtype_cases();
    assert_eq!(cases.len(), 7);
    for case in &cases {
        for path in PATHS {
            let label = format!("{} {} {path:?}", case["optimizer"], case["options"]);
            let (mut vs, ps) = dense_model(&shapes, Kind::Float, Device::Cpu);
            let mut opt = build(case, &vs);
            // The same run, its state cast by hand into an optimizer of f64 parameters.
            let mut reference: Option<(nn::VarStore, Vec<Tensor>, FusedOptimizer)> = None;
            for (k, want) in case["steps"].as_array().unwrap().iter().enumerate() {
                let kind = if k < f32_steps {
                    Kind::Float
                } else {
                    Kind::Double
                };
                if k == f32_steps {
                    let (rvs, rps) = dense_model(&shapes, Kind::Double, Device::Cpu);
                    tch::no_grad(|| {
                        for (r, p) in rps.iter().zip(&ps) {
                            r.shallow_clone().copy_(p);
                        }
                    });
                    let mut ropt = build(case, &rvs);
                    ropt.load_state(&cast_state(&opt, Kind::Double, Device::Cpu))
                        .unwrap();
                    reference = Some((rvs, rps, ropt));
                    vs.double();
                    assert_eq!(ps[0].kind(), Kind::Double);
                }
                let loss = dense_loss(&ps, &shapes, k, kind);
                step_along(path, &mut opt, &vs, &loss)
                    .unwrap_or_else(|e| panic!("{label} step {k}: {e}"));
                for (i, p) in ps.iter().enumerate() {
                    assert_near(
                        &values(p),
                        &numbers(&want[i]),
                        kind,
                        &format!("{label} step {k} param {i}"),
                    );
                }
                if let Some((_, rps, ropt)) = reference.as_mut() {
                    ropt.zero_grad();
                    dense_loss(rps, &shapes, k, kind).backward();
                    ropt.try_step().unwrap();
                    assert_eq!(
                        bits(&ps),
                        bits(rps),
                        "{label} step {k}: the state cast by hand"
                    );
                }
            }
            // The state now is the parameters' dtype (the step counters stay f32).
            for (n, t) in opt.state() {
                let want = if n.ends_with(".step") || n == "sgd_started" {
                    t.kind()
                } else {
                    Kind::Double
                };
                assert_eq!(t.kind(), want, "{label}: state {n}");
            }
        }
    }
}

#[test]
fn a_grad_of_another_dtype_than_its_parameter_steps_as_its_value_in_the_parameters_dtype() {
    let (cases, shapes, _) = dtype_cases();
    for case in &cases {
        let label = format!("{} {}", case["optimizer"], case["options"]);
        // Ours: grads created in f32, then the parameters made f64 and the grads set by hand
        // (no zero_grad of ours): f32 grads on f64 parameters.
        let (mut vs, ps) = dense_model(&shapes, Kind::Float, Device::Cpu);
        let mut opt = build(case, &vs);
        dense_loss(&ps, &shapes, 0, Kind::Float).backward();
        vs.double();
        for (i, (p, s)) in ps.iter().zip(&shapes).enumerate() {
            let mut g = p.grad();
            assert_eq!(g.kind(), Kind::Float, "tch keeps the grad's dtype");
            g.copy_(&grad(1, i, s));
        }
        // The reference: f64 parameters with f64 grads of the same (f32) values.
        let (rvs, rps) = dense_model(&shapes, Kind::Double, Device::Cpu);
        let mut ropt = build(case, &rvs);
        dense_loss(&rps, &shapes, 1, Kind::Float).backward();
        for _ in 0..2 {
            opt.try_step().unwrap_or_else(|e| panic!("{label}: {e}"));
            ropt.try_step().unwrap();
            assert_eq!(bits(&ps), bits(&rps), "{label}");
        }
    }
}

#[test]
fn a_parameter_resized_under_its_state_is_an_error_that_changes_nothing() {
    // Two groups: the first one's kernel must not run when the second's state does not fit.
    for (name, mk) in [("sgd", 0usize), ("adam", 1), ("adamw", 2)] {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs.root().var_copy("a", &init(0, &[3]).to_kind(Kind::Float));
        let b = vs
            .root()
            .set_group(1)
            .var_copy("b", &init(1, &[4]).to_kind(Kind::Float));
        let mut opt = match mk {
            0 => Sgd {
                momentum: 0.9,
                ..Default::default()
            }
            .build(&vs, 0.1),
            1 => Adam::default().build(&vs, 0.01),
            _ => AdamW::default().build(&vs, 0.01),
        }
        .unwrap();
        (a.sum(Kind::Float) + b.sum(Kind::Float)).backward();
        opt.try_step().unwrap();
        // `b` becomes 5 elements (its grad too); its state is still 4.
        tch::no_grad(|| {
            b.shallow_clone()
                .set_data(&init(2, &[5]).to_kind(Kind::Float));
            b.grad()
                .set_data(&Tensor::ones([5], (Kind::Float, Device::Cpu)));
        });
        let ps = [a.shallow_clone(), b.shallow_clone()];
        let before = everything(&ps, &opt);
        let e = opt.try_step().expect_err("state of another shape");
        let e = e.to_string();
        assert!(
            e.contains("`b`") && e.contains("[4]") && e.contains("[5]"),
            "{name}: {e}"
        );
        assert_untouched(&before, &everything(&ps, &opt), name);
    }
}

/// `vs.set_device(..)` after some steps: the state follows to the parameters' device, and the
/// steps there are those of the state moved by hand. Needs a GPU (`STEPGUARD_TEST_DEVICE=cuda`
/// or any visible one); passes without one having checked nothing.
#[test]
fn after_vs_set_device_the_state_follows_the_parameters() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: nothing to check");
        return;
    }
    let _serial = serial();
    let gpu = Device::Cuda(0);
    let (cases, shapes, f32_steps) = dtype_cases();
    for case in &cases {
        for path in [Path::TryStep, Path::BackwardStep, Path::Guarded] {
            let label = format!("{} {} {path:?}", case["optimizer"], case["options"]);
            let (mut vs, ps) = dense_model(&shapes, Kind::Float, Device::Cpu);
            let mut opt = build(case, &vs);
            for k in 0..f32_steps {
                step_along(
                    path,
                    &mut opt,
                    &vs,
                    &dense_loss(&ps, &shapes, k, Kind::Float),
                )
                .unwrap();
            }
            let (rvs, rps) = dense_model(&shapes, Kind::Float, gpu);
            tch::no_grad(|| {
                for (r, p) in rps.iter().zip(&ps) {
                    r.shallow_clone().copy_(p);
                }
            });
            let mut ropt = build(case, &rvs);
            ropt.load_state(&cast_state(&opt, Kind::Float, gpu))
                .unwrap();
            vs.set_device(gpu);
            assert_eq!(ps[0].device(), gpu);
            for k in f32_steps..f32_steps + 2 {
                step_along(
                    path,
                    &mut opt,
                    &vs,
                    &dense_loss(&ps, &shapes, k, Kind::Float),
                )
                .unwrap_or_else(|e| panic!("{label} step {k}: {e}"));
                ropt.zero_grad();
                dense_loss(&rps, &shapes, k, Kind::Float).backward();
                ropt.try_step().unwrap();
                assert_eq!(bits(&ps), bits(&rps), "{label} step {k}");
            }
            for (n, t) in opt.state() {
                if n != "sgd_started" {
                    assert_eq!(t.device(), gpu, "{label}: state {n}");
                }
            }
        }
    }
}
