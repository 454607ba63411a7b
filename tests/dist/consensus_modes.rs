//! The ranks' consensus under the attribute's other modes: `sync = "deferred"` (the verdict
//! goes to a fused optimizer's kernel and is read at the next update) and a loss checked with
//! no update in the function (gradient accumulation: read at once).

use std::path::Path;

use stepguard::dist::{DataParallel, ProcessGroup};
use stepguard::optim::FusedOptimizer;
use stepguard::{guarded_step, GuardError};
use tch::nn::{self, Module};
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
            deferred_together(&mut opt, &vs, &net, &ddp, pg, &x, &y, nan);
        } else {
            deferred_alone(&mut opt, &vs, &net, &ddp, pg, &x, &y, nan);
        }
    }
    stepguard::flush().unwrap();
    vars(&vs)
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
