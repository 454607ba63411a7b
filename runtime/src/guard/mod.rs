//! One guarded training step: clip, fold every check into flags, read them once
//! (`deferred`: or hand them to a fused optimizer and read them at the next update).

mod commit;
mod consensus;
mod deferred;
mod explain;
mod judge;
mod loss_now;
mod measure;
mod offer;
mod policy;
mod results;
mod scaling;
mod slot;
mod update;

pub use policy::{Decision, SkipReason, Skipped};

use std::sync::{Arc, Mutex};

use tch::nn::Variables;
use tch::Tensor;

use crate::config::{Config, OnNan};
use crate::error::{Check, Diagnosis, GuardError, Origin, TorchError};
use crate::report::TensorReport;
use crate::rollback::Buffers;
use crate::sources::NameSource;
use crate::state::{Binding, GuardState, Key, LossRecord, ModelState, Observed};

/// What a fused optimizer's kernel gets under `sync = "deferred"`: `found_inf` (0-dim f32, 1
/// when a check failed) and `grad_scale` (1 / the clipping coefficient, when clipping).
pub(crate) type DeviceVerdict = (Tensor, Option<Tensor>);

/// The update between [`StepGuard::before_update`] and [`StepGuard::after_update`] (or the
/// policy's skip or failure): its parameters' state, taken out of the [`GuardState`] under one
/// lock and given back with everything the update changed under one more
/// ([`StepGuard::commit`]), so that what one update changes changes at once.
#[derive(Debug)]
struct Update {
    key: Key,
    index: u64,
    vars: Vec<Arc<Mutex<Variables>>>,
    /// The parameters' state, this update's copy.
    model: ModelState,
    /// Loss scaling: the scaler's numbers, the parameters whose grads this update unscaled
    /// (noted as unscaled when the update ends), the scale read and whether it overflowed.
    scaler: Option<crate::amp::LossScale>,
    unscaled: Vec<Tensor>,
    scale_read: Option<(f64, bool)>,
}

/// One guarded step. Create it at the start of the step, feed it the loss, call
/// [`StepGuard::before_update`] just before the optimizer step (clipping, one host read) and
/// [`StepGuard::after_update`] right after it.
///
/// The state it reads and leaves (the previous update's parameters check, consecutive skips)
/// lives in a [`GuardState`], per set of parameters.
pub struct StepGuard<'a> {
    config: &'a Config,
    /// The function, its location and this call's index (what every error names).
    origin: Origin,
    state: &'a GuardState,
    /// What the step knows of its parameters before any update.
    known: Known<'a>,
    /// Whether the step body has protected operations (`None`: none to protect).
    protected: Option<bool>,
    obs: Observed,
    update: Option<Update>,
    /// What the last update's read brought back.
    last: LastRead,
    /// Loss scaling's part of this call.
    scaling: crate::amp::CallScaling,
    /// With a process group of more than one rank: the ranks' agreement.
    ranks: Option<consensus::Agreement<'a>>,
}

/// What a step knows of its parameters before any update: their names, the `VarStore` at
/// entry, and the buffers a skipped update restores.
#[derive(Default)]
struct Known<'a> {
    names: Option<&'a dyn NameSource>,
    /// The parameters known at entry (a `VarStore` argument): where unread losses are carried.
    entry: Option<(Key, Arc<Mutex<Variables>>)>,
    /// The buffers of the known `VarStore`s at the start of the call, restored when an update
    /// is skipped (saved only when one can be).
    buffers: SavedBuffers,
    /// Why they could not be saved (libtorch refused a copy).
    unsaved: Option<TorchError>,
}

/// The buffers of each known `VarStore` (by its key) at the start of the call; empty when not
/// saved. The first store's are held inline: a step with one `VarStore` and no buffers (the
/// common case) saves them with no allocation.
#[derive(Default)]
struct SavedBuffers {
    first: Option<(Key, Buffers)>,
    rest: Vec<(Key, Buffers)>,
}

impl SavedBuffers {
    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn push(&mut self, store: (Key, Buffers)) {
        if self.first.is_none() {
            self.first = Some(store);
        } else {
            self.rest.push(store);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(Key, Buffers)> {
        self.first.iter().chain(&self.rest)
    }
}

/// What the last update's read brought back.
#[derive(Debug, Default, Clone, Copy)]
struct LastRead {
    /// The total grad norm.
    norm: Option<f64>,
    /// The adaptive clipping threshold.
    threshold: Option<f64>,
    /// `sync = "deferred"`: the update read an earlier update's verdict.
    previous: bool,
}

impl Update {
    /// The update of `model` (its index: the updates counted so far, this one counted).
    fn new(key: Key, mut model: ModelState, vars: Vec<Arc<Mutex<Variables>>>) -> Self {
        let index = model.updates;
        model.updates += 1;
        Update {
            key,
            index,
            vars,
            model,
            scaler: None,
            unscaled: Vec::new(),
            scale_read: None,
        }
    }
}

impl std::fmt::Debug for StepGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGuard")
            .field("function", &self.origin.function)
            .field("call", &self.origin.call)
            .field("last_norm", &self.last.norm)
            .finish_non_exhaustive()
    }
}

impl<'a> StepGuard<'a> {
    /// Starts a step whose state (the previous update's check, skips) is kept in `state`.
    pub fn begin(config: &'a Config, function: &'static str, state: &'a GuardState) -> Self {
        let call = {
            let mut m = state.lock();
            m.calls += 1;
            m.calls - 1
        };
        StepGuard {
            config,
            origin: Origin {
                function,
                location: None,
                call,
            },
            state,
            known: Known::default(),
            protected: Some(config.protect_div && config.protect_log),
            obs: Observed::default(),
            update: None,
            last: LastRead::default(),
            scaling: crate::amp::CallScaling::default(),
            ranks: None,
        }
    }

    /// Names parameters in error messages. A `VarStore` also tells which model the step
    /// trains before its first update (where losses of micro-batches are kept), and whose
    /// buffers (BatchNorm statistics) a skipped update restores.
    pub fn with_names(mut self, names: &'a dyn NameSource) -> Self {
        self.known.names = Some(names);
        let vars = names.var_stores();
        self.save_buffers(&vars);
        if let Some(v) = vars.into_iter().next() {
            self.known.entry = Some((Key::of_vars(&v), v));
        }
        self
    }

    /// Saves the buffers of `vars` at the start of the call, when a bad batch's update can be
    /// skipped: by the `skip` policy, on the device (`sync = "deferred"`), or as a
    /// loss-scaling overflow (whatever the policy).
    pub(crate) fn save_buffers(&mut self, vars: &[Arc<Mutex<Variables>>]) {
        let c = self.config;
        let skippable = c.on_nan == OnNan::Skip
            || c.sync == crate::SyncMode::Deferred
            || c.loss_scale.is_some();
        if skippable && (c.checks != crate::Checks::NONE || c.loss_scale.is_some()) {
            self.snapshot_buffers(vars);
        }
    }

    /// Saves the buffers of `vars` at the start of the call whatever the policy (a call that
    /// may be replayed restores them before it runs again).
    pub(crate) fn save_buffers_always(&mut self, vars: &[Arc<Mutex<Variables>>]) {
        if self.known.buffers.is_empty() && self.known.unsaved.is_none() {
            self.snapshot_buffers(vars);
        }
    }

    /// The key of a `VarStore`'s parameters: the entry's as computed at the call's start.
    pub(crate) fn key_of(&self, vars: &Arc<Mutex<Variables>>) -> Key {
        match &self.known.entry {
            Some((key, v)) if Arc::ptr_eq(v, vars) => *key,
            _ => Key::of_vars(vars),
        }
    }

    fn snapshot_buffers(&mut self, vars: &[Arc<Mutex<Variables>>]) {
        let mut saved = SavedBuffers::default();
        for v in vars {
            match Buffers::snapshot(v) {
                Ok(b) => saved.push((self.key_of(v), b)),
                // A skip could not undo what the batch writes to them: it fails instead.
                Err(e) => {
                    self.known.unsaved = Some(e);
                    return;
                }
            }
        }
        self.known.buffers = saved;
    }

    /// Sets the file and line shown in error messages.
    pub fn with_location(mut self, file: &'static str, line: u32) -> Self {
        self.origin.location = Some((file, line));
        self
    }

    /// Whether the step body has protected operations (`None`: none to protect).
    pub(crate) fn with_protected(mut self, protected: Option<bool>) -> Self {
        self.protected = protected;
        self
    }

    /// The parameters known at entry, when they come from elsewhere than the names.
    pub(crate) fn with_entry(mut self, entry: Option<(Key, Arc<Mutex<Variables>>)>) -> Self {
        if entry.is_some() {
            self.known.entry = entry;
        }
        self
    }

    /// This call's index (0-based) among the calls with this state.
    pub fn call(&self) -> u64 {
        self.origin.call
    }

    /// The index (0-based, per set of parameters) of the update ("step") in progress, from
    /// [`StepGuard::before_update`] on; `None` before.
    pub fn step(&self) -> Option<u64> {
        self.update.as_ref().map(|u| u.index)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.config
    }

    /// The index of the update in progress, else of the next update of the parameters known
    /// at entry (what a failure before any update names).
    pub(crate) fn next_update(&self) -> u64 {
        if let Some(u) = &self.update {
            return u.index;
        }
        let key = self.key();
        let mut models = self.state.lock();
        models.model(key, None).updates
    }

    /// The key of the update in progress, or of the parameters known at entry.
    pub(crate) fn key(&self) -> Key {
        self.update
            .as_ref()
            .map(|u| u.key)
            .or(self.known.entry.as_ref().map(|e| e.0))
            .unwrap_or(Key::UNKNOWN)
    }

    /// Records a tensor bound by `let` in the step body (the `forward` check): its finiteness is
    /// folded into the step's flag (no host read) and, only if that flag fails, the first
    /// non-finite binding is named by variable, line and kind of expression.
    pub fn bind(&mut self, value: &Tensor, name: &'static str, line: u32, kind: &'static str) {
        if self.config.checks.forward && value.defined() && crate::values::can_be_non_finite(value)
        {
            self.obs.flag.fold(value);
            self.obs.bindings.push(Binding {
                name,
                line,
                kind,
                value: value.detach(),
            });
            self.offer_observed();
        }
    }

    /// Records the loss (before backward). No host read.
    pub fn loss(&mut self, loss: &Tensor) {
        self.loss_at(loss, 0, "");
    }

    /// [`StepGuard::loss`] with the line and the expression of the call, to name it.
    pub(crate) fn loss_at(&mut self, loss: &Tensor, line: u32, expr: &'static str) {
        // Spike detection needs the loss even when it is not checked.
        let check = self.config.checks.loss;
        if (check || self.config.spike.is_some()) && loss.defined() {
            if check {
                self.obs.flag.fold(loss);
            }
            self.obs.losses.push(LossRecord {
                // Detached only if carried past the call (see `Drop`).
                value: loss.shallow_clone(),
                line,
                expr,
                call: self.origin.call,
            });
            self.offer_observed();
        }
    }

    /// The function, its location and this call.
    pub(crate) fn origin(&self) -> Origin {
        self.origin
    }

    /// A [`Check::Device`] error: libtorch's `message`, nothing applied.
    pub(crate) fn device_error(&self, e: TorchError, step: u64) -> GuardError {
        self.origin.device_error(e, step)
    }

    /// An error of this call, with the last grad norm read.
    pub(crate) fn error(
        &self,
        check: Check,
        tensors: Vec<TensorReport>,
        diagnosis: Diagnosis,
        step: u64,
    ) -> GuardError {
        let mut e = self.origin().error(check, tensors, diagnosis, step);
        e.grad_norm = self.last.norm;
        e
    }

    /// Ends the step. Whatever it observed and did not read (the loss of a micro-batch with
    /// no update) is carried to the next update of the same parameters; under loss scaling,
    /// the scale is updated (on the device) from this call's updates. Dropping the guard does
    /// the same.
    pub fn finish(self) {}

    /// The adaptive clipping threshold of the last update (`max_norm = "adaptive"`; infinite
    /// during warm-up), read with the step's flag.
    pub fn last_clip_threshold(&self) -> Option<f64> {
        self.last.threshold
    }

    /// The total grad norm read back with the step's flag (no extra read), if computed.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last.norm
    }

    /// Zeroes the grads of `params` (what `zero_grad` does), for a skipped step.
    pub fn zero_grads(params: &[Tensor]) {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }
}

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.commit();
        self.update_scale();
        if self.obs.is_empty() {
            return;
        }
        let mut obs = std::mem::take(&mut self.obs);
        obs.detach_losses();
        let (key, vars) = match &self.known.entry {
            Some((k, v)) => (*k, Some(v)),
            None => (Key::UNKNOWN, None),
        };
        let mut models = self.state.lock();
        let m = models.model(key, vars);
        m.carried.absorb(obs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The loss of a call without an update is carried to the next update as a value: its
    /// autograd graph is not kept alive past the call.
    #[test]
    fn a_carried_loss_keeps_no_graph() {
        let state = GuardState::new();
        let config = Config::DEFAULT;
        let w = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let loss = (&w * 2.0).sum(Kind::Float);
        {
            let mut guard = StepGuard::begin(&config, "f", &state);
            guard.loss_at(&loss, 1, "loss");
            let seen = &guard.obs.losses[0].value;
            assert!(seen.requires_grad(), "within the call: the loss itself");
        }
        let mut models = state.lock();
        let carried = &models.model(Key::UNKNOWN, None).carried.losses;
        assert_eq!(carried.len(), 1);
        assert!(!carried[0].value.requires_grad(), "carried: a value only");
        assert_eq!(carried[0].value.double_value(&[]), 8.0);
    }
}
