//! Spike detection (`spike = 6`) and rollback (`rollback = N`): a finite but destructive
//! update is found by the loss's and the grad norm's running statistics, skipped, and, when it
//! persists, undone by restoring a snapshot of a good step; an update that made the parameters
//! NaN is rolled back instead of escalating; none of this costs a host read of its own.

#![allow(clippy::result_large_err)]

use stepguard::optim::GuardedOptimizer;
use stepguard::optim::{Adam, FusedOptimizer};
use stepguard::registry::Site;
use stepguard::testing::{count_host_reads, set_cpu_fast_path};
use stepguard::{guarded_step, Check, Diagnosis, GuardError};
use stepguard_suite::{test_device, var_bits};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

fn site(name: &str) -> &'static Site {
    stepguard::registry()
        .find(|s| s.name() == name)
        .expect("registered")
}

/// Three Gaussian blobs and a 2-32-3 MLP, seeded.
fn setup() -> (nn::VarStore, nn::Sequential, Tensor, Tensor) {
    // The global RNG, shared by the tests running in parallel: draw under a lock, so that
    // each test sees its own seeded numbers.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let n = 240;
    let centers = Tensor::from_slice2(&[[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]]);
    let y = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).remainder(3);
    let x =
        centers.index_select(0, &y) + Tensor::randn([n, 2], (Kind::Float, tch::Device::Cpu)) * 1.2;
    let vs = nn::VarStore::new(test_device());
    let p = vs.root();
    let net = nn::seq()
        .add(nn::linear(&p / "l1", 2, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "out", 32, 3, Default::default()));
    (
        vs,
        net,
        x.to_device(test_device()),
        y.to_device(test_device()),
    )
}

fn finite(vs: &nn::VarStore) -> bool {
    vs.variables()
        .values()
        .all(|t| bool::try_from(t.isfinite().all()).unwrap())
}

fn eval(net: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    tch::no_grad(|| net.forward(x).cross_entropy_for_logits(y).double_value(&[]))
}

#[guarded_step(max_norm = 5, on_nan = "skip", spike = 6, rollback = 20)]
fn lr_spike_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

#[test]
fn a_planted_lr_spike_is_detected_and_rolled_back() {
    let (vs, net, x, y) = setup();
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let s = site("lr_spike_step");
    for _ in 0..60 {
        lr_spike_step(&mut opt, &vs, &net, &x, &y);
    }
    let before_fault = eval(&net, &x, &y);
    // A broken schedule: three steps at 2000x the learning rate. The first is applied (its
    // loss and grads look normal); the damage shows as a spike at the next step.
    for step in 60..140 {
        opt.set_lr(if (60..63).contains(&step) { 200.0 } else { 0.1 });
        lr_spike_step(&mut opt, &vs, &net, &x, &y);
    }
    let st = s.stats();
    eprintln!(
        "{st:?}, loss before the fault {before_fault}, after {}",
        eval(&net, &x, &y)
    );
    assert!(st.spikes >= 1, "{}", stepguard::report());
    assert!(st.rollbacks >= 1, "{}", stepguard::report());
    assert_eq!(st.failures, 0);
    assert!(finite(&vs));
    let after = eval(&net, &x, &y);
    assert!(
        after <= before_fault * 1.5,
        "loss {before_fault} before the fault, {after} after recovery"
    );
    // Learning again: the grad norm is not the 0 of a saturated, frozen model.
    assert!(st.last_grad_norm.unwrap() > 1e-4, "{st:?}");
}

#[guarded_step(max_norm = 5, on_nan = skip(max = 3))]
fn unprotected_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

#[test]
fn without_spike_detection_the_same_fault_ruins_the_run() {
    // The control of the test above: the guard alone sees nothing wrong (all finite).
    let (vs, net, x, y) = setup();
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    for _ in 0..60 {
        unprotected_step(&mut opt, &vs, &net, &x, &y);
    }
    let before_fault = eval(&net, &x, &y);
    for step in 60..140 {
        opt.set_lr(if (60..63).contains(&step) { 200.0 } else { 0.1 });
        unprotected_step(&mut opt, &vs, &net, &x, &y);
    }
    let after = eval(&net, &x, &y);
    eprintln!("unprotected: loss before the fault {before_fault}, after {after}");
    assert!(
        after.is_nan() || after > before_fault * 1.5,
        "the fault must hurt an unprotected run ({before_fault} -> {after})"
    );
}

#[guarded_step(on_nan = "error", spike(sigmas = 6, warmup = 10))]
fn spike_error_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<f64, GuardError> {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(loss.double_value(&[]))
}

#[test]
fn a_spike_is_reported_with_its_z_score_and_not_applied() {
    let (vs, net, x, y) = setup();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    for _ in 0..30 {
        spike_error_step(&mut opt, &vs, &net, &x, &y).expect("a clean step");
    }
    let before = var_bits(&vs);
    // A batch of mislabelled points: a finite loss, far above its running mean.
    let wrong = (&y + 1).remainder(3);
    let e = spike_error_step(&mut opt, &vs, &net, &(&x * 3.0), &wrong).expect_err("a spike");
    assert_eq!(e.check, Check::Spike, "{e}");
    let Diagnosis::Spike { loss_z, sigmas, .. } = e.diagnosis else {
        panic!("{e}")
    };
    assert!(loss_z.unwrap() > 6.0, "{e}");
    assert_eq!(sigmas, 6.0);
    assert!(e.to_string().contains("standard deviations above"), "{e}");
    assert_eq!(var_bits(&vs), before, "a spiking step is not applied");
    spike_error_step(&mut opt, &vs, &net, &x, &y).expect("the next clean batch passes");
}

#[guarded_step(on_nan = skip(max = 3), rollback = 1)]
fn nan_update_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

fn copies(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(Tensor::copy).collect()
}

#[test]
fn an_update_to_nan_params_is_rolled_back_instead_of_escalating() {
    let (vs, net, x, y) = setup();
    let mut opt = Adam::default().build(&vs, 0.01).unwrap();
    for _ in 0..5 {
        nan_update_step(&mut opt, &vs, &net, &x, &y);
    }
    let (params, state) = (var_bits(&vs), copies(&opt.guard_state()));
    // A NaN learning rate: finite grads, NaN parameters after the update (Diagnosis::Update,
    // which no skip can undo).
    opt.set_lr(f64::NAN);
    nan_update_step(&mut opt, &vs, &net, &x, &y);
    assert!(!finite(&vs), "the planted update made the parameters NaN");
    opt.set_lr(0.01);
    nan_update_step(&mut opt, &vs, &net, &x, &y); // finds it, rolls back, skips
    let s = site("nan_update_step");
    assert_eq!((s.stats().rollbacks, s.stats().failures), (1, 0));
    assert_eq!(var_bits(&vs), params, "parameters as before the bad update");
    for (now, then) in opt.guard_state().iter().zip(&state) {
        assert!(
            now.equal(then),
            "Adam's moments and step counters as before it"
        );
    }
    let l0 = eval(&net, &x, &y);
    for _ in 0..20 {
        nan_update_step(&mut opt, &vs, &net, &x, &y);
    }
    assert!(finite(&vs));
    assert!(eval(&net, &x, &y) < l0, "training goes on");
}

#[guarded_step(on_nan = skip(max = 3))]
fn nan_update_no_rollback(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

#[test]
fn without_rollback_an_update_to_nan_params_escalates() {
    let (vs, net, x, y) = setup();
    let mut opt = Adam::default().build(&vs, 0.01).unwrap();
    nan_update_no_rollback(&mut opt, &vs, &net, &x, &y);
    opt.set_lr(f64::NAN);
    nan_update_no_rollback(&mut opt, &vs, &net, &x, &y);
    opt.set_lr(0.01);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nan_update_no_rollback(&mut opt, &vs, &net, &x, &y)
    }));
    assert!(
        r.is_err(),
        "an update that made the parameters NaN cannot be skipped"
    );
}

#[guarded_step(max_norm = 5, on_nan = "skip", spike = 6, rollback = 10)]
fn counted_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[guarded_step(max_norm = 5, on_nan = "skip")]
fn counted_plain(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn spike_detection_and_rollback_cost_no_host_read() {
    // On the ATen path (the CPU fast path off), where a guarded step makes exactly one read.
    set_cpu_fast_path(false);
    let (vs, net, x, y) = setup();
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let ((), with) = count_host_reads(|| {
        for _ in 0..30 {
            counted_step(&mut opt, &vs, &net, &x, &y);
        }
    });
    let ((), without) = count_host_reads(|| {
        for _ in 0..30 {
            counted_plain(&mut opt, &vs, &net, &x, &y);
        }
    });
    set_cpu_fast_path(true);
    assert_eq!(with, without, "spike statistics and snapshots add no read");
    assert_eq!(
        site("counted_step").stats().spikes,
        0,
        "no false alarm on clean steps"
    );
}

#[guarded_step(on_nan = "error", spike(sigmas = 6, warmup = 10), sync = "deferred")]
fn deferred_spike(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(())
}

#[test]
fn under_deferred_a_spike_is_skipped_on_the_device_and_reported_a_step_late() {
    let (vs, net, x, y) = setup();
    let mut opt = stepguard::optim::Sgd::default().build(&vs, 0.05).unwrap();
    let (r, reads) = count_host_reads(|| -> Result<(), GuardError> {
        for _ in 0..30 {
            deferred_spike(&mut opt, &vs, &net, &x, &y)?;
        }
        Ok(())
    });
    r.expect("clean steps");
    assert_eq!(reads, 0, "no blocking read");
    let before = var_bits(&vs);
    let wrong = (&y + 1).remainder(3);
    deferred_spike(&mut opt, &vs, &net, &(&x * 3.0), &wrong).expect("judged one step late");
    assert_eq!(var_bits(&vs), before, "skipped on the device");
    let e = deferred_spike(&mut opt, &vs, &net, &x, &y).expect_err("the spike, a step late");
    assert_eq!(e.check, Check::Spike, "{e}");
    assert_eq!(e.step, 30);
}

#[guarded_step(on_nan = "skip", rollback = 5)]
fn snapshot_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn a_snapshot_is_one_copy_and_goes_with_its_model() {
    let s = site("snapshot_step");
    let bytes = |vs: &nn::VarStore| -> usize {
        vs.variables()
            .values()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    };
    let mut sizes = Vec::new();
    for _ in 0..3 {
        // k-fold: a fresh model each time, the old one dropped.
        let (vs, net, x, y) = setup();
        let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
        for _ in 0..3 {
            snapshot_step(&mut opt, &vs, &net, &x, &y);
        }
        sizes.push((s.state().snapshot_bytes(), bytes(&vs)));
    }
    for (held, model) in sizes {
        assert_eq!(
            held, model,
            "one copy of the live model's parameters, none of dropped ones"
        );
    }
}
