//! `sync = "deferred"`: the step's checks go to a fused optimizer's kernel, and its verdict is
//! read at the next update of the same parameters, by the same judge
//! ([`judge_deferred`](super::judge::judge_deferred)).

use tch::Tensor;

use super::judge::{judge_deferred, read_pending, Wait};
use super::results::StepResults;
use super::slot::Slot;
use super::{DeviceVerdict, StepGuard};
use crate::clip::{measure, Measured};
use crate::error::{Diagnosis, GuardError};
use crate::flag::FiniteFlag;
use crate::sources::NameSource;
use crate::state::DeferredVerdict;

impl StepGuard<'_> {
    /// [`StepGuard::before_update`] for `sync = "deferred"`: nothing is read now. The previous
    /// update's verdict (and its parameters check) is read without waiting and explained
    /// (the first value: `Some(error)` when that update was skipped on the device, or made the
    /// parameters non-finite); this update's checks and clipping coefficient come back as
    /// `found_inf` and `grad_scale` for a fused optimizer's kernel, and its verdict is kept for
    /// the next update of the same parameters (or `flush()`).
    pub(crate) fn before_update_deferred(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
    ) -> (Option<GuardError>, Result<DeviceVerdict, GuardError>) {
        let names = names.or(self.known.names);
        let max_norm = match self.max_norm_now(max_norm) {
            Ok(m) => m,
            Err(e) => return (None, Err(e)),
        };
        if self.config.adaptive_clip.is_some() {
            let d = Diagnosis::Config(crate::ConfigError::AdaptiveClip);
            return (None, Err(self.config_error(d)));
        }
        let mut start = self.start_update(params, names);
        let previous = match start.deferred.take() {
            Some(d) => judge_deferred(d, start.pending.take()),
            None => start
                .pending
                .take()
                .and_then(|p| read_pending(p, Wait::Deferred)),
        };
        if let Some(Diagnosis::Overflow { scale, .. }) = previous.as_ref().map(|e| &e.diagnosis) {
            self.note_scale(*scale, true);
        }
        let now = self.hand_to_kernel(params, max_norm, start);
        (previous, now)
    }

    /// Folds this update's checks into `found_inf` and its clipping into `grad_scale` for the
    /// kernel, and keeps its verdict (on its way to the host) for the next update.
    fn hand_to_kernel(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        start: super::measure::Start,
    ) -> Result<DeviceVerdict, GuardError> {
        let super::measure::Start {
            key,
            index,
            mut obs,
            vars,
            folded,
            ..
        } = start;
        let device_error = |g: &Self, message: String| g.device_error(message, index);
        let mut results = StepResults::default();
        let folded = folded
            .filter(|f| f.covers(None, self.config.checks.params))
            .map(|f| f.matrix);
        if folded.is_none() {
            results.flags[Slot::ParamsBefore] = self.params_flag(params);
        }
        let grads = self.grads_to_measure(params, max_norm, true);
        // Loss scaling: the overflow of the grads, and whether the kernel unscales them.
        let plan = self
            .plan_deferred(params, &grads)
            .map_err(|m| device_error(self, m))?;
        let grads = if self.wants_norm(max_norm) {
            grads
        } else {
            Vec::new()
        };
        let measured = measure(&grads, self.config.norm_type);
        results.flags[Slot::Grads] = self.grads_flag(measured.as_ref());
        if let Some(p) = &plan {
            results.flags[Slot::Overflow] = FiniteFlag::of_indicator(&p.found_inf);
        }
        results.flags[Slot::Forward] = std::mem::take(&mut obs.flag);
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        // With a process group, every rank's verdicts and the mean of their losses, so that
        // the kernel skips (and the scale backs off) on every rank alike.
        let mut plan = plan;
        let agreed = self
            .agree_ranks(
                &mut results,
                folded,
                &obs,
                Some(device),
                plan.as_mut().map(|p| &mut p.found_inf),
            )
            .map_err(|m| device_error(self, m))?;
        let is_folded = agreed.as_ref().is_some_and(|a| a.folded);
        let loss = || match agreed {
            Some(a) => a.loss,
            None => obs.mean_loss(),
        };
        // Spike detection on the (unscaled) total norm and the loss; into `found_inf` too.
        let kernel_scale = plan.as_ref().and_then(|p| p.kernel.as_ref());
        let clipping = max_norm.is_some();
        let (_, spike) = self
            .judge_spike(key, loss, &obs, measured.as_ref(), kernel_scale, clipping)
            .map_err(|m| device_error(self, m))?;
        if let Some(s) = &spike {
            results.flags[Slot::Spike] = FiniteFlag::of_indicator(&s.spike);
        }
        let ranks = match (self.group(), results.values.ranks.as_ref()) {
            (Some(g), Some(m)) => Some((m.shallow_clone(), g.rank(), is_folded)),
            _ => None,
        };
        let found_inf = crate::flag::found_inf(&results.flags.own_refs(), device)
            .map_err(|m| device_error(self, m))?;
        let grad_scale = match (&measured, max_norm, kernel_scale) {
            (Some(m), Some(mx), None) => Ok(Some(m.coefficient(mx).reciprocal())),
            // The kernel divides by scale / coefficient: unscaled and clipped in one pass, the
            // coefficient from the unscaled norm.
            (Some(m), Some(mx), Some(s)) => m.coefficient_unscaled(mx, s).map(Some),
            (_, None, Some(s)) => Ok(Some(s.shallow_clone())),
            _ => Ok(None),
        };
        let grad_scale = grad_scale.map_err(|e| device_error(self, e.to_string()))?;
        let scale = plan.map(|p| {
            self.scaling.updates.push(p.found_inf);
            (p.scale_now, p.params)
        });
        // The statistics take this update's values unless it is skipped on the device.
        let spike = spike.map(|s| {
            let keep = found_inf.f_neg().and_then(|f| f.f_add_scalar(1.0)).ok();
            self.accept_spike(key, &s, keep.as_ref());
            (s.z, self.config.spike.map_or(6.0, |c| c.sigmas))
        });
        let verdict = DeferredVerdict {
            early: results.start_early(),
            obs,
            update: index,
            origin: self.origin(),
            params: params.iter().map(Tensor::shallow_clone).collect(),
            vars: vars.iter().map(std::sync::Arc::downgrade).collect(),
            grad_norms: measured.as_ref().and_then(Measured::per_tensor),
            protected: self.protected,
            max_norm,
            scale,
            spike,
            ranks,
        };
        self.state.lock().model(key, None).deferred = Some(verdict);
        Ok((found_inf, grad_scale))
    }
}
