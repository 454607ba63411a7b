//! A whole run in a checkpoint (`Checkpoints::save_run` / `resume_run`): a run resumed from
//! it continues bitwise as the uninterrupted one (dropout included); NaN in the state is not
//! saved; a checkpoint of another model changes nothing; tch's optimizer says its state is
//! not kept. (`scripts/resume-check.sh` does the same across processes killed with SIGKILL.)

use std::path::{Path, PathBuf};

use stepguard::checkpoint::{CheckpointError, Checkpoints};
use stepguard::guarded_step;
use stepguard::optim::{FusedOptimizer, Sgd};
use stepguard_suite::var_bits;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// A resume restores every guarded function's state and counters, the generators too: the
/// tests of this file run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fresh_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint_run-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn net(vs: &nn::VarStore, width: i64) -> nn::Sequential {
    let p = vs.root();
    nn::seq()
        .add(nn::linear(&p / "l1", 8, width, Default::default()))
        .add_fn(|x| x.relu().dropout(0.3, true))
        .add(nn::linear(&p / "out", width, 3, Default::default()))
}

fn sgd(vs: &nn::VarStore) -> FusedOptimizer {
    Sgd {
        momentum: 0.9,
        ..Sgd::default()
    }
    .build(vs, 0.1)
    .unwrap()
}

#[guarded_step(max_norm = 1, on_nan = "skip", spike(sigmas = 6, warmup = 2))]
fn step(opt: &mut FusedOptimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// Batch `i` from the CPU generator (saved in the checkpoint); batch 4 holds a NaN (skipped).
fn batch(i: u64) -> (Tensor, Tensor) {
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
    if i == 4 {
        let _ = x.get(1).get(1).fill_(f64::NAN);
    }
    (x, y)
}

fn site() -> &'static stepguard::registry::Site {
    stepguard::registry::registry()
        .find(|s| s.name() == "step")
        .unwrap()
}

#[test]
fn a_resumed_run_ends_bitwise_as_the_uninterrupted_one() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("exact"));
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs, 16);
    let mut opt = sgd(&vs);
    for i in 0..10u64 {
        let (x, y) = batch(i);
        step(&mut opt, &vs, &model, &x, &y);
        if i == 5 {
            store.save_run(6, &vs, Some(&opt), &6u64).unwrap();
        }
    }
    let (uninterrupted, moments) = (var_bits(&vs), opt.state());
    let stats = site().stats();

    // A new model and optimizer (another initialisation, as a restarted process builds),
    // and the generator moved on: the checkpoint puts everything back.
    tch::manual_seed(99);
    let vs2 = nn::VarStore::new(Device::Cpu);
    let model2 = net(&vs2, 16);
    let mut opt2 = sgd(&vs2);
    let r = store
        .resume_run::<u64>(&vs2, Some(&mut opt2))
        .unwrap()
        .expect("a checkpoint");
    assert_eq!((r.step, r.position), (6, 6));
    assert_eq!(
        site().stats().calls,
        6,
        "the counters come back with the state"
    );
    assert_eq!(site().stats().skipped, 1);
    for i in r.position..10 {
        let (x, y) = batch(i);
        step(&mut opt2, &vs2, &model2, &x, &y);
    }
    assert_eq!(var_bits(&vs2), uninterrupted, "parameters bitwise");
    for ((n1, a), (n2, b)) in moments.iter().zip(opt2.state()) {
        assert_eq!(n1, &n2);
        assert!(a.equal(&b), "optimizer state {n1} bitwise");
    }
    let again = site().stats();
    assert_eq!((again.calls, again.skipped), (stats.calls, stats.skipped));
}

#[test]
fn a_non_finite_model_is_not_saved() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("nan"));
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = net(&vs, 4);
    let opt = sgd(&vs);
    tch::no_grad(|| {
        let _ = vs.variables()["l1.weight"]
            .get(0)
            .get(0)
            .fill_(f64::INFINITY);
    });
    let e = store.save_run(1, &vs, Some(&opt), &1u64).unwrap_err();
    let CheckpointError::Unverified(g) = &e else {
        panic!("{e}")
    };
    assert_eq!(g.check, stepguard::Check::Params);
    assert_eq!(g.tensors.len(), 1, "{e}");
    assert!(g.tensors[0].name.contains("l1.weight"), "{e}");
    assert!(store.latest().unwrap().is_none(), "nothing written");
}

#[test]
fn a_checkpoint_of_another_model_changes_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("other"));
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = net(&vs, 16);
    let opt = sgd(&vs);
    store.save_run(1, &vs, Some(&opt), &1u64).unwrap();

    let other = nn::VarStore::new(Device::Cpu);
    let _wide = net(&other, 32);
    let mut opt2 = sgd(&other);
    let before = var_bits(&other);
    let draw = |seed| {
        tch::manual_seed(seed);
        let _ = Tensor::randn([1], (Kind::Float, Device::Cpu));
    };
    draw(5);
    let e = store
        .resume_run::<u64>(&other, Some(&mut opt2))
        .unwrap_err();
    assert!(matches!(e, CheckpointError::Mismatch(_)), "{e}");
    assert!(e.to_string().contains("l1.weight: shape [16, 8]"), "{e}");
    assert_eq!(var_bits(&other), before, "the model is unchanged");
    assert!(opt2.state().is_empty() || opt2.state().iter().all(|(n, _)| n == "sgd_started"));
    // The generator was not restored either: it draws on from where it was.
    let next = Tensor::randn([1], (Kind::Float, Device::Cpu));
    tch::manual_seed(5);
    let _ = Tensor::randn([1], (Kind::Float, Device::Cpu));
    assert!(next.equal(&Tensor::randn([1], (Kind::Float, Device::Cpu))));
}

#[guarded_step(max_norm = 1, on_nan = "skip", spike(sigmas = 6, warmup = 2))]
fn tch_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// tch's SGD without momentum keeps no state: with it, a resume is exact even though the
/// optimizer's state is not saved (which the save and the resume say once).
#[test]
fn the_state_of_tchs_optimizer_is_not_kept_and_the_rest_is() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("tch"));
    tch::manual_seed(8);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs, 8);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    for i in 0..8u64 {
        let (x, y) = batch(i);
        tch_step(&mut opt, &vs, &model, &x, &y);
        if i == 2 {
            let ckpt = store.save_run(3, &vs, Some(&opt), &"epoch 1").unwrap();
            assert_eq!(ckpt.meta()["optimizer"], false);
            assert!(ckpt
                .files()
                .iter()
                .all(|f| f.name != "optimizer.safetensors"));
        }
    }
    let uninterrupted = var_bits(&vs);
    tch::manual_seed(9);
    let vs2 = nn::VarStore::new(Device::Cpu);
    let model2 = net(&vs2, 8);
    let mut opt2 = nn::Sgd::default().build(&vs2, 0.1).unwrap();
    let r = store
        .resume_run::<String>(&vs2, Some(&mut opt2))
        .unwrap()
        .unwrap();
    assert_eq!((r.step, r.position.as_str()), (3, "epoch 1"));
    for i in 3..8u64 {
        let (x, y) = batch(i);
        tch_step(&mut opt2, &vs2, &model2, &x, &y);
    }
    assert_eq!(var_bits(&vs2), uninterrupted, "exact in everything else");
}

#[guarded_step(sync = "deferred", on_nan = "skip")]
fn deferred_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// Under `sync = "deferred"` the last update's verdict is read by the save: a bad last batch
/// (skipped on the device, not yet reported) refuses the save with its error.
#[test]
fn a_save_reads_the_last_deferred_verdict_first() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("deferred"));
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs, 8);
    let mut opt = sgd(&vs);
    for i in 0..3 {
        let (x, y) = batch(i);
        deferred_step(&mut opt, &vs, &model, &x, &y);
    }
    store.save_run(3, &vs, Some(&opt), &3u64).unwrap();
    let (x, y) = batch(4); // the NaN batch: its verdict is still on the device
    deferred_step(&mut opt, &vs, &model, &x, &y);
    let e = store.save_run(4, &vs, Some(&opt), &4u64).unwrap_err();
    let CheckpointError::Unverified(g) = &e else {
        panic!("{e}")
    };
    assert_eq!(g.check, stepguard::Check::Loss, "{e}");
    assert_eq!(
        store.latest().unwrap().unwrap().checkpoint.step(),
        3,
        "nothing written"
    );
}

#[guarded_step(on_nan = "skip", rollback = 4)]
fn rollback_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// Calls `from..10` of a run with `rollback = 4`: call 6's NaN learning rate makes NaN
/// parameters, which call 7 finds and rolls back to the last snapshot. Returns the update each
/// call rolled back to.
fn calls_with_a_rollback(
    from: u64,
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    model: &nn::Sequential,
    store: Option<&Checkpoints>,
) -> Vec<(u64, u64)> {
    let mut rolled = Vec::new();
    for i in from..10 {
        let (x, y) = batch(i + 10);
        opt.set_lr(if i == 6 { f64::NAN } else { 0.1 });
        rollback_step(opt, vs, model, &x, &y);
        if let Some(stepguard::Outcome::RolledBack { to_update, .. }) = stepguard::last_outcome() {
            rolled.push((i, to_update));
        }
        if i == 5 {
            if let Some(store) = store {
                store.save_run(6, vs, Some(&*opt), &6u64).unwrap();
            }
        }
    }
    rolled
}

#[test]
fn a_rollback_after_a_resume_goes_back_where_the_uninterrupted_run_does() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("rollback"));
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs, 16);
    let mut opt = sgd(&vs);
    let rolled = calls_with_a_rollback(0, &mut opt, &vs, &model, Some(&store));
    assert_eq!(rolled.len(), 1, "one rollback: {rolled:?}");
    let (uninterrupted, moments) = (var_bits(&vs), opt.state());

    tch::manual_seed(99);
    let vs2 = nn::VarStore::new(Device::Cpu);
    let model2 = net(&vs2, 16);
    let mut opt2 = sgd(&vs2);
    let r = store
        .resume_run::<u64>(&vs2, Some(&mut opt2))
        .unwrap()
        .expect("a checkpoint");
    let rolled2 = calls_with_a_rollback(r.position, &mut opt2, &vs2, &model2, None);
    assert_eq!(
        rolled2, rolled,
        "the snapshot taken before the save comes back with the checkpoint"
    );
    assert_eq!(var_bits(&vs2), uninterrupted, "parameters bitwise");
    for ((n1, a), (n2, b)) in moments.iter().zip(opt2.state()) {
        assert_eq!(n1, &n2);
        assert!(a.equal(&b), "optimizer state {n1} bitwise");
    }
}

#[test]
fn a_snapshot_comes_back_only_with_the_optimizer_it_holds_state_of() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("rollback-optimizer"));
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs, 16);
    let mut opt = sgd(&vs);
    calls_with_a_rollback(0, &mut opt, &vs, &model, Some(&store));
    let rollback_site = || {
        stepguard::registry::registry()
            .find(|s| s.name() == "rollback_step")
            .unwrap()
    };
    // Device memory held by the function's snapshots, one per VarStore that is still alive.
    let bytes = || rollback_site().state().snapshot_bytes();
    let held = bytes();
    assert!(held > 0, "a snapshot is held");

    // Resumed with its optimizer: the snapshot, its optimizer state included, comes back.
    let vs2 = nn::VarStore::new(Device::Cpu);
    let _model2 = net(&vs2, 16);
    let mut opt2 = sgd(&vs2);
    store
        .resume_run::<u64>(&vs2, Some(&mut opt2))
        .unwrap()
        .unwrap();
    assert_eq!(bytes(), 2 * held, "vs2's snapshot, as large as vs's");

    // Resumed without it: the rest is resumed, the snapshot (which holds optimizer state that
    // has nothing to go back into) is not, and nothing panics.
    let vs3 = nn::VarStore::new(Device::Cpu);
    let _model3 = net(&vs3, 16);
    store.resume_run::<u64>(&vs3, None).unwrap().unwrap();
    assert_eq!(bytes(), 2 * held, "no snapshot for vs3");
}

/// `step` for one test (the others count `step`'s calls).
#[guarded_step(max_norm = 1, on_nan = "skip")]
fn own_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn a_resume_after_a_failed_flush_trains_on_from_the_checkpoint() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let store = Checkpoints::new(fresh_dir("flush-then-resume"));
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs, 16);
    let mut opt = sgd(&vs);
    let (x, y) = batch(0);
    own_step(&mut opt, &vs, &model, &x, &y);
    store.save_run(1, &vs, Some(&opt), &1u64).unwrap();
    // An update that makes the parameters NaN; the save finds it and refuses.
    opt.set_lr(f64::NAN);
    own_step(&mut opt, &vs, &model, &x, &y);
    opt.set_lr(0.1);
    assert!(matches!(
        store.save_run(2, &vs, Some(&opt), &2u64),
        Err(CheckpointError::Unverified(_))
    ));
    // The user's way out: back to the last checkpoint, in place, and on with training.
    store
        .resume_run::<u64>(&vs, Some(&mut opt))
        .unwrap()
        .unwrap();
    own_step(&mut opt, &vs, &model, &x, &y);
    assert_eq!(
        stepguard::last_outcome(),
        Some(stepguard::Outcome::Applied { clipped: true }),
        "the failure read before the resume is not the resumed run's"
    );
}
