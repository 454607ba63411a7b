//! The guard's consensus (`StepGuard::with_group`, the attribute's `group = ..`) with two ranks:
//! every decision is the same on both, whatever rank saw the bad value.

use std::path::Path;

use stepguard::amp::LossScale;
use stepguard::dist::{DataParallel, ProcessGroup};
use stepguard::{Config, Decision, GuardState, OnNan, Spike, StepGuard};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Tensor};

use super::{assert_bitwise, batch, bits, load, mlp, run_two, save, vars, LR};

const STEPS: usize = 5;
/// The step whose batch is bad on rank 1 only.
const BAD: usize = 2;
/// The ATen operators the consensus may add to a step that passes.
const CONSENSUS_OPS: i64 = 8;
/// The step whose loss spikes on rank 1 only (after the statistics' warm-up of 3 updates).
const SPIKE: usize = 4;

/// How a run treats step `BAD`.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Bad {
    /// Rank 1's loss is NaN (a detached term: its grads stay finite, so only the loss check
    /// sees it).
    NanLoss,
    /// The batch never comes (on either rank).
    Absent,
    /// Rank 1's loss spikes (a detached term: the grads are those of a normal step), with
    /// spike detection on.
    Spike,
    /// Rank 1's loss is scaled up until its grads overflow, with dynamic loss scaling.
    Overflow,
    /// Rank 1's learning rate is NaN for that step (its parameters go non-finite), with
    /// `rollback = 1`.
    NanLr,
}

impl Bad {
    fn config(self) -> Config {
        let c = Config::DEFAULT.with_on_nan(OnNan::Skip);
        match self {
            Bad::Spike => c.with_spike(Spike::new(6.0, 3, 10)),
            Bad::Overflow => c.with_loss_scale(LossScale::new(65536.0, 2.0, 0.5, 2, 1.0)),
            Bad::NanLr => c.with_rollback(1),
            _ => c,
        }
    }
}

/// What a run leaves: the decision of each step ("k: proceed", or "k: skip REASON" and the
/// error), the parameters and the loss scale after each step.
struct Run {
    decisions: Vec<String>,
    after: Vec<Vec<(String, Tensor)>>,
    scales: Vec<f64>,
    /// Host reads counted by each step's decision.
    reads: Vec<u64>,
    /// Collectives issued by each step's gradient averaging and decision.
    collectives: Vec<u64>,
    /// The all-reduces of one gradient averaging.
    buckets: u64,
    /// ATen operators dispatched by each step's gradient averaging and decision.
    ops: Vec<u64>,
}

/// One guarded data-parallel run from rank 0's seeded parameters.
fn guarded_run(pg: &ProcessGroup, bad: Bad, consensus: bool) -> Run {
    let r = pg.rank();
    tch::manual_seed(10 + r as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = nn::Sgd::default().build(&vs, LR).unwrap();
    let params = vs.trainable_variables();
    let config = bad.config();
    let state = GuardState::new();
    let (x, y) = batch();
    let mut run = Run {
        decisions: Vec::new(),
        after: Vec::new(),
        scales: Vec::new(),
        reads: Vec::new(),
        collectives: Vec::new(),
        buckets: ddp.bucket_count() as u64,
        ops: Vec::new(),
    };
    for k in 0..STEPS {
        if k == BAD && bad == Bad::Absent {
            continue;
        }
        let here = r == 1 && k == if bad == Bad::Spike { SPIKE } else { BAD };
        // A shard that moves with the step: rows 8r..8r+8 of the batch, shifted by k.
        let (x, y) = (
            x.narrow(0, 8 * r as i64, 8) + 0.1 * k as f64,
            y.narrow(0, 8 * r as i64, 8),
        );
        let mut guard = StepGuard::begin(&config, "dp_step", &state);
        if consensus {
            guard = guard.with_group(pg);
        }
        opt.zero_grad();
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        let loss = match bad {
            Bad::NanLoss if here => loss + Tensor::from(f32::NAN),
            Bad::Spike if here => loss + Tensor::from(1000f32),
            Bad::Overflow if here => loss * 1e36,
            _ => loss,
        };
        opt.set_lr(if bad == Bad::NanLr && here {
            f64::NAN
        } else {
            LR
        });
        guard.scale_loss(&loss).unwrap().backward();
        let before = pg.collectives();
        let ((decision, reads), ops) = stepguard::testing::count_aten_ops(|| {
            ddp.average_gradients().unwrap();
            stepguard::testing::count_host_reads(|| guard.decide(&params))
        });
        run.reads.push(reads);
        run.ops.push(ops);
        run.collectives.push(pg.collectives() - before);
        match decision {
            Decision::Proceed => {
                guard.refresh_snapshot(&params, Vec::new);
                opt.step();
                guard.after_update(&params);
                run.decisions.push(format!("{k}: proceed"));
            }
            Decision::Skip(s) => run
                .decisions
                .push(format!("{k}: skip {:?}\n{}", s.reason, s.error)),
            Decision::Fail(e) => panic!("step {k}: {e}"),
            _ => unreachable!(),
        }
        guard.finish();
        run.after.push(vars(&vs));
        run.scales.push(state.read_loss_scale().unwrap_or(0.0));
    }
    state.flush().unwrap();
    run
}

/// The step of [`guarded_run`]'s NaN-loss run written with the attribute, with the group
/// (`$with`, `group = $pg`) and without it (`$alone`).
macro_rules! attribute_steps {
    ($with:ident, $alone:ident, group = $pg:ident, |$($p:ident: $t:ty),*| $body:block) => {
        #[stepguard::guarded_step(on_nan = "skip", group = $pg)]
        fn $with($($p: $t),*) $body
        #[stepguard::guarded_step(on_nan = "skip")]
        fn $alone($($p: $t),*) $body
    };
}

attribute_steps!(
    attr_step,
    attr_step_alone,
    group = pg,
    |pg: &ProcessGroup,
     ddp: &DataParallel,
     opt: &mut nn::Optimizer,
     net: &nn::Sequential,
     x: &Tensor,
     y: &Tensor,
     nan: bool| {
        let _ = pg;
        let mut loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
        if nan {
            loss += Tensor::from(f32::NAN);
        }
        opt.zero_grad();
        loss.backward();
        ddp.average_gradients().unwrap();
        opt.step();
    }
);

/// A NaN in rank 1's batch, under `on_nan = "error"`: both ranks fail, both replay the call
/// (their collectives match), and rank 1's replay names the argument that held it.
#[stepguard::guarded_step(on_nan = "error", group = pg)]
fn attr_error_step(
    pg: &ProcessGroup,
    ddp: &DataParallel,
    opt: &mut nn::Optimizer,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), stepguard::GuardError> {
    let _ = pg;
    let loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients().unwrap();
    opt.step();
    Ok(())
}

/// [`attr_error_step`] on both ranks: each rank's error text.
fn replay_role(pg: &ProcessGroup, out: &Path) {
    let r = pg.rank();
    tch::manual_seed(10 + r as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = nn::Sgd::default().build(&vs, LR).unwrap();
    let (x, y) = batch();
    let (x, y) = (
        x.narrow(0, 8 * r as i64, 8).copy(),
        y.narrow(0, 8 * r as i64, 8),
    );
    if r == 1 {
        let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    }
    let before = pg.collectives();
    let e = attr_error_step(pg, &ddp, &mut opt, &net, &x, &y).expect_err("the NaN on rank 1");
    let collectives = pg.collectives() - before;
    let text = format!(
        "{collectives} collectives, {} buckets\n{e}",
        ddp.bucket_count()
    );
    std::fs::write(out.join(format!("origin{r}")), text).unwrap();
}

/// [`guarded_run`]'s NaN-loss run through the attribute (with `group = pg` or without): the
/// parameters after each step.
fn attribute_run(pg: &ProcessGroup, group: bool) -> Vec<Vec<(String, Tensor)>> {
    let r = pg.rank();
    tch::manual_seed(10 + r as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = nn::Sgd::default().build(&vs, LR).unwrap();
    let (x, y) = batch();
    (0..STEPS)
        .map(|k| {
            let (x, y) = (
                x.narrow(0, 8 * r as i64, 8) + 0.1 * k as f64,
                y.narrow(0, 8 * r as i64, 8),
            );
            let nan = k == BAD && r == 1;
            if group {
                let before = pg.collectives();
                attr_step(pg, &ddp, &mut opt, &net, &x, &y, nan);
                // The verdicts ride on the gradients' last bucket. The bad step's failure is
                // replayed on both ranks (both see it): its averaging runs twice, on both.
                let n = pg.collectives() - before;
                let runs = if k == BAD { 2 } else { 1 };
                assert_eq!(
                    n,
                    runs * ddp.bucket_count() as u64,
                    "collectives of step {k}"
                );
            } else {
                attr_step_alone(pg, &ddp, &mut opt, &net, &x, &y, nan);
            }
            vars(&vs)
        })
        .collect()
}

/// The attribute's role: its parameters after each step, with and without the group, and the
/// run without the bad batch.
fn attribute_role(pg: &ProcessGroup, out: &Path) {
    let r = pg.rank();
    for (group, name) in [(true, "attr"), (false, "attr_alone")] {
        for (k, v) in attribute_run(pg, group).into_iter().enumerate() {
            save(out, &format!("{name}{k}_{r}"), v);
        }
    }
    let absent = guarded_run(pg, Bad::Absent, true);
    save(
        out,
        &format!("absent{r}"),
        absent.after.into_iter().last().unwrap(),
    );
}

/// The consensus roles; `false` for a role of another file.
pub fn run(role: &str, pg: &ProcessGroup, out: &Path) -> bool {
    let r = pg.rank();
    let bad = match role {
        "guard_nan" => Bad::NanLoss,
        "guard_spike" => Bad::Spike,
        "guard_overflow" => Bad::Overflow,
        "guard_rollback" => Bad::NanLr,
        "guard_attr" => {
            attribute_role(pg, out);
            replay_role(pg, out);
            return true;
        }
        _ => return false,
    };
    let text = |name: &str, run: &Run| {
        let t = run.decisions.join("\n---\n");
        std::fs::write(out.join(format!("{name}{r}")), t).unwrap();
    };
    let together = guarded_run(pg, bad, true);
    text("decisions", &together);
    let scales = Tensor::from_slice(&together.scales);
    save(out, &format!("scales{r}"), vec![("scales".into(), scales)]);
    for (k, v) in together.after.iter().enumerate() {
        let v = v
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        save(out, &format!("step{k}_{r}"), v);
    }
    if bad == Bad::NanLoss {
        let absent = guarded_run(pg, Bad::Absent, true);
        save(
            out,
            &format!("absent{r}"),
            absent.after.into_iter().last().unwrap(),
        );
    }
    // Without the group, each rank decides alone.
    let alone = guarded_run(pg, bad, false);
    text("alone", &alone);
    // The same host reads per step as alone (the collective runs on the device tensors).
    assert_eq!(together.reads[0], alone.reads[0]);
    let ops = format!("together {:?}, alone {:?}", together.ops, alone.ops);
    if bad == Bad::NanLoss {
        // What the consensus adds to a step that passes: a constant few operators (this
        // rank's share, its place in the bucket, the mean loss), whatever the model.
        for k in (0..STEPS).filter(|&k| k != BAD) {
            let extra = together.ops[k] as i64 - alone.ops[k] as i64;
            assert!((0..=CONSENSUS_OPS).contains(&extra), "step {k}: {ops}");
        }
    }
    // The verdicts ride on the gradients' last bucket: no collective of their own.
    assert_eq!(together.collectives, alone.collectives);
    assert!(
        together.collectives.iter().all(|&c| c == together.buckets),
        "collectives per step {:?}, buckets {}",
        together.collectives,
        together.buckets
    );
    true
}

/// The decisions of both ranks, step by step (checked to be the same kind on both).
fn decisions(d: &Path) -> (Vec<String>, Vec<String>) {
    let read = |n: &str| -> Vec<String> {
        let t = std::fs::read_to_string(d.join(n)).unwrap();
        t.split("\n---\n").map(str::to_string).collect()
    };
    let (a, b) = (read("decisions0"), read("decisions1"));
    assert_eq!(a.len(), STEPS, "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        let head = |s: &str| s.lines().next().unwrap_or("").to_string();
        assert_eq!(head(x), head(y), "the ranks decided differently:\n{x}\n{y}");
    }
    (a, b)
}

fn alone(d: &Path, rank: usize) -> Vec<String> {
    let t = std::fs::read_to_string(d.join(format!("alone{rank}"))).unwrap();
    t.split("\n---\n").map(str::to_string).collect()
}

fn equal_after(d: &Path, from: usize) {
    for k in from..STEPS {
        assert_bitwise(
            &load(d, &format!("step{k}_0")),
            &load(d, &format!("step{k}_1")),
            &format!("the ranks' parameters after step {k}"),
        );
    }
}

#[test]
fn a_nan_loss_on_rank_1_skips_the_step_on_both_ranks_and_names_rank_1() {
    let dir = run_two("guard_nan", 60.0);
    let d = &dir.0;
    let (steps0, steps1) = decisions(d);
    for (k, a) in steps0.iter().enumerate() {
        assert_eq!(a.starts_with(&format!("{k}: skip")), k == BAD, "{a}");
    }
    // Rank 0's loss was finite: its error names rank 1 and what it saw there.
    let e0 = &steps0[BAD];
    assert!(e0.contains("rank 1: loss NaN"), "{e0}");
    assert!(e0.contains("seen on rank 1"), "{e0}");
    // Rank 1 names the tensor itself.
    let e1 = &steps1[BAD];
    eprintln!("rank 0: {e0}\nrank 1: {e1}");
    assert!(
        e1.contains("non-finite loss") && e1.contains("seen on rank 1"),
        "{e1}"
    );
    assert!(e1.contains("loss") && e1.contains("NaN"), "{e1}");
    equal_after(d, 0);
    // As if the batch never came.
    let last = format!("step{}_0", STEPS - 1);
    assert_bitwise(
        &load(d, &last),
        &load(d, "absent0"),
        "rank 0 vs no bad batch",
    );
    assert_bitwise(
        &load(d, "absent0"),
        &load(d, "absent1"),
        "the runs without it",
    );
    // Not vacuous: alone, rank 0 applies the update rank 1 skips.
    assert!(alone(d, 0)[BAD].contains("proceed"), "{:?}", alone(d, 0));
    assert!(alone(d, 1)[BAD].contains("skip"), "{:?}", alone(d, 1));
}

/// Whether the parameters after step `k` of run `name` on `rank` equal those after `k - 1`.
fn unchanged(d: &Path, name: &str, k: usize, rank: usize) -> bool {
    let (a, b) = (
        load(d, &format!("{name}{}_{rank}", k - 1)),
        load(d, &format!("{name}{k}_{rank}")),
    );
    a.iter().zip(&b).all(|((_, x), (_, y))| bits(x) == bits(y))
}

#[test]
fn the_attribute_with_group_skips_a_nan_on_rank_1_on_both_ranks() {
    let dir = run_two("guard_attr", 60.0);
    let d = &dir.0;
    for k in 0..STEPS {
        assert_bitwise(
            &load(d, &format!("attr{k}_0")),
            &load(d, &format!("attr{k}_1")),
            &format!("the ranks' parameters after step {k}"),
        );
    }
    // Both ranks skipped step BAD, and only it.
    for rank in 0..2 {
        for k in 1..STEPS {
            assert_eq!(
                unchanged(d, "attr", k, rank),
                k == BAD,
                "rank {rank}, step {k}"
            );
        }
    }
    // As if the batch never came.
    let last = format!("attr{}_0", STEPS - 1);
    assert_bitwise(
        &load(d, &last),
        &load(d, "absent0"),
        "rank 0 vs no bad batch",
    );
    // Not vacuous: without the group, rank 0 applies the update rank 1 skips.
    assert!(!unchanged(d, "attr_alone", BAD, 0));
    assert!(unchanged(d, "attr_alone", BAD, 1));
    // A NaN in rank 1's batch under `on_nan = "error"`: both ranks replayed the call (its
    // averaging ran twice on each), and rank 1's replay names the argument that held it.
    let text = |r: usize| std::fs::read_to_string(d.join(format!("origin{r}"))).unwrap();
    for r in 0..2 {
        let t = text(r);
        let (counts, _) = t.split_once('\n').unwrap();
        let buckets: u64 = counts
            .split(", ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            counts,
            format!("{} collectives, {buckets} buckets", 2 * buckets),
            "rank {r}"
        );
    }
    let t1 = text(1);
    assert!(
        t1.contains("origin (replayed on rank 1): already in the argument `x`"),
        "rank 1 names the argument: {t1}"
    );
    assert!(text(0).contains("seen on rank 1"), "{}", text(0));
}

#[test]
fn a_loss_spike_on_rank_1_skips_the_step_on_both_ranks() {
    let dir = run_two("guard_spike", 60.0);
    let d = &dir.0;
    let (steps0, _) = decisions(d);
    assert!(steps0[SPIKE].contains("loss spike"), "{}", steps0[SPIKE]);
    equal_after(d, 0);
    // Alone, rank 0's own loss is normal: it applies the update.
    assert!(alone(d, 0)[SPIKE].contains("proceed"), "{:?}", alone(d, 0));
    assert!(
        alone(d, 1)[SPIKE].contains("loss spike"),
        "{:?}",
        alone(d, 1)
    );
}

#[test]
fn an_overflow_on_rank_1_backs_the_loss_scale_off_on_both_ranks() {
    let dir = run_two("guard_overflow", 60.0);
    let d = &dir.0;
    let (steps0, _) = decisions(d);
    assert!(steps0[BAD].contains("skip Overflow"), "{}", steps0[BAD]);
    equal_after(d, 0);
    let (s0, s1) = (load(d, "scales0"), load(d, "scales1"));
    assert_bitwise(&s0, &s1, "the loss-scale trajectories");
    let s = Vec::<f64>::try_from(&s0[0].1).unwrap();
    // growth_interval 2: 65536 -> 131072 after two updates; halved by the overflow.
    assert_eq!(s[..BAD + 1], [65536.0, 131072.0, 65536.0], "{s:?}");
}

#[test]
fn a_rollback_caused_on_rank_1_happens_on_both_ranks() {
    let dir = run_two("guard_rollback", 60.0);
    let d = &dir.0;
    let (steps0, steps1) = decisions(d);
    // Rank 1's update made its parameters NaN; the next step restores both ranks' snapshots.
    for s in [&steps0[BAD + 1], &steps1[BAD + 1]] {
        assert!(s.contains("skip RolledBack"), "{s}");
    }
    assert!(steps0[BAD + 1].contains("rank 1"), "{}", steps0[BAD + 1]);
    equal_after(d, BAD + 1);
    // Alone, rank 0 only skips (its parameters are finite): the replicas stay apart.
    let a0 = alone(d, 0);
    assert!(!a0[BAD + 1].contains("RolledBack"), "{a0:?}");
}

#[test]
fn a_group_of_one_changes_nothing() {
    let pg = ProcessGroup::single();
    let with = guarded_run(&pg, Bad::NanLr, true);
    let without = guarded_run(&pg, Bad::NanLr, false);
    assert_eq!(with.decisions, without.decisions);
    assert_eq!(with.reads, without.reads);
    for (a, b) in with.after.iter().zip(&without.after) {
        assert_bitwise(a, b, "a group of one");
    }
}
