//! A guard state's part of a checkpoint: for the parameters of one `VarStore`, the counts of
//! their updates and skips and their spike statistics; the loss scaler; the calls.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::nn::Variables;
use tch::{Device, TchError, Tensor};

use super::{GuardState, Key};
use crate::amp::{LossScale, Scaler};
use crate::spike::SpikeStats;

/// The numbers of a [`GuardState`] in a checkpoint's manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedState {
    pub calls: u64,
    /// The state of the saved `VarStore`'s parameters (none before their first update).
    pub model: Option<SavedModel>,
    /// Loss-scaling overflows counted (with a scaler).
    pub overflows: Option<u64>,
}

/// The numbers of one set of parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedModel {
    pub updates: u64,
    pub consecutive_skips: u32,
    pub last_skip_call: Option<u64>,
    pub rolled_back: bool,
}

/// Why a state cannot be saved now.
#[derive(Debug)]
pub(crate) enum Unsaved {
    /// Something observed is not read yet: the run is not at a verified point.
    Unread(&'static str),
    Torch(TchError),
}

impl From<TchError> for Unsaved {
    fn from(e: TchError) -> Self {
        Unsaved::Torch(e)
    }
}

/// The spike statistics' tensor, and the scaler's.
const SPIKE: &str = "spike";
const SCALE: &str = "scale";
const GROWTH: &str = "growth_tracker";

impl GuardState {
    /// The state of the parameters of `vars` and the scaler, as numbers and named CPU
    /// tensors. Refused while a check of an update or a loss of a call without an update is
    /// not read yet ([`GuardState::flush`] reads the checks).
    pub(crate) fn export_for(
        &self,
        vars: &Arc<Mutex<Variables>>,
    ) -> Result<(SavedState, Vec<(String, Tensor)>), Unsaved> {
        let models = self.lock();
        let mut tensors = Vec::new();
        let mut saved = SavedState {
            calls: models.calls,
            ..SavedState::default()
        };
        for m in &models.list {
            if m.pending.is_some() || m.deferred.is_some() {
                return Err(Unsaved::Unread("a parameters check is not read yet"));
            }
            if !m.carried.losses.is_empty() {
                return Err(Unsaved::Unread(
                    "a loss of a call without an update is not read yet (save after an update)",
                ));
            }
        }
        let own = |m: &&super::ModelState| {
            m.alive
                .as_ref()
                .and_then(std::sync::Weak::upgrade)
                .is_some_and(|v| Arc::ptr_eq(&v, vars))
        };
        if let Some(m) = models.list.iter().find(own) {
            saved.model = Some(SavedModel {
                updates: m.updates,
                consecutive_skips: m.consecutive_skips,
                last_skip_call: m.last_skip_call,
                rolled_back: m.rolled_back,
            });
            if let Some(s) = &m.spike {
                tensors.push((SPIKE.to_string(), s.values().f_to_device(Device::Cpu)?));
            }
        }
        if let Some(s) = &models.scaler {
            let (scale, growth, overflows) = s.saved()?;
            tensors.push((SCALE.to_string(), scale));
            tensors.push((GROWTH.to_string(), growth));
            saved.overflows = Some(overflows);
        }
        Ok((saved, tensors))
    }

    /// Checks what [`GuardState::export_for`] saved and makes it ready for the parameters of
    /// `vars` (on `device`) and the function's `loss_scale`; [`Import::apply`] changes the
    /// state.
    pub(crate) fn prepare_import(
        vars: &Arc<Mutex<Variables>>,
        device: Device,
        loss_scale: Option<LossScale>,
        saved: SavedState,
        tensors: &[(String, Tensor)],
    ) -> Result<Import, TchError> {
        let get = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, t)| t);
        let spike = get(SPIKE)
            .map(|t| SpikeStats::resumed(t, device))
            .transpose()?;
        let scaler = match (get(SCALE), get(GROWTH), loss_scale) {
            (Some(s), Some(g), Some(params)) => Some(Scaler::resumed(
                params,
                device,
                s,
                g,
                saved.overflows.unwrap_or(0),
            )?),
            (None, None, _) => None,
            (Some(_), Some(_), None) => {
                return Err(TchError::Kind(
                    "the checkpoint has a loss scale, the function has no `loss_scale`".into(),
                ))
            }
            _ => {
                return Err(TchError::Kind(
                    "the loss scale is saved incompletely".into(),
                ))
            }
        };
        Ok(Import {
            vars: vars.clone(),
            key: Key::of_vars(vars),
            saved,
            spike,
            scaler,
        })
    }
}

/// A guard state's part of a checkpoint, checked and ready ([`GuardState::prepare_import`]).
pub(crate) struct Import {
    vars: Arc<Mutex<Variables>>,
    key: Key,
    saved: SavedState,
    spike: Option<SpikeStats>,
    scaler: Option<Scaler>,
}

impl Import {
    /// Writes it into `state` (one lock).
    pub(crate) fn apply(self, state: &GuardState) {
        let mut models = state.lock();
        models.calls = self.saved.calls;
        if let Some(s) = self.scaler {
            models.scaler = Some(s);
        }
        if let Some(saved) = &self.saved.model {
            let m = models.model(self.key, Some(&self.vars));
            m.updates = saved.updates;
            m.consecutive_skips = saved.consecutive_skips;
            m.last_skip_call = saved.last_skip_call;
            m.rolled_back = saved.rolled_back;
            m.spike = self.spike;
        }
    }
}
