//! A data-parallel run's resume: every rank from the same step.

use serde::de::DeserializeOwned;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::error::CheckpointError;
use super::run::{OptimizerState, Resumed};
use super::store::Checkpoints;
use crate::dist::{ProcessGroup, ReduceOp};

/// What a rank has to resume from, as the ranks compare it: a step, none yet, or checkpoints of
/// which none verifies.
const NONE: i64 = -1;
const BROKEN: i64 = -2;

impl Checkpoints {
    /// [`Checkpoints::resume_run`] for one rank of `pg`, each rank with a folder of its own
    /// (its generators and position are its own): every rank resumes from the same step, the
    /// newest one every rank has verified, or every rank starts afresh. For a group that
    /// torchrun restarted (`--max-restarts`), after a rank was killed, perhaps during a save.
    /// Collective: every rank calls it.
    ///
    /// # Errors
    /// As [`Checkpoints::resume_run`]; on every rank when one rank has checkpoints of which
    /// none verifies, or when the ranks could not resume from one step.
    pub fn resume_run_ranks<P: DeserializeOwned>(
        &self,
        pg: &ProcessGroup,
        vs: &VarStore,
        optimizer: Option<&mut dyn OptimizerState>,
    ) -> Result<Option<Resumed<P>>, CheckpointError> {
        let mine = match self.latest() {
            Ok(Some(l)) => i64::try_from(l.checkpoint.step()).unwrap_or(i64::MAX),
            Ok(None) => NONE,
            Err(_) => BROKEN,
        };
        let agreed = reduce(pg, mine, ReduceOp::Min)?;
        if agreed == BROKEN {
            return Err(match self.latest() {
                Err(e) => e,
                _ => CheckpointError::Incompatible(
                    "another rank has checkpoints of which none verifies".into(),
                ),
            });
        }
        let resumed = match u64::try_from(agreed) {
            Ok(step) => self.resume_run_up_to::<P>(step, vs, optimizer),
            Err(_) => Ok(None),
        };
        // Every rank from the same step, or none: the group trains on only if so.
        let got = match &resumed {
            Ok(Some(r)) => i64::try_from(r.step).unwrap_or(i64::MAX),
            Ok(None) => NONE,
            Err(_) => BROKEN,
        };
        let (low, high) = (
            reduce(pg, got, ReduceOp::Min)?,
            reduce(pg, got, ReduceOp::Max)?,
        );
        let resumed = resumed?;
        if low != high {
            return Err(CheckpointError::Incompatible(format!(
                "the ranks resumed from different steps ({low} to {high}): step {agreed} is \
                 not in every rank's folder (keep more checkpoints, save every rank at the same \
                 steps)"
            )));
        }
        Ok(resumed)
    }
}

fn reduce(pg: &ProcessGroup, v: i64, op: ReduceOp) -> Result<i64, CheckpointError> {
    let t = Tensor::from_slice(&[v]).to_kind(Kind::Int64);
    let t = t.f_to_device(pg.device())?;
    pg.all_reduce(&t, op)
        .map_err(|e| CheckpointError::Incompatible(format!("agreeing on a step: {e}")))?;
    Ok(t.f_to_device(Device::Cpu)?.f_int64_value(&[0])?)
}
