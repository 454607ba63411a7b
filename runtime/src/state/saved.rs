//! A guard state's part of a checkpoint: for the parameters of one `VarStore`, the counts of
//! their updates and skips, their spike statistics and `rollback = N`'s snapshot; the loss
//! scaler; the calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::nn::Variables;
use tch::{Device, TchError, Tensor};

use super::{GuardState, Key};
use crate::amp::{LossScale, Scaler};
use crate::rollback::Snapshot;
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
    /// `rollback = N`'s snapshot, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<SavedSnapshot>,
}

/// A rollback snapshot in a checkpoint: its tensors are `rollback/{i}`, the `i`-th saved copy
/// of `parts[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedSnapshot {
    /// The update it was taken before, and the call.
    pub update: u64,
    pub call: u64,
    pub parts: Vec<SnapshotPart>,
}

/// What a tensor of a rollback snapshot is a copy of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SnapshotPart {
    /// A variable of the `VarStore` (a parameter or a buffer), by name.
    Variable(String),
    /// A state tensor of the optimizer, by its name in the optimizer's saved state.
    Optimizer(String),
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
const ROLLBACK: &str = "rollback";

impl GuardState {
    /// The state of the parameters of `vars` and the scaler, as numbers and named CPU
    /// tensors; `optimizer` is the named live state of the optimizer saved with them, which a
    /// rollback snapshot may hold copies of. Refused while a check of
    /// an update or a loss of a call without an update is not read yet ([`GuardState::flush`]
    /// reads the checks).
    pub(crate) fn export_for(
        &self,
        vars: &Arc<Mutex<Variables>>,
        optimizer: &[(String, Tensor)],
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
                rollback: None,
            });
            if let Some(snap) = &m.snapshot {
                if let Some(parts) = snapshot_parts(snap, vars, optimizer) {
                    for (i, (_, copy)) in snap.pairs().iter().enumerate() {
                        tensors.push((format!("{ROLLBACK}/{i}"), copy.f_to_device(Device::Cpu)?));
                    }
                    if let Some(model) = &mut saved.model {
                        model.rollback = Some(SavedSnapshot {
                            update: snap.update,
                            call: snap.call,
                            parts,
                        });
                    }
                }
            }
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
        let rollback = match saved.model.as_ref().and_then(|m| m.rollback.as_ref()) {
            Some(snap) => Some(prepare_snapshot(snap, vars, device, &get)?),
            None => None,
        };
        Ok(Import {
            vars: vars.clone(),
            key: Key::of_vars(vars),
            saved,
            spike,
            scaler,
            rollback,
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
    rollback: Option<PreparedSnapshot>,
}

/// A saved rollback snapshot checked against the `VarStore`: each copy on its tensor's device,
/// with the variable it restores (the optimizer's state tensors are found when the state is
/// loaded).
struct PreparedSnapshot {
    update: u64,
    call: u64,
    parts: Vec<(Live, Tensor)>,
}

enum Live {
    Variable(Tensor),
    Optimizer(String),
}

impl Import {
    /// Writes it into `state` (one lock); `optimizer` is the named live state of the optimizer
    /// resumed with it (once loaded), which a rollback snapshot may restore.
    pub(crate) fn apply(self, state: &GuardState, optimizer: &[(String, Tensor)]) {
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
            m.snapshot = self.rollback.and_then(|r| r.pair_with(optimizer));
        }
    }
}

/// What each tensor of `snap` is a copy of: a variable of `vars` or a tensor of `optimizer`;
/// `None` when one is neither (the optimizer saved is not the one the snapshot was taken of).
fn snapshot_parts(
    snap: &Snapshot,
    vars: &Arc<Mutex<Variables>>,
    optimizer: &[(String, Tensor)],
) -> Option<Vec<SnapshotPart>> {
    let v = vars.lock().unwrap_or_else(|e| e.into_inner());
    let key = |t: &Tensor| (t.data_ptr() as usize, t.size());
    let mut by_storage: HashMap<_, SnapshotPart> = HashMap::new();
    // Of two tied variables, the first name.
    for (name, t) in optimizer {
        by_storage.insert(key(t), SnapshotPart::Optimizer(name.clone()));
    }
    let mut names: Vec<(&String, &Tensor)> = v.named_variables.iter().collect();
    names.sort_by(|a, b| b.0.cmp(a.0));
    for (name, t) in names {
        by_storage.insert(key(t), SnapshotPart::Variable(name.clone()));
    }
    snap.pairs()
        .iter()
        .map(|(live, _)| by_storage.get(&key(live)).cloned())
        .collect()
}

/// Checks a saved snapshot against `vars` (every variable it restores exists, with the copy's
/// shape and dtype) and moves its copies to their devices.
fn prepare_snapshot<'a>(
    snap: &SavedSnapshot,
    vars: &Arc<Mutex<Variables>>,
    device: Device,
    get: &impl Fn(&str) -> Option<&'a Tensor>,
) -> Result<PreparedSnapshot, TchError> {
    let v = vars.lock().unwrap_or_else(|e| e.into_inner());
    let mut parts = Vec::with_capacity(snap.parts.len());
    for (i, part) in snap.parts.iter().enumerate() {
        let copy = get(&format!("{ROLLBACK}/{i}"))
            .ok_or_else(|| TchError::Kind("the rollback snapshot is saved incompletely".into()))?;
        let live = match part {
            SnapshotPart::Variable(name) => {
                let var = v.named_variables.get(name).ok_or_else(|| {
                    TchError::Kind(format!(
                        "the rollback snapshot restores `{name}`, which this VarStore lacks"
                    ))
                })?;
                if var.size() != copy.size() || var.kind() != copy.kind() {
                    return Err(TchError::Kind(format!(
                        "the rollback snapshot's `{name}` is {:?} {:?}, the variable {:?} {:?}",
                        copy.kind(),
                        copy.size(),
                        var.kind(),
                        var.size()
                    )));
                }
                Live::Variable(var.shallow_clone())
            }
            SnapshotPart::Optimizer(name) => Live::Optimizer(name.clone()),
        };
        let on = match &live {
            Live::Variable(var) => var.device(),
            Live::Optimizer(_) => device,
        };
        parts.push((live, copy.f_to_device(on)?));
    }
    Ok(PreparedSnapshot {
        update: snap.update,
        call: snap.call,
        parts,
    })
}

impl PreparedSnapshot {
    /// The snapshot, its optimizer tensors found in `optimizer`; `None` (no snapshot: the next
    /// is taken `N` updates on) when the resumed optimizer lacks one, said on stderr.
    fn pair_with(self, optimizer: &[(String, Tensor)]) -> Option<Snapshot> {
        let mut optimizer_tensors = 0;
        let mut pairs = Vec::with_capacity(self.parts.len());
        for (live, copy) in self.parts {
            let live = match live {
                Live::Variable(var) => var,
                Live::Optimizer(name) => {
                    optimizer_tensors += 1;
                    match optimizer.iter().find(|(n, _)| *n == name) {
                        Some((_, t)) if t.size() == copy.size() && t.kind() == copy.kind() => {
                            t.shallow_clone()
                        }
                        _ => {
                            crate::events::checkpoint_notice(
                                "stepguard: the checkpoint's rollback snapshot holds optimizer \
                                 state the resumed optimizer does not have: it is not restored \
                                 (the next snapshot is taken `rollback` updates on)",
                            );
                            return None;
                        }
                    }
                }
            };
            let copy = if copy.device() == live.device() {
                copy
            } else {
                copy.f_to_device(live.device()).ok()?
            };
            pairs.push((live, copy));
        }
        Some(Snapshot::resumed(
            pairs,
            self.update,
            self.call,
            optimizer_tensors,
        ))
    }
}
