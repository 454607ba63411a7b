//! The policy: what a failed check does to the update (`on_nan`, `max_skips`, loss-scaling
//! overflows, `rollback = N`), the same for `#[guarded_step]` and a hand-written
//! [`StepGuard`] loop.

use tch::Tensor;

use super::{DeviceVerdict, StepGuard};
use crate::config::OnNan;
use crate::error::{GuardError, TorchError};

/// What a failure to restore the buffers says first.
const RESTORE: &str = "saving or restoring the buffers (BatchNorm statistics) of a skipped update";
use crate::rollback::Snapshot;
use crate::sources::NameSource;
use crate::state::Key;

/// What to do with an update, once its check is read and the policy applied
/// ([`StepGuard::decide`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum Decision {
    /// Apply the update.
    Proceed,
    /// Do not apply it; its grads are zeroed and the buffers of its `VarStore` restored
    /// (`sync = "deferred"`: the update was already skipped on the device).
    Skip(Skipped),
    /// Panic with, or return, this error; the update is not applied, and its grads are zeroed
    /// when the error rejects them ([`GuardError::rejects_grads`]).
    Fail(GuardError),
}

/// A skipped update: the failure, and why it was skipped instead of raised.
#[derive(Debug)]
#[non_exhaustive]
pub struct Skipped {
    /// What failed.
    pub error: GuardError,
    /// Why the update was skipped.
    pub reason: SkipReason,
}

/// Why an update was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// Dynamic loss scaling: the grads overflowed at the scale (expected, under every
    /// `on_nan`; not counted toward `max_skips`).
    Overflow,
    /// `on_nan = "skip"`: skipped, this many times in a row (at most `max_skips`).
    Policy {
        /// Consecutive skips, this one included.
        consecutive: u32,
    },
    /// `rollback = N`: the parameters, the optimizer state (where exposed) and the buffers
    /// were restored to their state before update `update`.
    RolledBack {
        /// The update the snapshot was taken before.
        update: u64,
        /// The call that update was made in.
        call: u64,
        /// Device memory the snapshot holds.
        bytes: usize,
        /// Whether the snapshot holds optimizer state.
        optimizer_state: bool,
    },
}

impl StepGuard<'_> {
    /// [`StepGuard::before_update`], then the configured policy: `on_nan = "skip"` skips (up
    /// to `max_skips` in a row, then fails), a loss-scaling overflow is skipped under every
    /// policy, `rollback = N` restores its snapshot on a failure a skip cannot undo. A skip
    /// zeroes the grads of `params` and restores the buffers of the `VarStore`s given to
    /// [`StepGuard::with_names`]. What `#[guarded_step]` does before each update.
    pub fn decide(&mut self, params: &[Tensor]) -> Decision {
        let r = self.before_update(params).map(|_| ());
        self.apply_policy(r, params)
    }

    /// The policy for the result of a check of `params`' update.
    pub(crate) fn apply_policy(
        &mut self,
        r: Result<(), GuardError>,
        params: &[Tensor],
    ) -> Decision {
        self.policy(r, params, false)
    }

    /// `on_device`: the update it judges was already skipped on the device (`sync =
    /// "deferred"`), so nothing here is zeroed, restored or rolled back.
    fn policy(
        &mut self,
        r: Result<(), GuardError>,
        params: &[Tensor],
        on_device: bool,
    ) -> Decision {
        let d = self.policy_for(r, params, on_device);
        if !on_device && !matches!(d, Decision::Proceed) {
            // No update follows: its state goes back now.
            self.commit();
        }
        d
    }

    fn policy_for(
        &mut self,
        r: Result<(), GuardError>,
        params: &[Tensor],
        on_device: bool,
    ) -> Decision {
        let key = self.key();
        let mut e = match r {
            Ok(()) => {
                self.with_model(|m| {
                    m.consecutive_skips = 0;
                    m.rolled_back = false;
                });
                return Decision::Proceed;
            }
            Err(e) => e,
        };
        let cfg = self.config;
        let skip = |error, reason| Decision::Skip(Skipped { error, reason });
        if e.is_overflow() {
            if !on_device {
                StepGuard::zero_grads(params);
                if let Err(d) = self.restore_buffers(key) {
                    return self.unrestored(d, &e);
                }
            }
            crate::events::overflow(&e);
            return skip(e, SkipReason::Overflow);
        }
        if cfg.rollback.is_some() && !on_device && e.rollback_heals() {
            if let Some(reason) = self.roll_back(&e, params) {
                return skip(e, reason);
            }
        }
        if cfg.on_nan == OnNan::Skip && e.is_skippable() {
            let n = self.count_skip(e.call);
            if n > cfg.max_skips && cfg.rollback.is_some() && !on_device {
                // Skips that persist: the parameters themselves are bad.
                if let Some(reason) = self.roll_back(&e, params) {
                    return skip(e, reason);
                }
            }
            if n <= cfg.max_skips {
                if !on_device {
                    StepGuard::zero_grads(params);
                    if let Err(d) = self.restore_buffers(key) {
                        return self.unrestored(d, &e);
                    }
                }
                crate::events::skipped(&e, n, cfg.max_skips);
                return skip(e, SkipReason::Policy { consecutive: n });
            }
            e.consecutive_skips = Some(n - 1);
        }
        if !on_device && e.rejects_grads() {
            // A rejected update leaves nothing a later one could add onto.
            StepGuard::zero_grads(params);
        }
        crate::events::failed(&e);
        Decision::Fail(e)
    }

    /// Counts a skip of the update's parameters in `call` (a call counts once, however many updates);
    /// the count so far, reset once past `max_skips`.
    fn count_skip(&mut self, call: u64) -> u32 {
        let max_skips = self.config.max_skips;
        self.with_model(|m| {
            if m.last_skip_call != Some(call) {
                m.consecutive_skips += 1;
                m.last_skip_call = Some(call);
            }
            let n = m.consecutive_skips;
            if n > max_skips {
                m.consecutive_skips = 0;
            }
            n
        })
    }

    /// `sync = "deferred"`: [`StepGuard::before_update_deferred`] with the policy applied to
    /// the previous update's verdict (already skipped on the device). When that fails, this
    /// update is refused too and its grads are zeroed. Else the buffers saved at the start of
    /// the call are restored on the device where this update's `found_inf` is set.
    pub(crate) fn decide_deferred(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
    ) -> (Decision, Result<DeviceVerdict, GuardError>) {
        let (previous, now) = self.before_update_deferred(params, max_norm, names);
        let previous = self.policy(previous.map_or(Ok(()), Err), params, true);
        if let Decision::Fail(_) = previous {
            StepGuard::zero_grads(params);
            return (previous, now);
        }
        let now = now.and_then(|verdict| {
            let key = self.key();
            self.note_unknown_buffers(key);
            let restored = match self.known.unsaved.clone() {
                Some(e) => Err(e),
                None => self
                    .buffers_of(key)
                    .try_for_each(|b| b.restore_if(&verdict.0)),
            };
            let step = self.next_update();
            restored
                .map(|()| verdict)
                .map_err(|e| self.device_error(e.context(RESTORE), step))
        });
        (previous, now)
    }

    /// Restores every buffer saved at the start of the call (before a replay).
    pub(crate) fn restore_call_buffers(&self) {
        for (_, b) in self.known.buffers.iter() {
            let _ = b.restore();
        }
    }

    /// Restores the buffers of the model whose update was skipped.
    fn restore_buffers(&mut self, key: Key) -> Result<(), TorchError> {
        self.note_unknown_buffers(key);
        if let Some(e) = self.known.unsaved.clone() {
            return Err(e);
        }
        self.buffers_of(key)
            .try_for_each(crate::rollback::Buffers::restore)
    }

    /// A skip whose buffers could not be restored (libtorch refused saving or writing them): a
    /// [`Check::Device`](crate::Check::Device) failure instead, naming why and what it skipped.
    fn unrestored(&mut self, e: TorchError, skipped: &GuardError) -> Decision {
        let mut error = self.device_error(e.context(RESTORE), skipped.step);
        error.ranks = skipped.ranks.clone();
        crate::events::failed(&error);
        Decision::Fail(error)
    }

    /// A skipped update of parameters that live in none of the `VarStore`s the step names:
    /// their own store's buffers (BatchNorm running statistics) cannot be found, so they keep
    /// what the bad batch wrote. Said once per set of parameters, with the fix.
    fn note_unknown_buffers(&mut self, key: Key) {
        if self.known.buffers.is_empty()
            || key == Key::UNKNOWN
            || self.known.buffers.iter().any(|(k, _)| *k == key)
        {
            return;
        }
        let first = self.with_model(|m| !std::mem::replace(&mut m.buffers_noted, true));
        if first {
            crate::events::buffers_not_restored(self.origin.function);
        }
    }

    /// The buffers saved for `key`'s `VarStore`, all of them when the update's parameters are
    /// not a known `VarStore`'s.
    fn buffers_of(&self, key: Key) -> impl Iterator<Item = &crate::rollback::Buffers> {
        let own = self.known.buffers.iter().any(|(k, _)| *k == key);
        self.known
            .buffers
            .iter()
            .filter(move |(k, _)| !own || *k == key)
            .map(|(_, b)| b)
    }

    /// Before an update that passed its checks (`rollback = N`): refreshes the snapshot of
    /// `params`, the optimizer's state and the buffers when it is `N` updates old (or the
    /// optimizer's state appeared). Device copies, no host read.
    pub fn refresh_snapshot(
        &mut self,
        params: &[Tensor],
        optimizer_state: impl FnOnce() -> Vec<Tensor>,
    ) {
        let Some(every) = self.config.rollback else {
            return;
        };
        let Some(index) = self.step() else {
            return;
        };
        let key = self.key();
        // Due by age; or, while the snapshot holds no optimizer state (an optimizer creates it
        // at its first step), as soon as there is some: only then is the state listed.
        let (old, empty) = self.with_model(|m| match &m.snapshot {
            None => (true, true),
            Some(s) => (
                index.saturating_sub(s.update) >= u64::from(every),
                s.optimizer_tensors == 0,
            ),
        });
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
        let mut pairs: Vec<(Tensor, Tensor)> = params
            .iter()
            .chain(&state)
            .map(|t| (t.shallow_clone(), t.shallow_clone()))
            .collect();
        for (_, b) in self
            .known
            .buffers
            .iter()
            .filter(|(k, _)| *k == key || key == Key::UNKNOWN)
        {
            pairs.extend(b.at_start());
        }
        let call = self.origin.call;
        self.with_model(|m| {
            if Snapshot::refresh(&mut m.snapshot, pairs, index, call, n_state).is_err() {
                // Out of memory, say: no snapshot rather than a half one.
                m.snapshot = None;
            }
        });
    }

    /// Restores the snapshot of `key`'s parameters after `e`, unless there is none or the last
    /// rollback has not been followed by a passing update (then `e` escalates). The grads are
    /// zeroed and the skip counter reset.
    fn roll_back(&mut self, e: &GuardError, params: &[Tensor]) -> Option<SkipReason> {
        let reason = self.with_model(|m| {
            let (Some(snap), false) = (&m.snapshot, m.rolled_back) else {
                return None;
            };
            snap.restore().ok()?;
            let reason = SkipReason::RolledBack {
                update: snap.update,
                call: snap.call,
                bytes: snap.bytes(),
                optimizer_state: snap.optimizer_tensors > 0,
            };
            m.rolled_back = true;
            m.consecutive_skips = 0;
            m.last_skip_call = None;
            // What the damaged update left unread describes parameters that are gone.
            m.pending = None;
            Some(reason)
        })?;
        StepGuard::zero_grads(params);
        if let SkipReason::RolledBack { update, call, .. } = reason {
            crate::events::rolled_back(e, update, call);
        }
        Some(reason)
    }
}
