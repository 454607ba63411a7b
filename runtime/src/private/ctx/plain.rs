//! A `.step()` the guard cannot see into (not a `GuardedOptimizer`): let through, watched by
//! the version counters of the step's `VarStore`s, or refused.

use std::sync::atomic::Ordering::Relaxed;

use super::{Ctx, CtxInner, Verdict};
use crate::error::{Check, Diagnosis, GuardError};

impl Ctx<'_> {
    /// A `.step()` on something that is not a [`GuardedOptimizer`](crate::GuardedOptimizer),
    /// after a `backward()` whose grads no guarded update used: it may be an optimizer the
    /// guard cannot see. When the step's `VarStore`s are known, their trainable variables'
    /// version counters are noted ([`PlainStep::Watch`]) and compared after it
    /// ([`Ctx::after_plain_step`]): an LR scheduler changes none. Otherwise it is refused
    /// before it runs.
    pub fn plain_step(&self, receiver: &'static str, line: u32) -> PlainStep {
        let mut inner = self.0.borrow_mut();
        let config = inner.config();
        // Under loss scaling the grads are scaled: an unseen step would apply them so.
        let guards = config.checks != crate::Checks::NONE
            || config.max_norm.is_some()
            || config.adaptive_clip.is_some()
            || config.loss_scale.is_some();
        if !(inner.backward_pending && guards) {
            return PlainStep::Free;
        }
        if !inner.var_stores.is_empty() {
            return PlainStep::Watch(inner.versions());
        }
        PlainStep::Refuse(inner.unguarded(receiver, line))
    }

    /// After a watched plain `.step()`: an error when it changed a trainable variable.
    pub fn after_plain_step(&self, before: &[i64], receiver: &'static str, line: u32) -> Verdict {
        let mut inner = self.0.borrow_mut();
        if inner.versions() == before {
            return Verdict::Proceed;
        }
        Verdict::Fail(inner.unguarded(receiver, line))
    }
}

/// What a plain `.step()` after a `backward()` may do.
#[derive(Debug)]
pub enum PlainStep {
    /// Nothing to watch: run it.
    Free,
    /// Run it, then compare these version counters ([`Ctx::after_plain_step`]).
    Watch(Vec<i64>),
    /// Do not run it: it may update parameters no check covers.
    Refuse(GuardError),
}

impl CtxInner<'_> {
    /// The version counters of the known `VarStore`s' trainable variables.
    fn versions(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for v in &self.var_stores {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                v.trainable_variables
                    .iter()
                    .map(|t| t.tensor.internal_version()),
            );
        }
        out
    }

    fn unguarded(&mut self, receiver: &'static str, line: u32) -> GuardError {
        let optimizer = receiver.rsplit("::").next().unwrap_or(receiver);
        let e = self.guard.error(
            Check::Unguarded,
            Vec::new(),
            Diagnosis::Unguarded { optimizer, line },
            self.guard.next_update(),
        );
        self.site.failures.fetch_add(1, Relaxed);
        self.outcome.merge(crate::Outcome::of_error(&e));
        crate::events::failed(&e);
        e
    }
}
