//! Dynamic loss scaling (`loss_scale = "dynamic"`): the scale trajectory of PyTorch's GradScaler
//! (fixture written by `scripts/gen_amp_fixtures.py`), overflows as expected skips, NaN bugs and
//! overflows at `min_scale` as failures, clipping on unscaled grads, f16 and bf16 end to end.

#![allow(clippy::result_large_err)]

use serde_json::Value;
use stepguard::optim::{Adam, FusedOptimizer, Sgd};
use stepguard::registry::Site;
use stepguard::testing::count_host_reads;
use stepguard::{guarded_step, Check, Diagnosis, GuardError};
use stepguard_suite::{reads_per_step, test_device};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/grad_scaler.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).unwrap()
}

fn site(name: &str) -> &'static Site {
    stepguard::registry()
        .find(|s| s.name() == name)
        .expect("registered")
}

const SHAPES: [&[i64]; 2] = [&[3, 4], &[5]];

/// The generator's formulas.
fn init(i: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.37 + i as f64)).sin() * 0.5)
        .reshape(shape)
        .to_kind(Kind::Float)
        .to_device(test_device())
}

fn coef(step: usize, i: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.71 + i as f64)) + step as f64 * 1.3)
        .cos()
        .reshape(shape)
        .to_kind(Kind::Float)
        .to_device(test_device())
}

fn var_store() -> nn::VarStore {
    let vs = nn::VarStore::new(test_device());
    for (i, s) in SHAPES.iter().enumerate() {
        let _ = vs.root().var_copy(&format!("p{i}"), &init(i, s));
    }
    vs
}

fn params(vs: &nn::VarStore) -> Vec<Tensor> {
    (0..SHAPES.len())
        .map(|i| vs.variables()[&format!("p{i}")].shallow_clone())
        .collect()
}

/// `mult * sum_i (p_i * c_i).sum() + 0.5 * sum_i (p_i * p_i).sum()`, as the generator.
fn fixture_loss(vs: &nn::VarStore, k: usize, mult: f64) -> Tensor {
    let ps = params(vs);
    let lin = (&ps[0] * coef(k, 0, SHAPES[0])).sum(Kind::Float)
        + (&ps[1] * coef(k, 1, SHAPES[1])).sum(Kind::Float);
    let reg = (&ps[0] * &ps[0]).sum(Kind::Float) + (&ps[1] * &ps[1]).sum(Kind::Float);
    lin * mult + reg * 0.5
}

#[guarded_step(loss_scale(interval = 3))]
fn sgd_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, k: usize, mult: f64) {
    let loss = fixture_loss(vs, k, mult);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[guarded_step(loss_scale(interval = 3), sync = "deferred")]
fn fused_adam_step(opt: &mut FusedOptimizer, vs: &nn::VarStore, k: usize, mult: f64) {
    let loss = fixture_loss(vs, k, mult);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

fn assert_params(vs: &nn::VarStore, want: &Value, what: &str) {
    for (i, p) in params(vs).iter().enumerate() {
        let got = Vec::<f32>::try_from(p.reshape([-1]).to_device(Device::Cpu)).unwrap();
        let want: Vec<f64> = want[i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{what}: p{i} {g} vs PyTorch {w}"
            );
        }
    }
}

#[test]
fn the_scale_trajectory_is_grad_scalers_with_tch_sgd() {
    sgd_trajectory(sgd_step, "sgd_step", false);
}

#[guarded_step(loss_scale(interval = 3))]
fn sgd_step_aten(opt: &mut nn::Optimizer, vs: &nn::VarStore, k: usize, mult: f64) {
    let loss = fixture_loss(vs, k, mult);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn the_same_on_the_aten_path_with_the_scale_in_the_one_read() {
    // The CPU fast path off: the norm, the overflow and the scale go through the step's one
    // read, as on a GPU.
    stepguard::testing::set_cpu_fast_path(false);
    sgd_trajectory(sgd_step_aten, "sgd_step_aten", true);
    stepguard::testing::set_cpu_fast_path(true);
}

fn sgd_trajectory(step: fn(&mut nn::Optimizer, &nn::VarStore, usize, f64), name: &str, aten: bool) {
    let fx = fixture();
    let case = &fx["cases"][0];
    assert_eq!(case["optimizer"], "sgd");
    let vs = var_store();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let s = site(name);
    let reads_per_call = if aten { 1 } else { reads_per_step(1) };
    for (k, mult) in fx["mults"].as_array().unwrap().iter().enumerate() {
        let skips = s.stats().overflow_skips;
        let ((), reads) = count_host_reads(|| step(&mut opt, &vs, k, mult.as_f64().unwrap()));
        // The guard's one read carries the overflow and the scale (none on the CPU fast
        // path); an overflow step reads nothing more.
        assert_eq!(reads, reads_per_call, "step {k}: host reads");
        let skipped = s.stats().overflow_skips - skips == 1;
        assert_eq!(
            skipped,
            case["skipped"][k].as_bool().unwrap(),
            "step {k}: skipped"
        );
        let scale = s.state().read_loss_scale().unwrap();
        assert_eq!(
            scale,
            case["scales"][k].as_f64().unwrap(),
            "step {k}: scale"
        );
    }
    assert_eq!(s.stats().overflow_skips, 6);
    assert_eq!((s.stats().skipped, s.stats().failures), (0, 0));
    assert_params(&vs, &case["params"], "tch SGD");
    assert!(stepguard::report().contains("overflow skips 6"));
}

#[test]
fn the_scale_trajectory_is_grad_scalers_with_fused_adam_deferred() {
    let fx = fixture();
    let case = &fx["cases"][1];
    assert_eq!(case["optimizer"], "adam_fused");
    let vs = var_store();
    let mut opt = Adam::default().build(&vs, 0.01).unwrap();
    let s = site("fused_adam_step");
    let mults = fx["mults"].as_array().unwrap();
    let ((), reads) = count_host_reads(|| {
        for (k, mult) in mults.iter().enumerate() {
            fused_adam_step(&mut opt, &vs, k, mult.as_f64().unwrap());
        }
    });
    assert_eq!(reads, 0, "no blocking read under sync = \"deferred\"");
    // The scale itself, read after the run, then step by step on a second run below.
    assert_eq!(
        s.state().read_loss_scale().unwrap(),
        case["scales"][mults.len() - 1].as_f64().unwrap()
    );
    s.state().flush().expect("overflows are not failures");
    assert_eq!(s.state().overflow_skips(), 6);
    assert_eq!(s.stats().failures, 0);
    assert_params(
        &vs,
        &case["params"],
        "fused Adam (grad_scale in the kernel)",
    );
}

#[guarded_step(loss_scale(interval = 3), sync = "deferred")]
fn fused_adam_step_2(opt: &mut FusedOptimizer, vs: &nn::VarStore, k: usize, mult: f64) {
    let loss = fixture_loss(vs, k, mult);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn deferred_scales_step_by_step() {
    let fx = fixture();
    let case = &fx["cases"][1];
    let vs = var_store();
    let mut opt = Adam::default().build(&vs, 0.01).unwrap();
    let s = site("fused_adam_step_2");
    for (k, mult) in fx["mults"].as_array().unwrap().iter().enumerate() {
        fused_adam_step_2(&mut opt, &vs, k, mult.as_f64().unwrap());
        let scale = s.state().read_loss_scale().unwrap();
        assert_eq!(
            scale,
            case["scales"][k].as_f64().unwrap(),
            "step {k}: scale"
        );
    }
}

#[guarded_step(loss_scale = "dynamic", on_nan = skip(max = 1))]
fn skip_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, k: usize, mult: f64) {
    let loss = fixture_loss(vs, k, mult);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn overflow_skips_do_not_count_toward_max_skips() {
    let vs = var_store();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let s = site("skip_step");
    let before = stepguard_suite::var_bits(&vs);
    // 1e36 overflows at 65536, 32768 and 16384: three skips in a row with skip(max = 1).
    for k in 0..3 {
        skip_step(&mut opt, &vs, k, 1e36);
    }
    assert_eq!(
        stepguard_suite::var_bits(&vs),
        before,
        "skipped updates leave params"
    );
    let st = s.stats();
    assert_eq!((st.overflow_skips, st.skipped, st.failures), (3, 0, 0));
    assert_eq!(s.state().read_loss_scale(), Some(8192.0));
    skip_step(&mut opt, &vs, 3, 1.0);
    assert_ne!(
        stepguard_suite::var_bits(&vs),
        before,
        "a clean step updates"
    );
}

fn log_loss(vs: &nn::VarStore) -> Tensor {
    let ps = params(vs);
    (&ps[1] * 0.0).sum(Kind::Float).log() + (&ps[0] * &ps[0]).sum(Kind::Float)
}

#[guarded_step(loss_scale = "dynamic", on_nan = "error", protect = "none")]
fn log_zero_step(opt: &mut nn::Optimizer, vs: &nn::VarStore) -> Result<(), GuardError> {
    let loss = log_loss(vs);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(())
}

#[test]
fn a_nan_bug_is_a_failure_not_an_overflow() {
    let vs = var_store();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let before = stepguard_suite::var_bits(&vs);
    let e = log_zero_step(&mut opt, &vs).expect_err("log(0) in the forward");
    assert_eq!(e.check, Check::Loss);
    assert!(matches!(e.diagnosis, Diagnosis::Forward { .. }), "{e}");
    assert!(!e.is_overflow());
    let s = site("log_zero_step");
    // GradScaler would have backed off; the guard leaves the scale for the next batch.
    assert_eq!(s.state().read_loss_scale(), Some(65536.0));
    assert_eq!(s.stats().overflow_skips, 0);
    assert_eq!(stepguard_suite::var_bits(&vs), before);
}

/// Grads of p0 are `scale * 3e38 * 1e-3`: inf at every scale >= 2.
#[guarded_step(loss_scale(init = 8, min = 2), on_nan = "error")]
fn exhausted_step(opt: &mut nn::Optimizer, vs: &nn::VarStore) -> Result<(), GuardError> {
    let ps = params(vs);
    let loss = (&ps[0] * 1e-3).sum(Kind::Float) * 3e38 + (&ps[1] * &ps[1]).sum(Kind::Float);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(())
}

#[test]
fn an_overflow_at_min_scale_is_a_failure_naming_the_grad() {
    let vs = var_store();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    exhausted_step(&mut opt, &vs).expect("overflow at 8: skipped");
    exhausted_step(&mut opt, &vs).expect("overflow at 4: skipped");
    let e = exhausted_step(&mut opt, &vs).expect_err("overflow at min_scale 2");
    assert_eq!(e.check, Check::Grads);
    assert_eq!(e.diagnosis, Diagnosis::ScaleExhausted { scale: 2.0 });
    let text = e.to_string();
    assert!(
        text.contains("fp16 range exceeded even at loss scale 2"),
        "{text}"
    );
    assert!(text.contains("use bf16"), "{text}");
    assert_eq!(e.tensors.len(), 1, "{text}");
    assert_eq!(e.tensors[0].name, "grad of p0");
    assert_eq!(site("exhausted_step").stats().overflow_skips, 2);
}

#[guarded_step(loss_scale = "dynamic", max_norm = 0.5)]
fn clipped_scaled(opt: &mut nn::Optimizer, vs: &nn::VarStore, k: usize) {
    let loss = fixture_loss(vs, k, 3.0);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[guarded_step(max_norm = 0.5)]
fn clipped_plain(opt: &mut nn::Optimizer, vs: &nn::VarStore, k: usize) {
    let loss = fixture_loss(vs, k, 3.0);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[guarded_step(loss_scale = "dynamic", max_norm = 0.5, sync = "deferred")]
fn clipped_scaled_fused(opt: &mut FusedOptimizer, vs: &nn::VarStore, k: usize) {
    let loss = fixture_loss(vs, k, 3.0);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn clipping_applies_to_the_unscaled_grads() {
    let (a, b, c) = (var_store(), var_store(), var_store());
    let mut oa = nn::Sgd::default().build(&a, 0.1).unwrap();
    let mut ob = nn::Sgd::default().build(&b, 0.1).unwrap();
    let mut oc = Sgd::default().build(&c, 0.1).unwrap();
    for k in 0..5 {
        clipped_scaled(&mut oa, &a, k);
        clipped_plain(&mut ob, &b, k);
        clipped_scaled_fused(&mut oc, &c, k);
    }
    let moved = (&params(&b)[0] - init(0, SHAPES[0]))
        .norm()
        .double_value(&[]);
    assert!(moved > 0.01, "the steps moved the params ({moved})");
    for (x, y, z) in itertools(params(&a), params(&b), params(&c)) {
        assert!(
            x.allclose(&y, 1e-6, 1e-7, false),
            "scaled vs plain:\n{x}\n{y}"
        );
        assert!(
            z.allclose(&y, 1e-6, 1e-7, false),
            "fused kernel vs plain:\n{z}\n{y}"
        );
    }
}

fn itertools(a: Vec<Tensor>, b: Vec<Tensor>, c: Vec<Tensor>) -> Vec<(Tensor, Tensor, Tensor)> {
    a.into_iter()
        .zip(b)
        .zip(c)
        .map(|((x, y), z)| (x, y, z))
        .collect()
}

#[guarded_step(loss_scale(interval = 3))]
fn f16_step(opt: &mut nn::Optimizer, net: &nn::Linear, x: &Tensor, y: &Tensor) -> f64 {
    let loss = (net.forward(x) - y).square().mean(Kind::Float);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

#[test]
fn an_f16_model_overflows_for_real_backs_off_and_trains() {
    let vs = nn::VarStore::new(test_device());
    let net = nn::linear(vs.root(), 8, 4, Default::default());
    let mut vs = vs;
    vs.half();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let x = (Tensor::arange(64 * 8, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .reshape([64, 8])
        * 4.0;
    let y = x.narrow(1, 0, 4).tanh() * 3.0;
    let (x, y) = (
        x.to_kind(Kind::Half).to_device(test_device()),
        y.to_kind(Kind::Half).to_device(test_device()),
    );
    let first = f16_step(&mut opt, &net, &x, &y);
    let mut last = first;
    for _ in 0..60 {
        last = f16_step(&mut opt, &net, &x, &y);
    }
    let s = site("f16_step");
    // f16 grads of magnitude > 1 times 2^16 exceed f16's 65504: real overflows.
    assert!(s.stats().overflow_skips >= 1, "{}", stepguard::report());
    assert_eq!(s.stats().failures, 0);
    assert!(last < first * 0.5, "loss {first} -> {last}");
    for (_, p) in vs.variables() {
        assert_eq!(p.kind(), Kind::Half);
        assert!(bool::try_from(p.isfinite().all()).unwrap());
    }
}

#[guarded_step(loss_scale = "dynamic")]
fn bf16_step(opt: &mut FusedOptimizer, net: &nn::Linear, x: &Tensor, y: &Tensor) -> Kind {
    let (out, kind) = stepguard::amp::autocast(x.device(), low_precision(), || {
        let out = net.forward(x);
        let kind = out.kind();
        (out, kind)
    })
    .unwrap();
    let loss = (out.to_kind(Kind::Float) - y).square().mean(Kind::Float);
    opt.zero_grad();
    loss.backward();
    opt.step();
    kind
}

/// What autocast computes in: bf16 on the CPU, f16 on CUDA.
fn low_precision() -> Kind {
    if test_device() == Device::Cpu {
        Kind::BFloat16
    } else {
        Kind::Half
    }
}

#[test]
fn a_bf16_autocast_forward_with_f32_master_weights_trains() {
    let vs = nn::VarStore::new(test_device());
    let net = nn::linear(vs.root(), 8, 4, Default::default());
    let mut opt = Adam::default().build(&vs, 0.01).unwrap();
    let x = (Tensor::arange(64 * 8, (Kind::Float, test_device())) * 0.37)
        .sin()
        .reshape([64, 8]);
    let y = x.narrow(1, 0, 4).tanh();
    let w0 = net.ws.copy();
    let mut kinds = Vec::new();
    for _ in 0..20 {
        kinds.push(bf16_step(&mut opt, &net, &x, &y));
    }
    assert!(kinds.iter().all(|k| *k == low_precision()), "{kinds:?}");
    assert_eq!(net.forward(&x).kind(), Kind::Float, "autocast is off again");
    assert_eq!(net.ws.kind(), Kind::Float, "f32 master weights");
    assert!((&net.ws - w0).abs().max().double_value(&[]) > 1e-3);
    assert_eq!(site("bf16_step").stats().failures, 0);
}

#[test]
fn autocast_refuses_what_it_cannot_do() {
    assert!(stepguard::amp::autocast(Device::Cpu, Kind::Float, || ()).is_err());
    assert!(stepguard::amp::autocast(Device::Mps, Kind::Half, || ()).is_err());
}

#[test]
fn the_runtime_api_scales_and_reports_overflows() {
    let vs = var_store();
    let config = stepguard::Config::DEFAULT.with_loss_scale(stepguard::amp::LossScale::DYNAMIC);
    let state = stepguard::GuardState::new();
    let ps = params(&vs);
    let run = |mult: f64| -> Result<(), GuardError> {
        let mut g = stepguard::StepGuard::begin(&config, "manual", &state);
        for p in &ps {
            let mut gr = p.grad();
            if gr.defined() {
                let _ = gr.zero_();
            }
        }
        g.scale_loss(&fixture_loss(&vs, 0, mult))?.backward();
        g.before_update(&ps)?;
        tch::no_grad(|| {
            for p in &ps {
                let mut p = p.shallow_clone();
                let _ = p.f_sub_(&(p.grad() * 0.05)).unwrap();
            }
        });
        g.after_update(&ps);
        Ok(())
    };
    let e = run(1e36).expect_err("overflow");
    assert!(e.is_overflow(), "{e}");
    assert!(
        e.to_string().contains("overflowed at loss scale 65536"),
        "{e}"
    );
    run(1.0).expect("a clean step");
    assert_eq!(state.overflow_skips(), 1);
    assert_eq!(state.read_loss_scale(), Some(32768.0));
    // The grads of the clean step were unscaled: p moved by lr * (c + p), not 32768x that.
    let moved = (&ps[0] - init(0, SHAPES[0])).abs().max().double_value(&[]);
    assert!(moved > 1e-3 && moved < 0.2, "{moved}");
}
