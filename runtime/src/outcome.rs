//! What the guard decided for a `#[guarded_step]` call, kept per thread for the training loop
//! to ask after the call returns ([`last_outcome`]).

use std::cell::RefCell;

use crate::error::{Check, Diagnosis, GuardError};
use crate::guard::{SkipReason, Skipped};

/// What the guard decided for one call of a `#[guarded_step]` function ([`last_outcome`]).
///
/// A call with several updates (a GAN's two optimizers) reports the one that matters most to
/// the loop, in this order: [`Failed`](Outcome::Failed), [`RolledBack`](Outcome::RolledBack),
/// [`Skipped`](Outcome::Skipped), [`Overflow`](Outcome::Overflow),
/// [`Applied`](Outcome::Applied), [`NoUpdate`](Outcome::NoUpdate).
///
/// Under `sync = "deferred"` an update's verdict is read by the next call of the same
/// parameters, so the outcome is one call late: see [`last_outcome`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The checks passed and the update ran.
    Applied {
        /// The global grad norm was above `max_norm` (or the adaptive threshold) and the grads
        /// were clipped. Always `false` under `sync = "deferred"`, where the optimizer's kernel
        /// clips without a read.
        clipped: bool,
    },
    /// `on_nan = "skip"`: a check failed and the update was not applied (its grads zeroed,
    /// buffers restored); the batch should not count.
    Skipped {
        /// The check that failed.
        check: Check,
        /// Consecutive skips, this one included (at most `max_skips`).
        consecutive: u32,
    },
    /// `rollback = N`: a check failed and the parameters, the optimizer state (where exposed)
    /// and the buffers were restored to their state before update `to_update`.
    RolledBack {
        /// The check that failed.
        check: Check,
        /// The update the snapshot was taken before.
        to_update: u64,
    },
    /// Dynamic loss scaling: the grads overflowed at the scale; the update was skipped and the
    /// scale backs off (expected now and then, under every `on_nan`).
    Overflow {
        /// The scale the grads overflowed at.
        scale: f64,
        /// The scale of the next step.
        next: f64,
    },
    /// No update was decided: a call with a backward but no optimizer step (gradient
    /// accumulation), or without either; under `sync = "deferred"`, the first call of its
    /// parameters (no earlier verdict to read).
    NoUpdate,
    /// The call panicked with, or returned, the guard's error (`on_nan = "panic"` or
    /// `"error"`, `max_skips` exceeded, an optimizer that refused the step).
    Failed {
        /// The check that failed.
        check: Check,
    },
}

impl Outcome {
    /// A skipped update (under any policy): [`Skipped`](Outcome::Skipped),
    /// [`RolledBack`](Outcome::RolledBack) or [`Overflow`](Outcome::Overflow). The call
    /// returned normally and its batch left the parameters as they were: its loss is not the
    /// loss of an update, and is left out of an epoch's mean.
    pub fn skipped(&self) -> bool {
        matches!(
            self,
            Outcome::Skipped { .. } | Outcome::RolledBack { .. } | Outcome::Overflow { .. }
        )
    }

    /// The outcome of a skip decided by the policy.
    pub(crate) fn of_skip(s: &Skipped) -> Outcome {
        match s.reason {
            SkipReason::Overflow => {
                let (scale, next) = match s.error.diagnosis {
                    Diagnosis::Overflow { scale, next } => (scale, next),
                    _ => (f64::NAN, f64::NAN),
                };
                Outcome::Overflow { scale, next }
            }
            SkipReason::Policy { consecutive } => Outcome::Skipped {
                check: s.error.check,
                consecutive,
            },
            SkipReason::RolledBack { update, .. } => Outcome::RolledBack {
                check: s.error.check,
                to_update: update,
            },
        }
    }

    /// The outcome of a call that fails with `e`.
    pub(crate) fn of_error(e: &GuardError) -> Outcome {
        Outcome::Failed { check: e.check }
    }

    /// How much it matters to the loop (the higher wins within a call).
    fn weight(&self) -> u8 {
        match self {
            Outcome::NoUpdate => 0,
            Outcome::Applied { .. } => 1,
            Outcome::Overflow { .. } => 2,
            Outcome::Skipped { .. } => 3,
            Outcome::RolledBack { .. } => 4,
            Outcome::Failed { .. } => 5,
        }
    }

    /// Adds a decision of the same call: the one that matters more is kept; two applied
    /// updates are clipped when either was.
    pub(crate) fn merge(&mut self, next: Outcome) {
        if let (Outcome::Applied { clipped }, Outcome::Applied { clipped: c }) = (&mut *self, &next)
        {
            *clipped |= *c;
        } else if next.weight() >= self.weight() {
            *self = next;
        }
    }
}

thread_local! {
    static LAST: RefCell<Option<Outcome>> = const { RefCell::new(None) };
}

/// What the guard decided for the last `#[guarded_step]` call that returned (or unwound) on
/// this thread. Ask it right after the call: the next guarded call replaces it.
///
/// ```
/// # fn train_step() -> tch::Tensor { tch::Tensor::from(0.5f64) }
/// # let batches = 0..10;
/// let (mut sum, mut n) = (0.0, 0);
/// for _ in batches {
///     let loss = train_step(); // #[guarded_step(on_nan = "skip")]
///     if !stepguard::last_outcome().is_some_and(|o| o.skipped()) {
///         sum += loss.double_value(&[]);
///         n += 1;
///     }
/// }
/// ```
///
/// Under `sync = "deferred"` an update is judged on the device and its verdict read by the
/// next call of the same parameters: after call N returns, `last_outcome()` describes call
/// N−1's update (`Skipped` or `Overflow`: that batch was skipped on the device; `Applied`: it
/// was applied), and [`NoUpdate`](Outcome::NoUpdate) after the first call. The last call's
/// verdict is read by [`flush`](crate::flush), whose `Err` names a skipped last batch.
///
/// With `group = ...` (data parallel) it is the ranks' agreed decision, the same on every
/// rank. `None`: no guarded call has ended on this thread yet, or the checks are compiled
/// out (`strip-release`). A hand-written [`StepGuard`](crate::StepGuard) loop has its
/// [`Decision`](crate::Decision) instead. Recording it costs no allocation, lock or read.
pub fn last_outcome() -> Option<Outcome> {
    LAST.with(|l| l.try_borrow().ok().and_then(|l| l.clone()))
}

/// Records the outcome of the call that is ending on this thread.
pub(crate) fn record(o: Outcome) {
    LAST.with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            *l = Some(o);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_that_matters_most_wins_within_a_call() {
        let mut o = Outcome::NoUpdate;
        o.merge(Outcome::Applied { clipped: false });
        o.merge(Outcome::Applied { clipped: true });
        assert_eq!(o, Outcome::Applied { clipped: true });
        let skipped = Outcome::Skipped {
            check: Check::Loss,
            consecutive: 1,
        };
        o.merge(skipped.clone());
        o.merge(Outcome::Applied { clipped: false });
        o.merge(Outcome::NoUpdate);
        assert_eq!(o, skipped);
        assert!(o.skipped());
        o.merge(Outcome::Failed {
            check: Check::Grads,
        });
        assert_eq!(
            o,
            Outcome::Failed {
                check: Check::Grads
            }
        );
        assert!(!o.skipped());
    }

    #[test]
    fn last_outcome_is_per_thread() {
        record(Outcome::NoUpdate);
        assert_eq!(last_outcome(), Some(Outcome::NoUpdate));
        let other = std::thread::spawn(last_outcome).join().ok().flatten();
        assert_eq!(other, None);
    }
}
