//! Data-parallel training of a small MLP on PyTorch's c10d (`stepguard::dist`): every rank
//! starts from rank 0's parameters, trains on its own shard of each batch, and averages the
//! gradients (one all-reduce per bucket) before each optimizer step, so the replicas stay
//! bitwise identical. The step is guarded with `group = pg`: a NaN planted in the last rank's
//! shard at step 250 makes every rank skip that update, and the replicas stay identical.
//!
//! Two processes on this machine (Gloo on the CPU): `scripts/ddp.sh`, which builds the example
//! in release and runs
//!
//! ```text
//! torchrun --nproc-per-node 2 --no-python target/release/examples/ddp
//! ```
//!
//! (the binary under `$CARGO_TARGET_DIR` when that is set; `torchrun` comes with PyTorch:
//! `source scripts/env.sh` puts the venv's on the PATH.) As one process, without torchrun:
//! `cargo run --release --example ddp`. `STEPGUARD_DIST_TIMEOUT` bounds every wait for the other
//! ranks, in seconds.

use std::time::Instant;

use stepguard::dist::{DataParallel, DistError, ProcessGroup};
use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 256; // the global batch, split over the ranks

fn net(vs: &nn::Path) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs / "l1", 8, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs / "l2", 64, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs / "l3", 64, 1, Default::default()))
}

/// Batch `step` of a synthetic regression (the same on every rank), and this rank's shard.
fn shard(step: usize, pg: &ProcessGroup) -> (Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    let i = Tensor::arange(BATCH * 8, opts).view([BATCH, 8]);
    let x = ((i + (step as i64 * BATCH * 8)) * 0.618).sin();
    let y = x
        .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        .sin();
    let per = BATCH / pg.world_size() as i64;
    let at = per * pg.rank() as i64;
    (x.narrow(0, at, per), y.narrow(0, at, per))
}

/// The step at which the last rank's shard holds a NaN.
const FAULT: usize = 250;

/// One data-parallel step, guarded: every rank takes the same decision (`group = pg`), so a
/// batch that is bad on one rank is skipped on all of them.
#[guarded_step(max_norm = 1, on_nan = "skip", group = pg)]
#[allow(clippy::too_many_arguments)]
fn train_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    model: &nn::Sequential,
    ddp: &DataParallel,
    pg: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
) -> Result<Tensor, DistError> {
    let loss = model.forward(x).mse_loss(y, tch::Reduction::Mean);
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients()?;
    opt.step();
    Ok(loss)
}

/// Trains `steps` steps; returns the (global) loss of the first and the last.
fn run(pg: &ProcessGroup, steps: usize, fault: usize) -> Result<(f64, f64), DistError> {
    tch::manual_seed(pg.rank() as i64); // different on each rank: the broadcast fixes that
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs.root());
    let ddp = DataParallel::new(pg, &vs)?;
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let start = Instant::now();
    for step in 0..steps {
        let (mut x, y) = shard(step, pg);
        if step == fault && pg.rank() + 1 == pg.world_size() {
            x = x.fill(f64::NAN);
        }
        let loss = train_step(&mut opt, &vs, &model, &ddp, pg, &x, &y)?;
        // The loss of the global batch: the mean of the ranks' (equal-sized) shards.
        let global = loss.detach();
        pg.all_reduce(&global, stepguard::dist::ReduceOp::Sum)?;
        let global = global.double_value(&[]) / pg.world_size() as f64;
        if !global.is_finite() {
            if pg.is_main() {
                println!("step {step:4}  loss {global} on some rank: update skipped on every rank");
            }
            continue;
        }
        if step == 0 {
            first = global;
        }
        last = global;
        if pg.is_main() && (step % 100 == 0 || step + 1 == steps) {
            println!("step {step:4}  loss {global:.5}");
        }
    }
    if pg.is_main() {
        let per = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!(
            "{} rank(s), {} gradient bucket(s): {per:.2} ms per step",
            pg.world_size(),
            ddp.bucket_count()
        );
    }
    Ok((first, last))
}

fn main() -> Result<(), DistError> {
    tch::set_num_threads(1);
    let pg = ProcessGroup::from_env()?;
    if pg.is_main() {
        let nccl = if ProcessGroup::has_nccl() {
            "built in"
        } else {
            "not built"
        };
        println!(
            "{} process(es), Gloo on the CPU (NCCL {nccl})",
            pg.world_size()
        );
    }
    let (first, last) = run(&pg, 500, FAULT)?;
    if pg.is_main() {
        println!("loss {first:.4} -> {last:.4}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn learns_as_one_process_and_skips_the_planted_nan() {
        let pg = stepguard::dist::ProcessGroup::single();
        let (first, last) = super::run(&pg, 60, 30).unwrap();
        assert!(last < first * 0.8, "{first} -> {last}");
        let skipped: u64 = stepguard::report_data()
            .iter()
            .filter(|s| s.function == "train_step")
            .map(|s| s.stats.skipped)
            .sum();
        assert_eq!(skipped, 1);
    }
}
