//! Loss scaling's part of a guarded step: the loss scaled before backward, the grads unscaled
//! before the update (or the unscale planned for a fused kernel), the scale noted when read and
//! updated when the call ends. The scaler itself lives in the [`GuardState`]; what one call
//! found is its [`CallScaling`](crate::amp::CallScaling).
//!
//! [`GuardState`]: crate::GuardState

use crate::error::TorchError;
use tch::Tensor;

use super::StepGuard;
use crate::amp::{DeferredScale, ScalePlan, Scaler, Unscaled};
use crate::error::GuardError;

/// Loss scaling's part of one update: the grads unscaled now (their verdict read with the
/// step), or the unscale planned for a fused optimizer's kernel.
#[derive(Debug)]
pub(super) enum Scaling {
    Unscaled(Unscaled),
    Planned(DeferredScale),
}

impl Scaling {
    /// `found_inf` of the update's grads (0-dim f32, > 0 on overflow).
    pub(super) fn found_inf(&self) -> &Tensor {
        match self {
            Scaling::Unscaled(u) => &u.found_inf,
            Scaling::Planned(p) => &p.found_inf,
        }
    }

    /// [`Scaling::found_inf`], to be replaced by the ranks' common one.
    pub(super) fn found_inf_mut(&mut self) -> &mut Tensor {
        match self {
            Scaling::Unscaled(u) => &mut u.found_inf,
            Scaling::Planned(p) => &mut p.found_inf,
        }
    }

    /// The scale the kernel divides the grads by, when it unscales them.
    pub(super) fn kernel(&self) -> Option<&Tensor> {
        match self {
            Scaling::Planned(p) => p.kernel.as_ref(),
            Scaling::Unscaled(_) => None,
        }
    }
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
        crate::amp::note_bf16_loss_scale(loss, self.origin.function);
        let r = {
            let mut models = self.state.lock();
            let scaler = models
                .scaler
                .get_or_insert_with(|| Scaler::new(params, loss.device()));
            scaler.scaled_pending = true;
            scaler.scale_loss(loss)
        };
        self.scaling.scaled_after_update = true;
        r.map(Some)
            .map_err(|e| self.device_error(e.into(), self.next_update()))
    }

    /// Unscales the grads a scaled loss produced, as `plan` (taken with the update's state)
    /// says (`deferred`: or plans for the fused kernel to). `None` without a scaler (no loss
    /// was ever scaled): whatever this function's configuration, a function sharing the state
    /// with one that scales its loss unscales what that one scaled. No host read.
    pub(super) fn unscale(
        &mut self,
        plan: Option<ScalePlan>,
        params: &[Tensor],
        grads: Option<&[Tensor]>,
    ) -> Result<Option<Scaling>, TorchError> {
        self.scaling.scaled_after_update = false;
        let Some(plan) = plan else {
            return Ok(None);
        };
        if let Some(u) = self.update.as_mut() {
            u.unscaled = params.iter().map(Tensor::shallow_clone).collect();
        }
        match grads {
            None => plan.unscale_update().map(|u| Some(Scaling::Unscaled(u))),
            Some(grads) => plan.plan_deferred(grads).map(|p| Some(Scaling::Planned(p))),
        }
    }

    /// Notes the scale the host just read, and counts an overflow (when the update's state
    /// goes back).
    pub(super) fn note_scale(&mut self, scale: f64, overflow: bool) {
        match self.update.as_mut() {
            Some(u) => u.scale_read = Some((scale, overflow)),
            None => {
                if let Some(s) = self.state.lock().scaler.as_mut() {
                    s.note(scale, overflow);
                }
            }
        }
    }

    /// The scaler's numbers (the state's scaler, else this configuration's).
    pub(super) fn loss_scale(&self) -> crate::amp::LossScale {
        let params = match &self.update {
            Some(u) => u.scaler,
            None => self.state.lock().scaler.as_ref().map(Scaler::params),
        };
        params.or(self.config.loss_scale).unwrap_or_default()
    }

    /// GradScaler.update, once per call with updates (see [`Scaler::end_call`]).
    pub(super) fn update_scale(&mut self) {
        let found = std::mem::take(&mut self.scaling.updates);
        if found.is_empty() {
            return;
        }
        let mut models = self.state.lock();
        if let Some(scaler) = models.scaler.as_mut() {
            // A loss scaled after the call's last update (`step(); backward()`) keeps its
            // grads scaled for the next call's update.
            scaler.end_call(&found, !self.scaling.scaled_after_update);
        }
    }
}
