//! What a call decided: each decision of the policy counted in the site's statistics and
//! noted for [`crate::last_outcome`] (the call's [`crate::Outcome`], recorded when it ends).

use std::sync::atomic::Ordering::Relaxed;

use tch::Tensor;

use super::{CtxInner, Verdict};
use crate::error::GuardError;
use crate::guard::{Decision, SkipReason};
use crate::sources::{ParamSource, Sources};

impl CtxInner<'_> {
    /// Counts a decision in the site's statistics (and says the first skip and rollback).
    pub(super) fn count(&mut self, d: Decision) -> Verdict {
        let site = self.site;
        match d {
            Decision::Proceed => Verdict::Proceed,
            Decision::Skip(s) => {
                self.outcome.merge(crate::Outcome::of_skip(&s));
                // The skipped update used the grads: a later `.step()` is not an unseen one.
                self.backward_pending = false;
                match s.reason {
                    SkipReason::Overflow => {
                        site.overflow_skips.fetch_add(1, Relaxed);
                    }
                    SkipReason::Policy { .. } => {
                        site.skipped.fetch_add(1, Relaxed);
                        if s.error.check == crate::Check::Spike {
                            site.spikes.fetch_add(1, Relaxed);
                        }
                        site.announce_skip(&s.error, !self.params.is_empty());
                    }
                    SkipReason::RolledBack {
                        update,
                        bytes,
                        optimizer_state,
                        ..
                    } => {
                        site.rollbacks.fetch_add(1, Relaxed);
                        site.announce_rollback(&s.error, update, bytes, optimizer_state);
                    }
                }
                Verdict::Skip
            }
            Decision::Fail(e) => {
                site.failures.fetch_add(1, Relaxed);
                self.outcome.merge(crate::Outcome::of_error(&e));
                Verdict::Fail(e)
            }
        }
    }

    pub(super) fn before_deferred(
        &mut self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Result<(Tensor, Option<Tensor>), GuardError> {
        let (previous, now) = self
            .guard
            .decide_deferred(&params, max_norm, Some(&Sources(names)));
        self.params = params;
        match self.count(previous) {
            Verdict::Fail(e) => return Err(e),
            // The previous update, applied on the device (its grads were not clipped here).
            Verdict::Proceed if self.guard.read_previous() => {
                self.outcome
                    .merge(crate::Outcome::Applied { clipped: false });
            }
            _ => {}
        }
        if let Err(e) = &now {
            self.outcome.merge(crate::Outcome::of_error(e));
        }
        now
    }
}
