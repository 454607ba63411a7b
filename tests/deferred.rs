//! `#[guarded_step(sync = "deferred")]`: no blocking host read per step; a bad batch is skipped
//! on the device by the fused optimizer and reported one step late, naming its step.

#![allow(clippy::result_large_err)]

use stepguard::optim::{AdamW, FusedOptimizer};
use stepguard::testing::{count_host_reads, set_cpu_fast_path};
use stepguard::{guarded_step, Check, GuardError};
use stepguard_suite::test_device;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// The tests share the guarded functions' sites (their pending verdicts, their counters) and
/// `stepguard::flush()` reads every site: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn model(seed: f64) -> (nn::VarStore, nn::SequentialT, FusedOptimizer) {
    model_with(seed, false)
}

/// With `sgd`, fused SGD with momentum (a well-conditioned comparison: no normalisation of
/// tiny grads near an eps, as in Adam), else fused AdamW.
fn model_with(seed: f64, sgd: bool) -> (nn::VarStore, nn::SequentialT, FusedOptimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = nn::seq_t()
        .add(nn::linear(vs.root() / "fc", 4, 6, Default::default()))
        .add(nn::batch_norm1d(vs.root() / "bn", 6, Default::default()))
        .add(nn::linear(vs.root() / "out", 6, 3, Default::default()));
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, mut t)) in vars.into_iter().enumerate() {
            if name.contains("running") {
                continue;
            }
            let n = t.numel() as i64;
            let v = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (0.3 + seed + i as f64))
                .sin()
                * 0.4;
            t.copy_(&v.reshape(t.size()).to_device(t.device()));
        }
    });
    let opt = if sgd {
        stepguard::optim::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(&vs, 0.5)
        .unwrap()
    } else {
        AdamW::default().build(&vs, 1e-2).unwrap()
    };
    (vs, net, opt)
}

fn batch(k: usize) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(32, (Kind::Float, d)) * (0.1 + k as f64 * 0.37))
        .sin()
        .reshape([8, 4]);
    (x, Tensor::arange(8, (Kind::Int64, d)).remainder(3))
}

fn poisoned(k: usize) -> (Tensor, Tensor) {
    let (x, y) = batch(k);
    let _ = x.narrow(0, 2, 1).fill_(f64::NAN);
    (x, y)
}

fn bits(vs: &nn::VarStore, opt: &FusedOptimizer) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.extend(opt.state());
    let mut out: Vec<(String, Vec<u32>)> = v
        .into_iter()
        .map(|(n, t)| {
            let f = t
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu)
                .flatten(0, -1);
            (
                n,
                Vec::<f32>::try_from(f)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect();
    out.sort();
    out
}

#[guarded_step(sync = "deferred", on_nan = "skip", max_norm = 1)]
fn deferred_skip(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[guarded_step(max_norm = 1)]
fn every_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[guarded_step(sync = "deferred", on_nan = "error")]
fn deferred_error(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(())
}

#[test]
fn no_blocking_read_per_step() {
    let _serial = serial();
    set_cpu_fast_path(false); // the path a GPU step takes: one read per step in every_step mode
    let (vs, net, mut opt) = model(1.0);
    let (vs2, net2, mut opt2) = model(1.0);
    let mut deferred_reads = 0;
    let mut every_reads = 0;
    for k in 0..5 {
        let (x, y) = batch(k);
        deferred_reads += count_host_reads(|| deferred_skip(&mut opt, &vs, &net, &x, &y)).1;
        every_reads += count_host_reads(|| every_step(&mut opt2, &vs2, &net2, &x, &y)).1;
    }
    set_cpu_fast_path(true);
    assert_eq!(deferred_reads, 0);
    assert_eq!(every_reads, 5);
    assert_eq!(
        bits(&vs, &opt),
        bits(&vs2, &opt2),
        "same numbers as the blocking mode"
    );
    stepguard::flush().unwrap();
}

#[test]
fn a_bad_batch_leaves_params_optimizer_state_and_buffers_as_if_it_never_came() {
    let _serial = serial();
    for fast in [true, false] {
        set_cpu_fast_path(fast);
        let (vs, net, mut opt) = model(2.0);
        let (vs2, net2, mut opt2) = model(2.0);
        for k in 0..4 {
            if k == 2 {
                let (x, y) = poisoned(k);
                deferred_skip(&mut opt, &vs, &net, &x, &y);
            }
            let (x, y) = batch(k);
            deferred_skip(&mut opt, &vs, &net, &x, &y);
            deferred_skip(&mut opt2, &vs2, &net2, &x, &y);
        }
        set_cpu_fast_path(true);
        assert_eq!(bits(&vs, &opt), bits(&vs2, &opt2), "fast path {fast}");
        let report = stepguard::report_data();
        let site = report
            .iter()
            .find(|s| s.function == "deferred_skip")
            .unwrap();
        assert!(site.stats.skipped >= 1, "counted when the verdict was read");
    }
}

#[test]
fn the_error_comes_one_step_late_naming_the_bad_step_with_nothing_damaged() {
    let _serial = serial();
    set_cpu_fast_path(false);
    let (vs, net, mut opt) = model(3.0);
    let (vs2, net2, mut opt2) = model(3.0);
    for k in 0..2 {
        let (x, y) = batch(k);
        deferred_error(&mut opt, &vs, &net, &x, &y).unwrap();
        deferred_error(&mut opt2, &vs2, &net2, &x, &y).unwrap();
    }
    let (x, y) = poisoned(2);
    deferred_error(&mut opt, &vs, &net, &x, &y).expect("not read yet: no blocking read");
    let (x, y) = batch(3);
    let err = deferred_error(&mut opt, &vs, &net, &x, &y).unwrap_err();
    set_cpu_fast_path(true);
    assert_eq!(err.check, Check::Loss, "{err}");
    assert_eq!(err.step, 2, "names the update of the bad batch: {err}");
    assert!(err.tensors[0].name.contains("loss"), "{err}");
    let trained = |b: Vec<(String, Vec<u32>)>| -> Vec<(String, Vec<u32>)> {
        b.into_iter()
            .filter(|(n, _)| !n.contains("running"))
            .collect()
    };
    assert_eq!(
        trained(bits(&vs, &opt)),
        trained(bits(&vs2, &opt2)),
        "the bad update never happened, nor the one that reported it"
    );
    let stats = vs.variables()["bn.running_mean"].shallow_clone();
    assert!(
        bool::try_from(stats.isfinite().all()).unwrap(),
        "the bad batch's BatchNorm statistics were restored on the device"
    );
}

#[test]
fn flush_reads_the_last_deferred_verdict() {
    let _serial = serial();
    let (vs, net, mut opt) = model(4.0);
    let state = stepguard::GuardState::new();
    let _ = &state;
    let (x, y) = poisoned(0);
    deferred_error(&mut opt, &vs, &net, &x, &y).unwrap();
    let site = stepguard::registry()
        .find(|s| s.name() == "deferred_error")
        .unwrap();
    assert!(site.state().has_pending());
    let err = site.state().flush().unwrap_err();
    assert_eq!(err.check, Check::Loss);
}

#[guarded_step(sync = "deferred", max_norm = 0.01)]
fn deferred_clip(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[guarded_step(max_norm = 0.01)]
fn every_step_clip(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[test]
fn clipping_goes_to_the_kernel_as_grad_scale() {
    let _serial = serial();
    let (vs, net, mut opt) = model_with(5.0, true);
    let (vs2, net2, mut opt2) = model_with(5.0, true);
    let (vs3, net3, mut opt3) = model_with(5.0, true);
    for k in 0..4 {
        let (x, y) = batch(k);
        deferred_clip(&mut opt, &vs, &net, &x, &y);
        every_step_clip(&mut opt2, &vs2, &net2, &x, &y);
        deferred_skip(&mut opt3, &vs3, &net3, &x, &y); // max_norm = 1: not clipping here
    }
    let flat = |vs: &nn::VarStore| -> Vec<f32> {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .filter(|(n, _)| !n.contains("running"))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.iter()
            .flat_map(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap())
            .collect()
    };
    let (a, b, c) = (flat(&vs), flat(&vs2), flat(&vs3));

    // g / (1 / c) in the kernel and g * c outside round differently in the last bit; Adam
    // normalises grads this small (clipped to 0.01) near its eps, so compare at 1e-3 of lr.
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5,
            "kernel clipping {x} vs mul_ clipping {y}"
        );
    }
    assert!(
        a.iter().zip(&c).any(|(x, y)| x != y),
        "clipping at 0.01 changed the run"
    );
}

#[guarded_step(sync = "deferred", on_nan = skip(max = 2))]
fn deferred_two_skips(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[test]
fn max_skips_counts_bad_batches_when_their_verdicts_are_read() {
    let _serial = serial();
    let (vs, net, mut opt) = model(6.0);
    let (x, y) = batch(0);
    deferred_two_skips(&mut opt, &vs, &net, &x, &y);
    let before = bits(&vs, &opt);
    for k in 1..=3 {
        let (x, y) = poisoned(k);
        deferred_two_skips(&mut opt, &vs, &net, &x, &y); // reads the previous verdict
    }
    assert_eq!(
        before
            .iter()
            .filter(|(n, _)| !n.contains("running"))
            .collect::<Vec<_>>(),
        bits(&vs, &opt)
            .iter()
            .filter(|(n, _)| !n.contains("running"))
            .collect::<Vec<_>>(),
        "three bad batches, none applied"
    );
    // The fourth call reads the third bad verdict: three in a row > skip(max = 2).
    let (x, y) = batch(4);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        deferred_two_skips(&mut opt, &vs, &net, &x, &y)
    }));
    let text = r
        .expect_err("escalates")
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(text.contains("skipped 2 consecutive steps"), "{text}");
}
