//! A data-parallel run's checkpoints: the replicated state (model, optimizer, guard) written
//! once, by rank 0, after every rank verified its own; each rank's generators and position in
//! a folder of its own; every rank resumes from the same step.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::error::CheckpointError;
use super::run::{read_tensors, OptimizerState, Resumed};
use super::safetensors::encode_safetensors;
use super::store::Checkpoints;
use super::verify::Checkpoint;
use crate::dist::{ProcessGroup, ReduceOp};

/// What a rank has to resume from, as the ranks compare it: a step, none yet, or checkpoints
/// of which none verifies.
const NONE: i64 = -1;
const BROKEN: i64 = -2;
const GENERATORS: &str = "generators.safetensors";

impl Checkpoints {
    fn replicated(&self) -> Checkpoints {
        self.under("replicated")
    }

    fn of_rank(&self, rank: usize) -> Checkpoints {
        self.under(&format!("rank{rank}"))
    }

    /// [`Checkpoints::save_run`] for one rank of `pg` (a collective: every rank calls it after
    /// the same update). Every rank reads its pending checks and refuses NaN/Inf in its own
    /// state; then, only if every rank's passed, rank 0 writes the replicated state (the
    /// model, the optimizer's state, the guarded functions' states) under `replicated/`, and
    /// each rank its random generators and `position` under `rank{r}/`. The folder must be the
    /// same one for every rank (one machine, or a shared file system).
    ///
    /// # Errors
    /// As [`Checkpoints::save_run`], on every rank when one rank's state is refused or one
    /// rank's write failed.
    pub fn save_run_ranks(
        &self,
        pg: &ProcessGroup,
        step: u64,
        vs: &VarStore,
        optimizer: Option<&dyn OptimizerState>,
        position: &impl Serialize,
    ) -> Result<Checkpoint, CheckpointError> {
        let verified = self.verify_run(vs, optimizer);
        agree(pg, verified.is_ok(), "refused its state")?;
        let verified = verified?;
        let written = (|| {
            if pg.is_main() {
                self.replicated().save_verified(step, vs, verified, &())?;
            }
            let rng = crate::shim::rng_states()?;
            self.of_rank(pg.rank()).save(
                step,
                vec![(GENERATORS.into(), encode_safetensors(&rng)?.into())],
                serde_json::to_value(position)?,
            )
        })();
        agree(pg, written.is_ok(), "could not write its part")?;
        written
    }

    /// [`Checkpoints::resume_run`] for one rank of `pg` (a collective): every rank resumes
    /// from the same step, the newest one whose replicated state and every rank's own part
    /// verify, or every rank starts afresh. For a group that torchrun restarted
    /// (`--max-restarts`) after a rank was killed, perhaps during a save.
    ///
    /// # Errors
    /// As [`Checkpoints::resume_run`]; on every rank when one rank has checkpoints of which
    /// none verifies, or the ranks could not resume from one step.
    pub fn resume_run_ranks<P: DeserializeOwned>(
        &self,
        pg: &ProcessGroup,
        vs: &VarStore,
        optimizer: Option<&mut dyn OptimizerState>,
    ) -> Result<Option<Resumed<P>>, CheckpointError> {
        let own = self.of_rank(pg.rank());
        let mine = match self.newest_complete(&own) {
            Ok(Some(step)) => i64::try_from(step).unwrap_or(i64::MAX),
            Ok(None) => NONE,
            Err(_) => BROKEN,
        };
        let agreed = reduce(pg, mine, ReduceOp::Min)?;
        if agreed == BROKEN {
            return Err(match self.newest_complete(&own) {
                Err(e) => e,
                _ => CheckpointError::Incompatible(
                    "another rank has checkpoints of which none verifies".into(),
                ),
            });
        }
        let resumed = match u64::try_from(agreed) {
            Ok(step) => self.resume_rank_at::<P>(&own, step, vs, optimizer),
            Err(_) => Ok(None),
        };
        agree(pg, resumed.is_ok(), "could not resume")?;
        resumed
    }

    /// The newest step whose replicated state and this rank's part (`own`) both verify.
    fn newest_complete(&self, own: &Checkpoints) -> Result<Option<u64>, CheckpointError> {
        let mut limit = u64::MAX;
        loop {
            let Some(mine) = own.latest_up_to(limit)? else {
                return Ok(None);
            };
            let step = mine.checkpoint.step();
            let Some(shared) = self.replicated().latest_up_to(step)? else {
                return Ok(None);
            };
            if shared.checkpoint.step() == step {
                return Ok(Some(step));
            }
            limit = shared.checkpoint.step();
        }
    }

    /// Step `step`: the replicated state, then this rank's generators and position.
    fn resume_rank_at<P: DeserializeOwned>(
        &self,
        own: &Checkpoints,
        step: u64,
        vs: &VarStore,
        optimizer: Option<&mut dyn OptimizerState>,
    ) -> Result<Option<Resumed<P>>, CheckpointError> {
        let mine = own
            .latest_up_to(step)?
            .filter(|l| l.checkpoint.step() == step)
            .ok_or_else(|| CheckpointError::Incompatible(format!("no step {step} of this rank")))?;
        let position: P = serde_json::from_value(mine.checkpoint.meta().clone())?;
        let rng = read_tensors(&mine.checkpoint, GENERATORS)?;
        crate::shim::check_rng_states(&rng)
            .map_err(|e| CheckpointError::Incompatible(e.message().to_string()))?;
        let shared = self
            .replicated()
            .resume_run_up_to::<()>(step, vs, optimizer, false)?
            .filter(|r| r.step == step)
            .ok_or_else(|| CheckpointError::Incompatible(format!("no replicated step {step}")))?;
        crate::shim::set_rng_states(&rng)?;
        let mut rejected = shared.rejected;
        rejected.extend(mine.rejected);
        Ok(Some(Resumed {
            step,
            position,
            path: mine.checkpoint.path().to_path_buf(),
            rejected,
        }))
    }
}

/// Whether every rank's `ok` holds; an error naming what failed on some rank otherwise.
fn agree(pg: &ProcessGroup, ok: bool, what: &str) -> Result<(), CheckpointError> {
    if reduce(pg, i64::from(ok), ReduceOp::Min)? == 1 {
        Ok(())
    } else if ok {
        Err(CheckpointError::Incompatible(format!(
            "another rank {what}"
        )))
    } else {
        Ok(()) // this rank's own error follows
    }
}

fn reduce(pg: &ProcessGroup, v: i64, op: ReduceOp) -> Result<i64, CheckpointError> {
    let t = Tensor::from_slice(&[v]).to_kind(Kind::Int64);
    let t = t.f_to_device(pg.device())?;
    pg.all_reduce(&t, op)
        .map_err(|e| CheckpointError::Incompatible(format!("agreeing across the ranks: {e}")))?;
    Ok(t.f_to_device(Device::Cpu)?.f_int64_value(&[0])?)
}
