//! The guard's consensus (`StepGuard::with_group`) with two ranks: every decision is the same on
//! both, whatever rank saw the bad value.

use std::path::Path;

use stepguard::dist::{DataParallel, ProcessGroup};
use stepguard::{Config, Decision, GuardState, OnNan, StepGuard};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Tensor};

use super::{assert_bitwise, batch, load, mlp, run_two, save, vars, LR};

const STEPS: usize = 5;
/// The step whose batch is bad on rank 1 only.
const BAD: usize = 2;

/// How a run treats step `BAD`.
#[derive(Clone, Copy, PartialEq)]
enum Bad {
    /// Rank 1's loss is NaN (a detached term: its grads stay finite, so only the loss check
    /// sees it).
    NanLoss,
    /// The batch never comes (on either rank).
    Absent,
}

/// One guarded data-parallel run from rank 0's seeded parameters; returns the decision of each
/// step ("proceed", or the skip's error) and the parameters after each step.
fn guarded_run(
    pg: &ProcessGroup,
    bad: Bad,
    consensus: bool,
) -> (Vec<String>, Vec<Vec<(String, Tensor)>>) {
    let r = pg.rank();
    tch::manual_seed(10 + r as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = nn::Sgd::default().build(&vs, LR).unwrap();
    let params = vs.trainable_variables();
    let config = Config::DEFAULT.with_on_nan(OnNan::Skip);
    let state = GuardState::new();
    let (x, y) = batch();
    let (mut decisions, mut after) = (Vec::new(), Vec::new());
    for k in 0..STEPS {
        if k == BAD && bad == Bad::Absent {
            continue;
        }
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
        let mut loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        if k == BAD && r == 1 && bad == Bad::NanLoss {
            loss = loss + Tensor::from(f32::NAN);
        }
        guard.loss(&loss);
        loss.backward();
        ddp.average_gradients().unwrap();
        match guard.decide(&params) {
            Decision::Proceed => {
                opt.step();
                guard.after_update(&params);
                decisions.push(format!("{k}: proceed"));
            }
            Decision::Skip(s) => decisions.push(format!("{k}: skip\n{}", s.error)),
            Decision::Fail(e) => panic!("step {k}: {e}"),
            _ => unreachable!(),
        }
        guard.finish();
        after.push(vars(&vs));
    }
    state.flush().unwrap();
    (decisions, after)
}

/// The consensus roles; `false` for a role of another file.
pub fn run(role: &str, pg: &ProcessGroup, out: &Path) -> bool {
    let r = pg.rank();
    match role {
        "guard_nan" => {
            let (decisions, after) = guarded_run(pg, Bad::NanLoss, true);
            std::fs::write(out.join(format!("decisions{r}")), decisions.join("\n---\n")).unwrap();
            for (k, v) in after.into_iter().enumerate() {
                save(out, &format!("step{k}_{r}"), v);
            }
            let (_, absent) = guarded_run(pg, Bad::Absent, true);
            save(
                out,
                &format!("absent{r}"),
                absent.into_iter().last().unwrap(),
            );
            // Without the group, each rank decides alone.
            let (alone, _) = guarded_run(pg, Bad::NanLoss, false);
            std::fs::write(out.join(format!("alone{r}")), alone.join("\n---\n")).unwrap();
        }
        _ => return false,
    }
    true
}

#[test]
fn a_nan_loss_on_rank_1_skips_the_step_on_both_ranks_and_names_rank_1() {
    let dir = run_two("guard_nan", 60.0);
    let d = &dir.0;
    let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
    let (d0, d1) = (read("decisions0"), read("decisions1"));
    let steps0: Vec<&str> = d0.split("\n---\n").collect();
    let steps1: Vec<&str> = d1.split("\n---\n").collect();
    assert_eq!(steps0.len(), STEPS, "{d0}");
    for (k, (a, b)) in steps0.iter().zip(&steps1).enumerate() {
        let skipped = k == BAD;
        assert_eq!(a.starts_with(&format!("{k}: skip")), skipped, "rank 0: {a}");
        assert_eq!(b.starts_with(&format!("{k}: skip")), skipped, "rank 1: {b}");
    }
    // Rank 0's loss was finite: its error names rank 1 and what it saw there.
    let e0 = steps0[BAD];
    assert!(e0.contains("rank 1: loss NaN"), "{e0}");
    assert!(e0.contains("seen on rank 1"), "{e0}");
    // Rank 1 names the tensor itself.
    let e1 = steps1[BAD];
    assert!(
        e1.contains("non-finite loss") && e1.contains("seen on rank 1"),
        "{e1}"
    );
    assert!(e1.contains("loss") && e1.contains("NaN"), "{e1}");
    for k in 0..STEPS {
        assert_bitwise(
            &load(d, &format!("step{k}_0")),
            &load(d, &format!("step{k}_1")),
            &format!("the ranks' parameters after step {k}"),
        );
    }
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
    let alone0 = read("alone0");
    let alone1 = read("alone1");
    assert!(alone0.contains(&format!("{BAD}: proceed")), "{alone0}");
    assert!(alone1.contains(&format!("{BAD}: skip")), "{alone1}");
}
