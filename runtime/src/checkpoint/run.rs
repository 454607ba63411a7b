//! A whole run in one checkpoint: the model, the optimizer's state, every guarded function's
//! state and counters, the random generators and the caller's position; and the resume that
//! puts all of it back, or nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Once;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{TchError, Tensor};

use super::error::{CheckpointError, Rejected};
use super::load::{prepare, var_store_tensors};
use super::safetensors::{decode_safetensors_from, safetensors_writer};
use super::store::{Checkpoints, Contents};
use super::verify::Checkpoint;
use crate::error::{Check, Diagnosis, Origin};
use crate::registry::{registry, Site};
use crate::state::{GuardState, Import, SavedState, Unsaved};

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const GUARD: &str = "guard.safetensors";

/// An optimizer whose state (momentum, moments, step counters) a checkpoint keeps.
pub trait OptimizerState {
    /// The state as named tensors; `None` when the optimizer does not expose it. The live
    /// tensors, not copies: a save writes them out before it returns, and a `rollback = N`
    /// snapshot's copies of them are saved and restored by name only when they are.
    fn state_tensors(&self) -> Option<Vec<(String, Tensor)>>;
    /// Restores [`OptimizerState::state_tensors`]; on an error nothing changed.
    ///
    /// # Errors
    /// A state that is not this optimizer's (names, shapes, dtypes).
    fn load_state_tensors(&mut self, state: &[(String, Tensor)]) -> Result<(), TchError>;
}

impl OptimizerState for crate::optim::FusedOptimizer {
    fn state_tensors(&self) -> Option<Vec<(String, Tensor)>> {
        Some(self.state_views())
    }
    fn load_state_tensors(&mut self, state: &[(String, Tensor)]) -> Result<(), TchError> {
        self.load_state(state)
    }
}

/// tch's optimizer keeps its state inside libtorch, out of reach: a resumed run restarts it
/// from zero (said once).
impl OptimizerState for tch::nn::Optimizer {
    fn state_tensors(&self) -> Option<Vec<(String, Tensor)>> {
        None
    }
    fn load_state_tensors(&mut self, _: &[(String, Tensor)]) -> Result<(), TchError> {
        Ok(())
    }
}

/// What [`Checkpoints::resume_run`] restored.
#[derive(Debug)]
pub struct Resumed<P> {
    /// The step the checkpoint was saved at.
    pub step: u64,
    /// The position saved with it.
    pub position: P,
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Newer checkpoints passed over, and why.
    pub rejected: Vec<Rejected>,
}

/// A run's variables, and its optimizer's state when it has one to save.
pub(crate) struct Verified {
    model: Vec<(String, Tensor)>,
    optimizer: Option<Vec<(String, Tensor)>>,
}

/// The manifest's part written by a run.
#[derive(Serialize, Deserialize)]
struct RunMeta<P> {
    position: P,
    /// The optimizer's state is in the checkpoint.
    optimizer: bool,
    /// Every guarded function's state, by `module::name`.
    guard: Vec<SiteMeta>,
}

#[derive(Serialize, Deserialize)]
struct SiteMeta {
    function: String,
    counters: [u64; 7],
    state: SavedState,
}

fn site_id(site: &Site) -> String {
    format!("{}::{}", site.module_path(), site.name())
}

fn counters(site: &Site) -> [&AtomicU64; 7] {
    [
        &site.calls,
        &site.clipped,
        &site.skipped,
        &site.overflow_skips,
        &site.spikes,
        &site.rollbacks,
        &site.failures,
    ]
}

/// The tensors of the checkpoint's `.safetensors` file `name`, read once, one tensor at a time,
/// and checked against the manifest (a file changed since the checkpoint was verified is
/// refused, even one that decodes).
pub(crate) fn read_tensors(
    ckpt: &Checkpoint,
    name: &str,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let mut file = ckpt.open(name)?;
    let len = file.len();
    let decoded = decode_safetensors_from(&mut file, len);
    file.finish()?;
    decoded
}

fn not_saveable() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        crate::events::checkpoint_notice(
            "stepguard: the optimizer's state (momentum, moments) is not in the checkpoint: \
             tch's nn::Optimizer does not expose it, so a resumed run restarts it from zero; \
             stepguard::optim::FusedOptimizer's state is saved",
        );
    });
}

impl Checkpoints {
    /// Saves everything a run needs to continue exactly, as checkpoint `step`: the variables
    /// of `vs` (parameters and buffers), `optimizer`'s state, the state and counters of every
    /// guarded function (loss scale and growth tracker, spike statistics, skip and update
    /// counts), the random generators (CPU and CUDA) and `position` (the caller's: epoch,
    /// batch, anything serialisable).
    ///
    /// Only a verified run is saved: the checks not read yet are read first, and NaN/Inf in
    /// the parameters, buffers or optimizer state refuses the save with the
    /// [`GuardError`](crate::GuardError) that names them. Call it after an update.
    ///
    /// # Errors
    /// [`CheckpointError::Unverified`] for a failed check or non-finite state (nothing
    /// written); what writing the files raises.
    pub fn save_run(
        &self,
        step: u64,
        vs: &VarStore,
        optimizer: Option<&dyn OptimizerState>,
        position: &impl Serialize,
    ) -> Result<Checkpoint, CheckpointError> {
        let verified = self.verify_run(vs, optimizer)?;
        self.save_verified(step, vs, verified, position)
    }

    /// [`Checkpoints::save_run`] of what [`Checkpoints::verify_run`] returned.
    pub(crate) fn save_verified(
        &self,
        step: u64,
        vs: &VarStore,
        verified: Verified,
        position: &impl Serialize,
    ) -> Result<Checkpoint, CheckpointError> {
        let mut guard = Vec::new();
        let mut tensors = Vec::new();
        for site in registry() {
            let (state, saved) = site
                .state()
                .export_for(
                    &vs.variables_,
                    verified.optimizer.as_deref().unwrap_or_default(),
                )
                .map_err(|e| match e {
                    Unsaved::Unread(why) => CheckpointError::Unread(why),
                    Unsaved::Torch(e) => CheckpointError::Torch(e),
                })?;
            let function = site_id(site);
            tensors.extend(
                saved
                    .into_iter()
                    .map(|(n, t)| (format!("{function}/{n}"), t)),
            );
            guard.push(SiteMeta {
                counters: counters(site).map(|c| c.load(Relaxed)),
                function,
                state,
            });
        }
        for (device, t) in crate::shim::rng_states()? {
            tensors.push((format!("rng/{device}"), t));
        }
        let meta = RunMeta {
            position,
            optimizer: verified.optimizer.is_some(),
            guard,
        };
        let mut files: Vec<(String, Contents)> = vec![
            (MODEL.into(), safetensors_writer(verified.model)?),
            (GUARD.into(), safetensors_writer(tensors)?),
        ];
        if let Some(state) = verified.optimizer {
            files.push((OPTIMIZER.into(), safetensors_writer(state)?));
        }
        self.save(step, files, serde_json::to_value(&meta)?)
    }

    /// The run's variables and optimizer state, once the checks not read yet were read and
    /// neither holds NaN/Inf (see [`Checkpoints::save_run`]).
    pub(crate) fn verify_run(
        &self,
        vs: &VarStore,
        optimizer: Option<&dyn OptimizerState>,
    ) -> Result<Verified, CheckpointError> {
        crate::registry::flush()?;
        let model = var_store_tensors(vs);
        let opt = match optimizer.map(OptimizerState::state_tensors) {
            Some(Some(state)) => Some(state),
            Some(None) => {
                not_saveable();
                None
            }
            None => None,
        };
        refuse_non_finite(&model, opt.as_deref())?;
        Ok(Verified {
            model,
            optimizer: opt,
        })
    }

    /// Restores the newest checkpoint that verifies (see [`Checkpoints::latest`]) into `vs`,
    /// `optimizer`, the guarded functions' states and the random generators, and returns its
    /// position; `Ok(None)` when there is no checkpoint yet.
    ///
    /// Everything is checked first (names, shapes and dtypes of the variables and of the
    /// optimizer's state, the guarded functions, the generators): a checkpoint that does not
    /// fit changes nothing.
    ///
    /// # Errors
    /// [`CheckpointError::NoneValid`] when checkpoints exist and none verifies,
    /// [`CheckpointError::Mismatch`] / [`CheckpointError::Incompatible`] for one that does not
    /// fit this run.
    pub fn resume_run<P: DeserializeOwned>(
        &self,
        vs: &VarStore,
        optimizer: Option<&mut dyn OptimizerState>,
    ) -> Result<Option<Resumed<P>>, CheckpointError> {
        self.resume_run_up_to(u64::MAX, vs, optimizer, true)
    }

    /// [`Checkpoints::resume_run`] from the newest checkpoint of a step up to `limit`; the
    /// random generators too when `generators`.
    pub(crate) fn resume_run_up_to<P: DeserializeOwned>(
        &self,
        limit: u64,
        vs: &VarStore,
        mut optimizer: Option<&mut dyn OptimizerState>,
        generators: bool,
    ) -> Result<Option<Resumed<P>>, CheckpointError> {
        let Some(latest) = self.latest_up_to(limit)? else {
            return Ok(None);
        };
        let ckpt = latest.checkpoint;
        let meta: RunMeta<P> = serde_json::from_value(ckpt.meta().clone())?;
        let model = prepare(vs, read_tensors(&ckpt, MODEL)?)?;
        let guard = read_tensors(&ckpt, GUARD)?;
        let device = vs.device();
        let mut imports: Vec<(&'static Site, Import, [u64; 7])> = Vec::new();
        for saved in meta.guard {
            let Some(site) = registry().find(|s| site_id(s) == saved.function) else {
                return Err(CheckpointError::Incompatible(format!(
                    "no guarded function `{}` in this program",
                    saved.function
                )));
            };
            let prefix = format!("{}/", saved.function);
            let own: Vec<(String, Tensor)> = guard
                .iter()
                .filter_map(|(n, t)| {
                    Some((n.strip_prefix(&prefix)?.to_string(), t.shallow_clone()))
                })
                .collect();
            let loss_scale = site.effective_config().loss_scale;
            let import = GuardState::prepare_import(
                &vs.variables_,
                device,
                loss_scale,
                saved.state,
                &own,
            )
            .map_err(|e| CheckpointError::Incompatible(format!("{}: {e}", saved.function)))?;
            imports.push((site, import, saved.counters));
        }
        let rng: Vec<(String, Tensor)> = guard
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix("rng/")?.to_string(), t.shallow_clone())))
            .collect();
        crate::shim::check_rng_states(&rng)
            .map_err(|e| CheckpointError::Incompatible(e.message().to_string()))?;
        match (optimizer.as_deref_mut(), meta.optimizer) {
            (Some(opt), true) => {
                let state = read_tensors(&ckpt, OPTIMIZER)?;
                opt.load_state_tensors(&state)
                    .map_err(|e| CheckpointError::Incompatible(format!("optimizer state: {e}")))?;
            }
            (Some(opt), false) => {
                if opt.state_tensors().is_none() {
                    not_saveable();
                }
            }
            (None, _) => {}
        }
        model.apply()?;
        let live_state = optimizer
            .as_deref()
            .and_then(OptimizerState::state_tensors)
            .unwrap_or_default();
        for (site, import, saved) in imports {
            import.apply(site.state(), &live_state);
            for (c, v) in counters(site).iter().zip(saved) {
                c.store(v, Relaxed);
            }
        }
        if generators {
            crate::shim::set_rng_states(&rng)?;
        }
        Ok(Some(Resumed {
            step: ckpt.step(),
            position: meta.position,
            path: ckpt.path().to_path_buf(),
            rejected: latest.rejected,
        }))
    }
}

/// NaN/Inf in the variables or the optimizer's state refuses the save, naming them.
fn refuse_non_finite(
    model: &[(String, Tensor)],
    optimizer: Option<&[(String, Tensor)]>,
) -> Result<(), CheckpointError> {
    let mut reports = Vec::new();
    for (name, t) in model.iter().chain(optimizer.unwrap_or_default()) {
        if t.is_floating_point() {
            if let Some(r) = crate::report::report_tensor(name, t) {
                reports.push(r);
            }
        }
    }
    if reports.is_empty() {
        return Ok(());
    }
    let origin = Origin {
        function: "checkpoint",
        location: None,
        call: 0,
    };
    let e = origin.error(Check::Params, reports, Diagnosis::CorruptedBefore, 0);
    Err(CheckpointError::Unverified(Box::new(e)))
}
