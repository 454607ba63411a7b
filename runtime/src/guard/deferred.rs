//! `sync = "deferred"`: the step's checks go to a fused optimizer's kernel, and its verdict is
//! read at the next update of the same parameters.

use tch::Tensor;

use super::{DeviceVerdict, StepGuard, Update};
use crate::clip::{defined_grads, measure, Measured};
use crate::config::check_max_norm;
use crate::error::{Check, Diagnosis, GuardError};
use crate::flag::FiniteFlag;
use crate::slow_path;
use crate::sources::NameSource;
use crate::state::{DeferredVerdict, Key};

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
        let names = names.or(self.names);
        let max_norm = match max_norm
            .or(self.config.max_norm)
            .map(check_max_norm)
            .transpose()
            .and_then(|m| self.config.validate().map(|()| m))
        {
            Ok(m) => m,
            Err(e) => {
                let e = self.error(Check::Config, Vec::new(), Diagnosis::Config(e), self.call);
                return (None, Err(e));
            }
        };
        if self.config.adaptive_clip.is_some() {
            let d = Diagnosis::Config(crate::ConfigError::AdaptiveClip);
            return (
                None,
                Err(self.error(Check::Config, Vec::new(), d, self.call)),
            );
        }
        let key = Key::of(params);
        let vars = names.map(|n| n.var_stores()).unwrap_or_default();
        let own = vars.iter().find(|v| Key::of_vars(v) == key);
        let (index, pending, previous, carried) = {
            let mut models = self.state.lock();
            let m = models.model(key, own);
            let index = m.updates;
            m.updates += 1;
            let mut carried = std::mem::take(&mut m.carried);
            let (pending, previous) = (m.pending.take(), m.deferred.take());
            if key != Key::UNKNOWN {
                let unknown = std::mem::take(&mut models.model(Key::UNKNOWN, None).carried);
                carried.absorb(unknown);
            }
            (index, pending, previous, carried)
        };
        let previous = match previous {
            Some(d) => slow_path::judge_deferred(d, pending),
            None => pending.and_then(slow_path::read_pending_deferred),
        };
        if let Some(crate::Diagnosis::Overflow { scale, .. }) =
            previous.as_ref().map(|e| &e.diagnosis)
        {
            self.note_scale(*scale, true);
        }
        let mut obs = carried;
        obs.absorb(std::mem::take(&mut self.obs));
        self.update = Some(Update {
            key,
            index,
            vars: vars.clone(),
        });

        let mut pre = FiniteFlag::new();
        if self.config.checks.params {
            pre.fold_all(params);
        }
        let want_norm =
            max_norm.is_some() || self.config.checks.grads || self.config.spike.is_some();
        let grads = if want_norm || self.state().lock().scaler.is_some() {
            defined_grads(params)
        } else {
            Vec::new()
        };
        // Loss scaling: the overflow of the grads, and whether the kernel unscales them.
        let plan = match self.plan_deferred(params, &grads) {
            Ok(plan) => plan,
            Err(message) => return (previous, Err(self.device_error(message, index))),
        };
        let grads = if want_norm { grads } else { Vec::new() };
        let measured = measure(&grads, self.config.norm_type);
        let mut grads_flag = FiniteFlag::new();
        match &measured {
            Some(Measured::Host(_, total)) if self.config.checks.grads => {
                grads_flag.fold_host(total.is_finite())
            }
            Some(Measured::Device { total, .. }) if self.config.checks.grads => {
                grads_flag.fold(total)
            }
            _ => {}
        }
        let device = params.first().map_or(tch::Device::Cpu, tch::Tensor::device);
        let overflow_flag = plan
            .as_ref()
            .map(|p| FiniteFlag::of_indicator(&p.found_inf))
            .unwrap_or_default();
        // Spike detection on the (unscaled) total norm and the loss; into `found_inf` too.
        let kernel_scale = plan.as_ref().and_then(|p| p.kernel.as_ref());
        let clipping = max_norm.is_some();
        let spike = match self.judge_spike(key, &obs, measured.as_ref(), kernel_scale, clipping) {
            Ok((_, s)) => s,
            Err(message) => return (previous, Err(self.device_error(message, index))),
        };
        let spike_flag = spike
            .as_ref()
            .map(|s| FiniteFlag::of_indicator(&s.judged.spike))
            .unwrap_or_default();
        let found_inf = crate::flag::found_inf(
            &[&pre, &obs.flag, &grads_flag, &overflow_flag, &spike_flag],
            device,
        );
        let found_inf = match found_inf {
            Ok(f) => f,
            Err(message) => return (previous, Err(self.device_error(message, index))),
        };
        let grad_scale = match (&measured, max_norm, kernel_scale) {
            (Some(m), Some(mx), None) => Ok(Some(m.coefficient(mx).reciprocal())),
            // The kernel divides by scale / coefficient: unscaled and clipped in one pass, the
            // coefficient from the unscaled norm.
            (Some(m), Some(mx), Some(s)) => m.coefficient_unscaled(mx, s).map(Some),
            (_, None, Some(s)) => Ok(Some(s.shallow_clone())),
            _ => Ok(None),
        };
        let grad_scale = match grad_scale {
            Ok(g) => g,
            Err(e) => return (previous, Err(self.device_error(e.to_string(), index))),
        };
        let scale = plan.map(|p| {
            self.keep_for_update(p.found_inf);
            (p.scale_now, p.params)
        });
        // The statistics take this update's values unless it is skipped on the device.
        let spike = spike.map(|s| {
            let keep = found_inf.f_neg().and_then(|f| f.f_add_scalar(1.0)).ok();
            self.accept_spike(key, &s, keep.as_ref());
            (s.judged.z, self.config.spike.map_or(6.0, |c| c.sigmas))
        });
        let grad_norms = measured.as_ref().and_then(Measured::per_tensor);
        let early = crate::flag::EarlyRead::start(vec![
            pre,
            std::mem::take(&mut obs.flag),
            grads_flag,
            overflow_flag,
            spike_flag,
        ]);
        let verdict = DeferredVerdict {
            early,
            obs,
            update: index,
            call: self.call,
            function: self.function,
            location: self.location,
            params: params.iter().map(Tensor::shallow_clone).collect(),
            vars: vars.iter().map(std::sync::Arc::downgrade).collect(),
            grad_norms,
            protected: self.protected,
            max_norm,
            scale,
            spike,
        };
        self.state.lock().model(key, None).deferred = Some(verdict);
        (previous, Ok((found_inf, grad_scale)))
    }
}
