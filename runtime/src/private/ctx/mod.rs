//! The state of one call of a guarded function.

use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;

use tch::Tensor;

use crate::config::{Config, OnNan};
use crate::error::GuardError;
use crate::guard::StepGuard;
use crate::registry::Site;
use crate::sources::{dedup, ParamSource, Sources};
use crate::state::{GuardState, Key};

mod buffers;
mod plain;
mod rollback;

use buffers::Buffers;
pub use plain::PlainStep;

/// What a checkpoint tells the generated code to do.
#[derive(Debug)]
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
        let var_stores: Vec<_> = entry.iter().flat_map(|s| s.guard_var_stores()).collect();
        let entry_key = var_stores.first().map(|v| (Key::of_vars(v), v.clone()));
        let guard = StepGuard::begin(config, site.name(), state)
            .with_location(site.file(), site.line())
            .with_protected(protected)
            .with_entry(entry_key);
        // Saved when a bad batch's update can be skipped: by the `skip` policy, on the device
        // (`sync = "deferred"`), or as a loss-scaling overflow (whatever the policy).
        // Under loss scaling an overflow is skipped whatever the policy.
        let skippable = config.on_nan == OnNan::Skip
            || config.sync == crate::Sync::Deferred
            || config.loss_scale.is_some();
        let buffers =
            if skippable && (config.checks != crate::Checks::NONE || config.loss_scale.is_some()) {
                var_stores.iter().map(Buffers::snapshot).collect()
            } else {
                Vec::new()
            };
        site.calls.fetch_add(1, Relaxed);
        Ctx(RefCell::new(CtxInner {
            site,
            guard,
            params: Vec::new(),
            manual: false,
            backward_pending: false,
            buffers,
            var_stores,
        }))
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
        self.0.borrow_mut().loss(loss, read_now, line, expr, names)
    }

    /// What `backward()` runs on: `loss * scale` under dynamic loss scaling, `None` without.
    pub fn scaled(&self, loss: &Tensor) -> Result<Option<Tensor>, GuardError> {
        self.0.borrow_mut().guard.scaled(loss)
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
        self.0.borrow_mut().before(params, max_norm, names)
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
        let params = dedup(names.iter().flat_map(|s| s.guard_params()));
        inner.manual = true;
        inner.before(params, None, names)
    }

    /// After an optimizer step: fold the parameters check; it is read with the next update
    /// of the same parameters.
    pub fn after(&self) {
        let mut inner = self.0.borrow_mut();
        let params = std::mem::take(&mut inner.params);
        inner.guard.after_update(&params);
        inner.backward_pending = false;
    }

    /// Before an update that passed its checks (`rollback = N`): refreshes the snapshot of
    /// the parameters, `optimizer_state` and the buffers when it is `N` updates old (or the
    /// optimizer's state changed shape). Device copies, no host read.
    pub fn refresh_snapshot(&self, optimizer_state: impl FnOnce() -> Vec<Tensor>) {
        self.0.borrow_mut().refresh_snapshot(optimizer_state)
    }

    /// A tensor bound by `let` (the `forward` check).
    pub fn bind(&self, t: &Tensor, name: &'static str, line: u32, kind: &'static str) {
        self.0.borrow_mut().guard.bind(t, name, line, kind)
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
    buffers: Vec<Buffers>,
    /// The `VarStore`s known at entry, whose variables a plain `.step()` must not change.
    var_stores: Vec<std::sync::Arc<std::sync::Mutex<tch::nn::Variables>>>,
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
        let key = self.guard.key();
        self.verdict(r, key)
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
        let key = self.guard.key();
        if let Some(n) = self.guard.last_grad_norm() {
            self.site.set_last_norm(n);
            let threshold = max_norm
                .or(self.config().max_norm)
                .or(self.guard.last_clip_threshold());
            if let Some(m) = threshold.filter(|m| n > *m) {
                self.site.clipped.fetch_add(1, Relaxed);
                crate::events::clipped(self.site.name(), self.guard.step(), n, m);
            }
        }
        self.params = params;
        self.verdict(r.map(|_| ()), key)
    }

    fn verdict(&mut self, r: Result<(), GuardError>, key: Key) -> Verdict {
        self.judge(r, key, false)
    }

    fn before_deferred(
        &mut self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Result<(Tensor, Option<Tensor>), GuardError> {
        let (previous, now) =
            self.guard
                .before_update_deferred(&params, max_norm, Some(&Sources(names)));
        let key = self.guard.key();
        self.params = params;
        if let Verdict::Fail(e) = self.judge(previous.map_or(Ok(()), Err), key, true) {
            // This update is refused with the earlier one: its grads go too.
            StepGuard::zero_grads(&self.params);
            return Err(e);
        }
        let (found_inf, grad_scale) = now?;
        if !self.buffers.is_empty() {
            let own: Vec<&Buffers> = self.buffers.iter().filter(|b| b.key == key).collect();
            let all: Vec<&Buffers> = if own.is_empty() {
                self.buffers.iter().collect()
            } else {
                own
            };
            for b in all {
                b.restore_if(&found_inf);
            }
        }
        Ok((found_inf, grad_scale))
    }

    /// The policy for a verdict. `on_device`: the update it judges was already skipped on the
    /// device (`sync = "deferred"`), so nothing here is zeroed or restored.
    fn judge(&mut self, r: Result<(), GuardError>, key: Key, on_device: bool) -> Verdict {
        let site = self.site;
        let state = self.guard.state();
        let mut e = match r {
            Ok(()) => {
                let mut models = state.lock();
                let m = models.model(key, None);
                m.consecutive_skips = 0;
                m.rolled_back = false;
                return Verdict::Proceed;
            }
            Err(e) => e,
        };
        let cfg = self.config();
        if e.is_overflow() {
            // Loss scaling's expected skip, under every policy; not a failure, not counted
            // toward `max_skips`.
            self.backward_pending = false;
            site.overflow_skips.fetch_add(1, Relaxed);
            if !on_device {
                StepGuard::zero_grads(&self.params);
                self.restore_buffers(key);
            }
            crate::events::overflow(&e);
            return Verdict::Skip;
        }
        if cfg.rollback.is_some() && !on_device && e.rollback_heals() && self.roll_back(key, &e) {
            return Verdict::Skip;
        }
        if cfg.on_nan == OnNan::Skip && e.is_skippable() {
            let n = {
                let mut models = state.lock();
                let m = models.model(key, None);
                if m.last_skip_call != Some(e.call) {
                    m.consecutive_skips += 1;
                    m.last_skip_call = Some(e.call);
                }
                let n = m.consecutive_skips;
                if n > cfg.max_skips {
                    m.consecutive_skips = 0;
                }
                n
            };
            if n > cfg.max_skips && cfg.rollback.is_some() && !on_device && self.roll_back(key, &e)
            {
                // Skips that persist: the parameters themselves are bad.
                return Verdict::Skip;
            }
            if n <= cfg.max_skips {
                // The skipped update used the grads: a later `.step()` is not an unseen one.
                self.backward_pending = false;
                site.skipped.fetch_add(1, Relaxed);
                if e.check == crate::Check::Spike {
                    site.spikes.fetch_add(1, Relaxed);
                }
                if !on_device {
                    StepGuard::zero_grads(&self.params);
                    self.restore_buffers(key);
                }
                crate::events::skipped(&e, n, cfg.max_skips);
                site.announce_skip(&e);
                return Verdict::Skip;
            }
            e.consecutive_skips = Some(n - 1);
        }
        site.failures.fetch_add(1, Relaxed);
        crate::events::failed(&e);
        Verdict::Fail(e)
    }

    /// Restores the buffers of the model whose update was skipped (all of them when the
    /// update's parameters are not a known `VarStore`'s).
    fn restore_buffers(&self, key: Key) {
        let own: Vec<&Buffers> = self.buffers.iter().filter(|b| b.key == key).collect();
        if own.is_empty() {
            self.buffers.iter().for_each(Buffers::restore);
        } else {
            own.into_iter().for_each(Buffers::restore);
        }
    }
}

impl Drop for CtxInner<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if self.manual {
            let params = std::mem::take(&mut self.params);
            self.guard.after_update(&params);
        }
    }
}
