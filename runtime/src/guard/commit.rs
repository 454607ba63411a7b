//! An update's state from its start to its end: the update's own copy of its parameters' state
//! ([`StepGuard::with_model`]), given back with everything it changed under one lock
//! ([`StepGuard::commit`]), undone when a replay stops the call ([`StepGuard::abort_update`]),
//! and the parameters check folded after the optimizer step ([`StepGuard::after_update`]).

use std::sync::Arc;

use tch::Tensor;

use super::{StepGuard, Update};
use crate::flag::FiniteFlag;
use crate::state::{Key, ModelState, Pending};

impl StepGuard<'_> {
    /// The state of the parameters being updated: the update's own copy, else (outside an
    /// update: a loss read at once) the state's, under its lock.
    pub(crate) fn with_model<R>(&mut self, f: impl FnOnce(&mut ModelState) -> R) -> R {
        let key = self.key();
        match &mut self.update {
            Some(u) => f(&mut u.model),
            None => f(self.state.lock().model(key, None)),
        }
    }

    /// Undoes the update in progress (its first run stopped to be replayed): its parameters'
    /// state goes back as it was taken, the update not counted; what it read (checks that
    /// passed) is not read again.
    pub(crate) fn abort_update(&mut self) {
        if let Some(mut u) = self.update.take() {
            u.model.updates -= 1;
            self.state.lock().check_in(u.model);
        }
    }

    /// The call counts as call `call`, already counted (a replay of it).
    pub(crate) fn count_as_call(&mut self, call: u64) {
        self.origin.call = call;
        let mut m = self.state.lock();
        m.calls = m.calls.saturating_sub(1);
    }

    /// With a process group of more than one rank: this rank.
    pub(crate) fn rank(&self) -> Option<usize> {
        self.group().map(crate::dist::ProcessGroup::rank)
    }

    /// Ends the update in progress: its parameters' state goes back to the [`GuardState`]
    /// with everything it changed, under one lock; the scaler notes the grads the update
    /// unscaled (as they are now) and the scale it read.
    pub(crate) fn commit(&mut self) {
        let Some(u) = self.update.take() else {
            return;
        };
        let mut models = self.state.lock();
        if let Some(s) = models.scaler.as_mut() {
            if !u.unscaled.is_empty() {
                s.mark_unscaled(&u.unscaled);
            }
            if let Some((scale, overflow)) = u.scale_read {
                s.note(scale, overflow);
            }
        }
        models.check_in(u.model);
    }

    /// Folds the parameters check after the update (no host read); it is read with the next
    /// update of the same parameters, or by [`GuardState::flush`](crate::GuardState::flush).
    pub fn after_update(&mut self, params: &[Tensor]) {
        self.after_update_owned(params.iter().map(Tensor::shallow_clone).collect())
    }

    /// [`StepGuard::after_update`] keeping `params` themselves with the check (no copies of
    /// the handles).
    pub(crate) fn after_update_owned(&mut self, params: Vec<Tensor>) {
        if self.update.is_none() {
            if !self.config.checks.params {
                return;
            }
            // A manual update without `before_update`: counted here.
            let key = Key::of(&params);
            let model = self.state.lock().check_out(key, None);
            self.update = Some(Update::new(key, model, Vec::new()));
        }
        if self.config.checks.params {
            self.fold_after_update(params);
        }
        self.commit();
    }

    /// The parameters check of the update in progress, folded after it (no host read).
    fn fold_after_update(&mut self, params: Vec<Tensor>) {
        let origin = self.origin();
        let deferred = self.config.sync == crate::config::SyncMode::Deferred;
        let Some(u) = self.update.as_mut() else {
            return;
        };
        let mut flag = FiniteFlag::new();
        flag.fold_all(&params);
        let (flag, early, versions) = if deferred {
            let early = crate::flag::EarlyRead::start(vec![flag]);
            (FiniteFlag::new(), Some(early), Vec::new())
        } else {
            let mut versions = Vec::with_capacity(params.len());
            crate::shim::versions(&params, |v| versions.push(v));
            (flag, None, versions)
        };
        u.model.pending = Some(Pending {
            flag,
            early,
            versions,
            update: u.index,
            origin,
            params,
            vars: u.vars.iter().map(Arc::downgrade).collect(),
        });
    }
}
