//! `sync = "deferred"`: the step's checks go to a fused optimizer's kernel, and its verdict is
//! read at the next update of the same parameters, by the same judge
//! ([`judge_deferred`](super::judge::judge_deferred)).

use tch::Tensor;

use super::judge::{judge_deferred, read_pending, Wait};
use super::measure::{Phases, Sink, Start};
use super::scaling::Scaling;
use super::{DeviceVerdict, StepGuard};
use crate::clip::Measured;
use crate::error::{Diagnosis, GuardError, TorchError};
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
        self.last.previous = start.deferred.is_some() || start.pending.is_some();
        let previous = match start.deferred.take() {
            Some(d) => judge_deferred(*d, start.pending.take()),
            None => start
                .pending
                .take()
                .and_then(|mut p| read_pending(&mut p, Wait::Deferred)),
        };
        if let Some(Diagnosis::Overflow { scale, .. }) = previous.as_ref().map(|e| &e.diagnosis) {
            self.note_scale(*scale, true);
        }
        let now = self.hand_to_kernel(params, max_norm, start);
        (previous, now)
    }

    /// Whether the last update read an earlier update's verdict (none before the first
    /// update of its parameters, or after a `flush()`).
    pub(crate) fn read_previous(&self) -> bool {
        self.last.previous
    }

    /// The update's phases ([`StepGuard::run_phases`]) ending in the kernel
    /// ([`Sink::Kernel`]): its checks folded into `found_inf` and its clipping into
    /// `grad_scale`, and its verdict kept (on its way to the host) for the next update.
    fn hand_to_kernel(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        mut start: Start,
    ) -> Result<DeviceVerdict, GuardError> {
        let index = start.index;
        let device_error = |g: &Self, e: TorchError| g.device_error(e, index);
        let grads = self.grads_to_measure(params, max_norm, start.scale.as_ref());
        let Phases {
            results,
            measured,
            scaling,
            spike,
            folded,
            ..
        } = self
            .run_phases(Sink::Kernel, params, &grads, max_norm, &mut start)
            .map_err(|m| device_error(self, m))?;
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let ranks = match (self.group(), results.values.ranks.as_ref()) {
            (Some(g), Some(m)) => Some((m.shallow_clone(), g.rank(), folded)),
            _ => None,
        };
        let found_inf = crate::flag::found_inf(&results.flags.own_refs(), device)
            .map_err(|m| device_error(self, m))?;
        let kernel_scale = scaling.as_ref().and_then(Scaling::kernel);
        let grad_scale = match (&measured, max_norm, kernel_scale) {
            (Some(m), Some(mx), None) => m
                .coefficient(mx)
                .and_then(|c| Ok(c.f_reciprocal()?))
                .map(Some),
            // The kernel divides by scale / coefficient: unscaled and clipped in one pass, the
            // coefficient from the unscaled norm.
            (Some(m), Some(mx), Some(s)) => m
                .coefficient_unscaled(mx, s)
                .map(Some)
                .map_err(TorchError::from),
            (_, None, Some(s)) => Ok(Some(s.shallow_clone())),
            _ => Ok(None),
        };
        let grad_scale = grad_scale.map_err(|e| device_error(self, e))?;
        let scale = match scaling {
            Some(Scaling::Planned(p)) => {
                self.scaling.updates.push(p.found_inf);
                Some((p.scale_now, p.params))
            }
            _ => None,
        };
        // The statistics take this update's values unless it is skipped on the device.
        let spike = spike.map(|s| {
            let keep = found_inf.f_neg().and_then(|f| f.f_add_scalar(1.0)).ok();
            self.accept_spike(&s, keep.as_ref());
            (s.z, self.config.spike.map_or(6.0, |c| c.sigmas))
        });
        let verdict = DeferredVerdict {
            early: results.start_early(),
            obs: start.obs,
            update: index,
            origin: self.origin(),
            params: params.iter().map(Tensor::shallow_clone).collect(),
            vars: self.update.as_ref().map_or_else(Vec::new, |u| {
                u.vars.iter().map(std::sync::Arc::downgrade).collect()
            }),
            grad_norms: measured.as_ref().and_then(Measured::per_tensor),
            protected: self.protected,
            max_norm,
            scale,
            spike,
            ranks,
        };
        self.with_model(|m| m.deferred = Some(Box::new(verdict)));
        Ok((found_inf, grad_scale))
    }
}
