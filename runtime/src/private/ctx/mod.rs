//! The state of one call of a guarded function.

use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;

use tch::Tensor;

use super::replay::Run;
use crate::config::Config;
use crate::error::GuardError;
use crate::guard::StepGuard;
use crate::registry::Site;
use crate::sources::{dedup, ParamSource, Sources};
use crate::state::{GuardState, Key};

mod decided;
mod plain;

pub use plain::PlainStep;

/// What a checkpoint tells the generated code to do.
#[derive(Debug)]
// The error travels only on the cold path, once per failed step.
#[allow(clippy::large_enum_variant)]
pub enum Verdict {
    /// Go on.
    Proceed,
    /// Skip the guarded operation (the grads are already zeroed).
    Skip,
    /// Panic with, or return, this error.
    Fail(GuardError),
}

/// The result of a guarded operation: its value (the plain operation's, or its type's
/// default when it was skipped), or the error to raise.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Outcome<R> {
    /// The operation's value.
    Value(R),
    /// Panic with, or return, this error.
    Fail(GuardError),
}

/// Panics with the error's text (`on_nan = "panic"`).
#[cold]
#[track_caller]
pub fn fail(e: GuardError) -> ! {
    panic!("{e}")
}

/// The state of one call of a guarded function. Shared (`&Ctx`) by the generated code, so a
/// closure in the step body that contains a guarded operation stays `Fn`.
#[derive(Debug)]
pub struct Ctx<'s>(RefCell<CtxInner<'s>>);

impl<'s> Ctx<'s> {
    /// Starts a call. `state`: the attribute's `state = ...`, else the function's own.
    /// `entry`: the parameter sources known at entry (`VarStore` arguments), whose
    /// non-trainable buffers a skipped step restores. `protected`: whether the body's `/` and
    /// log are protected (`None`: it has none).
    pub fn begin(
        site: &'static Site,
        state: Option<&'s GuardState>,
        entry: &[&dyn ParamSource],
        protected: Option<bool>,
    ) -> Self {
        let state = state.unwrap_or(site.state());
        let config = site.effective_config();
        let var_stores: Vec<_> = match entry {
            [one] => one.guard_var_stores(),
            _ => entry.iter().flat_map(|s| s.guard_var_stores()).collect(),
        };
        let entry_key = var_stores.first().map(|v| (Key::of_vars(v), v.clone()));
        let mut guard = StepGuard::begin(config, site.name(), state)
            .with_location(site.file(), site.line())
            .with_protected(protected)
            .with_entry(entry_key);
        guard.save_buffers(&var_stores);
        site.calls.fetch_add(1, Relaxed);
        Ctx(RefCell::new(CtxInner {
            site,
            guard,
            params: Vec::new(),
            manual: false,
            backward_pending: false,
            var_stores,
            run: Run::off(),
            outcome: crate::Outcome::NoUpdate,
        }))
    }

    /// How this run of the call goes ([`Replay`](super::Replay)): a first run that may stop
    /// to be replayed, or none.
    pub fn with_replay(self, replay: super::Replay) -> Self {
        self.with_replay_args(replay, &[])
    }

    /// [`Ctx::with_replay`], with the step's tensor arguments by name: a replay's observer
    /// names the one that already held the NaN/Inf.
    pub fn with_replay_args(self, replay: super::Replay, args: &[(&'static str, &Tensor)]) -> Self {
        {
            let inner = &mut *self.0.borrow_mut();
            inner.run = Run::start(
                replay,
                &mut inner.guard,
                inner.site,
                &inner.var_stores,
                args,
            );
        }
        self
    }

    /// The attribute's `group = ...`: every decision of the call the same on every rank
    /// ([`StepGuard::with_group`]).
    pub fn with_group(self, group: &'s crate::dist::ProcessGroup) -> Self {
        self.0.borrow_mut().guard.set_group(group);
        self
    }

    /// The loss check, before `backward()`. With `read_now` (no update follows in the
    /// function) the flag is read here; otherwise it is read before the update.
    pub fn loss(
        &self,
        loss: &Tensor,
        read_now: bool,
        line: u32,
        expr: &'static str,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let mut inner = self.0.borrow_mut();
        let _quiet = inner.run.unrecorded();
        inner.loss(loss, read_now, line, expr, names)
    }

    /// What `backward()` runs on: `loss * scale` under dynamic loss scaling, `None` without.
    pub fn scaled(&self, loss: &Tensor) -> Result<Option<Tensor>, GuardError> {
        let mut inner = self.0.borrow_mut();
        let r = inner.guard.scaled(loss);
        if let Err(e) = &r {
            inner.outcome.merge(crate::Outcome::of_error(e));
        }
        r
    }

    /// The start of tch's `backward_step` family, in both modes: the loss check, zero_grad,
    /// backward (of the scaled loss under loss scaling), value clipping. `Some` when the step
    /// stops there.
    pub fn backward_step_start<O: crate::GuardedOptimizer + ?Sized>(
        &self,
        opt: &mut O,
        loss: &Tensor,
        clip_value: Option<f64>,
        at: (u32, &'static str),
        names: &[&dyn ParamSource],
    ) -> Option<Verdict> {
        if let v @ (Verdict::Fail(_) | Verdict::Skip) = self.loss(loss, false, at.0, at.1, names) {
            return Some(v);
        }
        opt.guard_zero_grad();
        match self.scaled(loss) {
            Ok(None) => loss.backward(),
            Ok(Some(scaled)) => scaled.backward(),
            Err(e) => return Some(Verdict::Fail(e)),
        }
        if let Some(v) = clip_value {
            opt.guard_clip_grad_value(v);
        }
        None
    }

    /// Before an optimizer step: clip, check, one host read.
    pub fn before(
        &self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let mut inner = self.0.borrow_mut();
        let _quiet = inner.run.unrecorded();
        inner.before(params, max_norm, names)
    }

    /// Before an update under `sync = "deferred"`: judges the previous update's verdict (an
    /// error is raised now, one step late, under `panic`/`error`; a skip is counted), and
    /// returns this update's `found_inf` and `grad_scale` for the fused optimizer, with no host
    /// read. Buffers saved at the start of the call are restored on the device when
    /// `found_inf` is set.
    pub fn before_deferred(
        &self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Result<(Tensor, Option<Tensor>), GuardError> {
        self.0.borrow_mut().before_deferred(params, max_norm, names)
    }

    /// Before a manual update (no optimizer): the parameters come from `params = ...`.
    pub fn before_manual(&self, names: &[&dyn ParamSource]) -> Verdict {
        let mut inner = self.0.borrow_mut();
        let _quiet = inner.run.unrecorded();
        let params = dedup(names.iter().flat_map(|s| s.guard_params()));
        inner.manual = true;
        inner.before(params, None, names)
    }

    /// The error of an update the optimizer refused (nothing changed): [`Check::Device`]
    /// with its text.
    ///
    /// [`Check::Device`]: crate::Check::Device
    pub fn refused(&self, e: crate::TorchError) -> GuardError {
        let mut inner = self.0.borrow_mut();
        let e = inner.guard.device_error(e, inner.guard.next_update());
        inner.outcome.merge(crate::Outcome::of_error(&e));
        e
    }

    /// After an optimizer step: fold the parameters check; it is read with the next update
    /// of the same parameters.
    pub fn after(&self) {
        let mut inner = self.0.borrow_mut();
        let _quiet = inner.run.unrecorded();
        inner.run.applied();
        let params = std::mem::take(&mut inner.params);
        inner.guard.after_update_owned(params);
        inner.backward_pending = false;
    }

    /// Before an update that passed its checks (`rollback = N`): refreshes the snapshot of
    /// the parameters, `optimizer_state` and the buffers when it is `N` updates old (or the
    /// optimizer's state changed shape). Device copies, no host read.
    pub fn refresh_snapshot(&self, optimizer_state: impl FnOnce() -> Vec<Tensor>) {
        let inner = &mut *self.0.borrow_mut();
        let _quiet = inner.run.unrecorded();
        inner.guard.refresh_snapshot(&inner.params, optimizer_state)
    }

    /// A tensor bound by `let` (the `forward` check).
    pub fn bind(&self, t: &Tensor, name: &'static str, line: u32, kind: &'static str) {
        let mut inner = self.0.borrow_mut();
        let _quiet = inner.run.unrecorded();
        inner.guard.bind(t, name, line, kind)
    }
}

/// The state behind [`Ctx`].
#[derive(Debug)]
struct CtxInner<'s> {
    site: &'static Site,
    guard: StepGuard<'s>,
    /// Parameters of the update in progress.
    params: Vec<Tensor>,
    /// A manual update (no optimizer): its parameters are checked when the call ends.
    manual: bool,
    /// A `backward()` ran since the last guarded update.
    backward_pending: bool,
    /// The `VarStore`s known at entry, whose variables a plain `.step()` must not change.
    var_stores: Vec<std::sync::Arc<std::sync::Mutex<tch::nn::Variables>>>,
    /// This run's part of a replay of the call.
    run: Run,
    /// What the guard decided so far in the call ([`crate::last_outcome`] when it ends).
    outcome: crate::Outcome,
}

impl CtxInner<'_> {
    fn config(&self) -> &'static Config {
        self.site.effective_config()
    }

    fn loss(
        &mut self,
        loss: &Tensor,
        read_now: bool,
        line: u32,
        expr: &'static str,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        self.backward_pending = true;
        if !self.config().checks.loss {
            return Verdict::Proceed;
        }
        self.guard.loss_at(loss, line, expr);
        if !read_now {
            return Verdict::Proceed;
        }
        let r = self.guard.check_loss_now(Some(&Sources(names)));
        self.verdict(r)
    }

    fn before(
        &mut self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let r = self
            .guard
            .before_update_with(&params, max_norm, Some(&Sources(names)));
        let mut clipped = false;
        if let Some(n) = self.guard.last_grad_norm() {
            self.site.set_last_norm(n);
            let threshold = max_norm
                .or(self.config().max_norm)
                .or(self.guard.last_clip_threshold());
            if let Some(m) = threshold.filter(|m| n > *m) {
                clipped = true;
                self.site.clipped.fetch_add(1, Relaxed);
                let step = self.guard.step().unwrap_or_default();
                crate::events::clipped(self.site.name(), step, n, m);
            }
        }
        self.params = params;
        let v = self.verdict(r);
        if let Verdict::Proceed = v {
            self.outcome.merge(crate::Outcome::Applied { clipped });
        }
        v
    }

    /// The policy for a check's result (the core's), counted for the site.
    fn verdict(&mut self, r: Result<(), GuardError>) -> Verdict {
        let r = self
            .run
            .verdict(r, &mut self.guard, &self.params, self.site);
        let d = self.guard.apply_policy(r, &self.params);
        self.count(d)
    }
}

impl Drop for CtxInner<'_> {
    fn drop(&mut self) {
        // Also when unwinding (`on_nan = "panic"`); a replayed call's second run records last.
        crate::outcome::record(std::mem::replace(
            &mut self.outcome,
            crate::Outcome::NoUpdate,
        ));
        if std::thread::panicking() {
            return;
        }
        self.run.finish();
        if self.manual {
            let params = std::mem::take(&mut self.params);
            self.guard.after_update_owned(params);
        }
    }
}
