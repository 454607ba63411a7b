//! Dynamic loss scaling in the step: the loss scaled before backward, the grads unscaled (and
//! their overflow folded into the step's flag) before the update, the scale updated on the
//! device when the call ends.

use tch::Tensor;

use super::StepGuard;
use crate::amp::Scaler;
use crate::error::{Check, Diagnosis, GuardError};

/// What unscaling left for the step's read.
#[derive(Debug)]
pub(super) struct Unscaled {
    /// The scale the grads were unscaled by (0-dim f32), read with the step's flags.
    pub scale: Tensor,
    /// `found_inf` of the unscale (0-dim f32, > 0 on overflow).
    pub found_inf: Tensor,
}

/// How an update under `sync = "deferred"` deals with the scale.
#[derive(Debug)]
pub(super) struct DeferredScale {
    /// 0-dim f32, > 0 when a grad overflowed.
    pub found_inf: Tensor,
    /// The scale for the kernel to divide the grads by, when it unscales them.
    pub kernel: Option<Tensor>,
    /// The scale now (a copy), for the verdict read later.
    pub scale_now: Tensor,
    /// The scaler's numbers.
    pub params: crate::amp::LossScale,
}

impl StepGuard<'_> {
    /// Records the loss (as [`StepGuard::loss`]) and returns what to call `backward()` on:
    /// `loss * scale` under dynamic loss scaling, else the loss itself. No host read.
    ///
    /// # Errors
    /// What libtorch reports while scaling (a loss on an unusable device).
    pub fn scale_loss(&mut self, loss: &Tensor) -> Result<Tensor, GuardError> {
        self.loss(loss);
        Ok(self.scaled(loss)?.unwrap_or_else(|| loss.shallow_clone()))
    }

    /// `loss * scale` under dynamic loss scaling (the scaler created, on the loss's device, at
    /// the first scaled loss of the state), `None` without.
    pub(crate) fn scaled(&mut self, loss: &Tensor) -> Result<Option<Tensor>, GuardError> {
        let Some(params) = self.config.loss_scale else {
            return Ok(None);
        };
        crate::amp::note_bf16_loss_scale(loss, self.function);
        let r = {
            let mut models = self.state.lock();
            let scaler = models
                .scaler
                .get_or_insert_with(|| Scaler::new(params, loss.device()));
            scaler.scaled_pending = true;
            scaler.scale_loss(loss)
        };
        self.scaled_after_update = true;
        r.map(Some)
            .map_err(|e| self.device_error(e.to_string(), self.call))
    }

    /// Unscales those of `grads` that a scaled loss produced and no update unscaled yet. No
    /// host read. `None` without a scaler (no loss was ever scaled).
    pub(super) fn unscale(&mut self, params: &[Tensor]) -> Result<Option<Unscaled>, String> {
        // Whatever this function's own configuration: a function sharing the state (`state =
        // ...`) with one that scales its loss unscales what that one scaled.
        self.scaled_after_update = false;
        let mut models = self.state.lock();
        let Some(scaler) = models.scaler.as_mut() else {
            return Ok(None);
        };
        let todo = scaler.still_scaled(params);
        let found_inf = scaler.unscale(&todo)?;
        scaler.mark_unscaled(params);
        self.unscaling = true;
        Ok(Some(Unscaled {
            scale: scaler.scale(),
            found_inf,
        }))
    }

    /// Under `sync = "deferred"`: when every grad still carries the scale, they are left scaled
    /// for the fused kernel to unscale (`kernel`: the scale, divided by in the kernel) and only
    /// checked for overflow; otherwise those that carry it are unscaled here. `None` without a
    /// scaler. No host read.
    pub(super) fn plan_deferred(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
    ) -> Result<Option<DeferredScale>, String> {
        self.scaled_after_update = false;
        let mut models = self.state.lock();
        let Some(scaler) = models.scaler.as_mut() else {
            return Ok(None);
        };
        let todo = scaler.still_scaled(params);
        let all = !grads.is_empty() && todo.len() == grads.len();
        let found_inf = if all {
            scaler.check_overflow(grads)?
        } else {
            scaler.unscale(&todo)?
        };
        scaler.mark_unscaled(params);
        self.unscaling = true;
        Ok(Some(DeferredScale {
            found_inf,
            kernel: all.then(|| scaler.scale()),
            scale_now: scaler.scale_now(),
            params: scaler.params(),
        }))
    }

    /// After an update that unscaled grads: notes them as unscaled as they are now (clipping
    /// and a fused kernel write them, which moves their version counters).
    pub(super) fn mark_after_update(&mut self, params: &[Tensor]) {
        if !std::mem::take(&mut self.unscaling) {
            return;
        }
        if let Some(s) = self.state.lock().scaler.as_mut() {
            s.mark_unscaled(params);
        }
    }

    /// Notes the scale the host just read, and counts an overflow.
    pub(super) fn note_scale(&self, scale: f64, overflow: bool) {
        if let Some(s) = self.state.lock().scaler.as_mut() {
            s.last_read = Some(scale);
            s.overflows += u64::from(overflow);
        }
    }

    /// The grads overflowed at `scale` while the loss and the parameters were finite: an
    /// expected skip (the scale backs off), or, at `min_scale`, a failure naming the grads.
    pub(super) fn overflow_error(
        &self,
        scale: f64,
        step: u64,
        tensors: impl FnOnce() -> Vec<crate::report::TensorReport>,
    ) -> GuardError {
        let params = self.state.lock().scaler.as_ref().map(Scaler::params);
        let params = params.or(self.config.loss_scale).unwrap_or_default();
        let (min_scale, backoff) = (params.min_scale, params.backoff_factor);
        if scale > min_scale {
            self.note_scale(scale, true);
            let next = (scale * backoff).max(min_scale);
            let d = Diagnosis::Overflow { scale, next };
            return self.error(Check::Grads, Vec::new(), d, step);
        }
        self.note_scale(scale, false);
        let d = Diagnosis::ScaleExhausted { scale };
        self.error(Check::Grads, tensors(), d, step)
    }

    /// Keeps an update's overflow indicator for the scale update at the end of the call.
    pub(super) fn keep_for_update(&mut self, found_inf: Tensor) {
        self.scale_updates.push(found_inf);
    }

    /// GradScaler.update, once per call with updates: the updates' `found_inf` summed, on the
    /// device. Errors here surface at the next step's read.
    pub(super) fn update_scale(&mut self) {
        let found = std::mem::take(&mut self.scale_updates);
        if found.is_empty() {
            return;
        }
        let mut models = self.state.lock();
        let Some(scaler) = models.scaler.as_mut() else {
            return;
        };
        // A loss scaled after the call's last update (`step(); backward()`) keeps its grads
        // scaled for the next call's update.
        if !self.scaled_after_update {
            scaler.settle();
        }
        let _guard = tch::no_grad_guard();
        let device = found[0].device();
        let mut total = Ok(found[0].shallow_clone());
        for f in &found[1..] {
            total = total.and_then(|t| t.f_add(&f.f_to_device(device)?));
        }
        if let Ok(total) = total {
            let _ = scaler.update(&total);
        }
    }
}
