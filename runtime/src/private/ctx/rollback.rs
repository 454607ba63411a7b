//! `rollback = N`: a snapshot of a good update's state, refreshed before passing updates with
//! device copies, restored on a failure a skip cannot undo.

use std::sync::atomic::Ordering::Relaxed;

use tch::Tensor;

use super::CtxInner;
use crate::error::GuardError;
use crate::guard::StepGuard;
use crate::snapshot::Snapshot;
use crate::state::Key;

impl CtxInner<'_> {
    pub(super) fn refresh_snapshot(&mut self, optimizer_state: impl FnOnce() -> Vec<Tensor>) {
        let Some(every) = self.config().rollback else {
            return;
        };
        let Some(index) = self.guard.update_index() else {
            return;
        };
        let key = self.guard.key();
        // Due by age; or, while the snapshot holds no optimizer state (an optimizer creates it
        // at its first step), as soon as there is some: only then is the state listed.
        let (old, empty) = {
            let mut models = self.guard.state().lock();
            match &models.model(key, None).snapshot {
                None => (true, true),
                Some(s) => (
                    index.saturating_sub(s.update) >= u64::from(every),
                    s.optimizer_tensors == 0,
                ),
            }
        };
        if !old && !empty {
            return;
        }
        let state = optimizer_state();
        if !old && state.is_empty() {
            return;
        }
        // The parameters and the optimizer's state as they are (checked finite by this
        // update's read), the buffers as they were when the call began (before its forward).
        let n_state = state.len();
        let mut pairs: Vec<(Tensor, Tensor)> = self
            .params
            .iter()
            .chain(&state)
            .map(|t| (t.shallow_clone(), t.shallow_clone()))
            .collect();
        for b in self
            .buffers
            .iter()
            .filter(|b| b.key == key || key == Key::UNKNOWN)
        {
            pairs.extend(b.at_start());
        }
        let call = self.guard.step();
        let mut models = self.guard.state().lock();
        let m = models.model(key, None);
        if Snapshot::refresh(&mut m.snapshot, pairs, index, call, n_state).is_err() {
            // Out of memory, say: no snapshot rather than a half one.
            m.snapshot = None;
        }
    }

    /// Restores the snapshot of `key`'s parameters after `e`, unless there is none or the
    /// last rollback has not been followed by a passing update (then `e` escalates). The
    /// grads are zeroed and the skip counter reset. Returns whether it rolled back.
    pub(super) fn roll_back(&mut self, key: Key, e: &GuardError) -> bool {
        let restored = {
            let mut models = self.guard.state().lock();
            let m = models.model(key, None);
            let (Some(snap), false) = (&m.snapshot, m.rolled_back) else {
                return false;
            };
            if snap.restore().is_err() {
                return false;
            }
            m.rolled_back = true;
            m.consecutive_skips = 0;
            m.last_skip_call = None;
            // What the damaged update left unread describes parameters that are gone.
            m.pending = None;
            (snap.update, snap.call, snap.bytes(), snap.optimizer_tensors)
        };
        self.backward_pending = false;
        StepGuard::zero_grads(&self.params);
        let site = self.site;
        site.rollbacks.fetch_add(1, Relaxed);
        let (update, call, bytes, opt) = restored;
        crate::events::rolled_back(e, update, call);
        site.announce_rollback(e, update, bytes, opt > 0);
        true
    }
}
