//! The ranks' consensus under the attribute's other modes: `sync = "deferred"` (the verdict
//! goes to a fused optimizer's kernel and is read at the next update) and a loss checked with
//! no update in the function (gradient accumulation: read at once).

use std::path::Path;

use stepguard::dist::{DataParallel, ProcessGroup};
use stepguard::optim::FusedOptimizer;
use stepguard::{guarded_step, Config, Decision, GuardError, GuardState, OnNan, StepGuard};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Tensor};

use super::{assert_bitwise, batch, load, mlp, run_two, save, vars};

const STEPS: usize = 5;
/// The step whose loss is NaN on rank 1 only.
const BAD: usize = 2;

#[guarded_step(sync = "deferred", on_nan = "skip", group = pg)]
#[allow(clippy::too_many_arguments)]
fn deferred_together(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    ddp: &DataParallel,
    pg: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
    nan: bool,
) {
    let loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
    let loss = if nan {
        loss + Tensor::from(f32::NAN)
    } else {
        loss
    };
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients().unwrap();
    opt.step();
}

#[guarded_step(sync = "deferred", on_nan = "skip")]
#[allow(clippy::too_many_arguments)]
fn deferred_alone(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    ddp: &DataParallel,
    pg: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
    nan: bool,
) {
    let _ = pg;
    let loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
    let loss = if nan {
        loss + Tensor::from(f32::NAN)
    } else {
        loss
    };
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients().unwrap();
    opt.step();
}

/// A micro-batch of gradient accumulation: backward only, the loss read at once.
#[guarded_step(checks = "loss", on_nan = "error", group = pg)]
fn micro_batch(
    vs: &nn::VarStore,
    net: &nn::Sequential,
    pg: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
    nan: bool,
) -> Result<(), GuardError> {
    let loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
    let loss = if nan {
        loss + Tensor::from(f32::NAN)
    } else {
        loss
    };
    loss.backward();
    Ok(())
}

fn skipped(function: &str) -> u64 {
    stepguard::report_data()
        .iter()
        .filter(|s| s.function == function)
        .map(|s| s.stats.skipped)
        .sum()
}

/// One deferred run; `absent`: the bad step's batch never comes.
fn deferred_run(pg: &ProcessGroup, together: bool, absent: bool) -> Vec<(String, Tensor)> {
    let r = pg.rank();
    tch::manual_seed(10 + r as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = stepguard::optim::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.1)
    .unwrap();
    let (x, y) = batch();
    for k in 0..STEPS {
        if absent && k == BAD {
            continue;
        }
        let (x, y) = (
            x.narrow(0, 8 * r as i64, 8) + 0.1 * k as f64,
            y.narrow(0, 8 * r as i64, 8),
        );
        let nan = r == 1 && k == BAD;
        if together {
            let before = pg.collectives();
            deferred_together(&mut opt, &vs, &net, &ddp, pg, &x, &y, nan);
            // The verdicts ride on the gradients' last bucket.
            let n = pg.collectives() - before;
            assert_eq!(n, ddp.bucket_count() as u64, "collectives of step {k}");
        } else {
            deferred_alone(&mut opt, &vs, &net, &ddp, pg, &x, &y, nan);
        }
    }
    stepguard::flush().unwrap();
    vars(&vs)
}

/// Gradient accumulation by hand: two micro-batches per update, each with its own guard; the
/// first's loss (NaN on rank 1 at step `BAD`) is carried to the second's update, so the
/// verdicts the gradients' last bucket carries do not cover it and the update reduces its own
/// (one collective more). Returns each update's decision and collectives, the parameters, and
/// the collectives of a gradient averaging.
fn carried_run(pg: &ProcessGroup) -> (Vec<String>, Vec<(String, Tensor)>, usize) {
    let r = pg.rank();
    tch::manual_seed(10 + r as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let params = vs.trainable_variables();
    let config = Config::DEFAULT.with_on_nan(OnNan::Skip);
    let state = GuardState::new();
    let (x, y) = batch();
    let mut lines = Vec::new();
    for k in 0..STEPS {
        opt.zero_grad();
        for micro in 0..2 {
            let rows = 8 * r as i64 + 4 * micro;
            let (x, y) = (x.narrow(0, rows, 4) + 0.1 * k as f64, y.narrow(0, rows, 4));
            let mut guard = StepGuard::begin(&config, "accumulate", &state).with_group(pg);
            let mut loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
            if r == 1 && k == BAD && micro == 0 {
                loss += Tensor::from(f32::NAN);
            }
            guard.loss(&loss);
            loss.backward();
            if micro == 0 {
                continue; // the guard goes; what it observed is carried
            }
            let before = pg.collectives();
            ddp.average_gradients().unwrap();
            let decision = guard.decide(&params);
            let n = pg.collectives() - before;
            lines.push(match decision {
                Decision::Proceed => {
                    opt.step();
                    guard.after_update(&params);
                    format!("{k}: proceed, {n} collectives")
                }
                Decision::Skip(s) => format!("{k}: skip, {n} collectives: {}", s.error),
                _ => panic!("step {k}: {decision:?}"),
            });
            guard.finish();
        }
    }
    state.flush().unwrap();
    (lines, vars(&vs), ddp.bucket_count())
}

/// The roles of this file; `false` for a role of another file.
pub fn run(role: &str, pg: &ProcessGroup, out: &Path) -> bool {
    let r = pg.rank();
    match role {
        "deferred_nan" => {
            save(out, &format!("together{r}"), deferred_run(pg, true, false));
            let skips = skipped("deferred_together");
            save(out, &format!("absent{r}"), deferred_run(pg, true, true));
            save(out, &format!("alone{r}"), deferred_run(pg, false, false));
            let alone = skipped("deferred_alone");
            std::fs::write(out.join(format!("skips{r}")), format!("{skips} {alone}")).unwrap();
        }
        "loss_now_nan" => {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = mlp(&vs.root());
            let (x, y) = batch();
            let (x, y) = (x.narrow(0, 8 * r as i64, 8), y.narrow(0, 8 * r as i64, 8));
            let mut lines = Vec::new();
            for k in 0..3 {
                let res = micro_batch(&vs, &net, pg, &x, &y, r == 1 && k == 1);
                lines.push(match res {
                    Ok(()) => format!("{k}: ok"),
                    Err(e) => format!("{k}: error ranks {:?} check {:?}: {e}", e.ranks, e.check),
                });
            }
            std::fs::write(out.join(format!("micro{r}")), lines.join("\n---\n")).unwrap();
        }
        "carried_nan" => {
            let (lines, after, buckets) = carried_run(pg);
            let text = format!("buckets {buckets}\n---\n{}", lines.join("\n---\n"));
            std::fs::write(out.join(format!("carried{r}")), text).unwrap();
            save(out, &format!("after{r}"), after);
        }
        _ => return false,
    }
    true
}

#[test]
fn deferred_a_nan_loss_on_rank_1_is_skipped_on_the_device_of_both_ranks() {
    let dir = run_two("deferred_nan", 60.0);
    let d = &dir.0;
    let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
    assert_bitwise(&load(d, "together0"), &load(d, "together1"), "the replicas");
    assert_bitwise(
        &load(d, "together0"),
        &load(d, "absent0"),
        "a run where the bad batch never came",
    );
    // Both ranks counted the skip; alone, only rank 1 skipped and the replicas drifted apart.
    assert_eq!(read("skips0"), "1 0");
    assert_eq!(read("skips1"), "1 1");
    let (a0, a1) = (load(d, "alone0"), load(d, "alone1"));
    let same = std::panic::catch_unwind(|| assert_bitwise(&a0, &a1, "alone"));
    assert!(same.is_err(), "without the group the ranks decide apart");
}

#[test]
fn a_loss_read_at_once_fails_on_both_ranks_and_names_rank_1() {
    let dir = run_two("loss_now_nan", 60.0);
    let d = &dir.0;
    let read = |n: &str| -> Vec<String> {
        let t = std::fs::read_to_string(d.join(n)).unwrap();
        t.split("\n---\n").map(str::to_string).collect()
    };
    let (m0, m1) = (read("micro0"), read("micro1"));
    eprintln!("{m0:?}\n{m1:?}");
    for m in [&m0, &m1] {
        assert!(
            m[0].starts_with("0: ok") && m[2].starts_with("2: ok"),
            "{m:?}"
        );
        assert!(m[1].starts_with("1: error ranks [1]"), "{m:?}");
    }
    assert!(m0[1].contains("rank 1: loss NaN"), "{}", m0[1]);
    assert!(m1[1].contains("check Loss"), "{}", m1[1]);
}

#[test]
fn a_nan_carried_from_a_micro_batch_on_rank_1_skips_on_both_ranks_with_a_collective_of_its_own() {
    let dir = run_two("carried_nan", 60.0);
    let d = &dir.0;
    let read = |n: &str| -> Vec<String> {
        let t = std::fs::read_to_string(d.join(n)).unwrap();
        t.split("\n---\n").map(str::to_string).collect()
    };
    let (c0, c1) = (read("carried0"), read("carried1"));
    eprintln!("{c0:?}\n{c1:?}");
    assert_bitwise(&load(d, "after0"), &load(d, "after1"), "the replicas");
    assert_eq!(c0.len(), STEPS + 1);
    let buckets: u64 = c0[0].trim_start_matches("buckets ").parse().unwrap();
    let own = format!(", {} collectives", buckets + 1);
    for (k, (a, b)) in c0.iter().zip(&c1).enumerate().skip(1) {
        let head = |l: &str| l.split(':').take(2).collect::<Vec<_>>().join(":");
        assert_eq!(head(a), head(b), "the ranks decided differently");
        let skip = k - 1 == BAD;
        assert_eq!(a.contains("skip"), skip, "{a}");
        assert!(
            a.contains(&own),
            "{a}: the carried loss needs a collective of its own"
        );
    }
    assert!(c0[BAD + 1].contains("rank 1: loss NaN"), "{}", c0[BAD + 1]);
}
