//! Before the optimizer step: clipping, unscaling, every check folded and read with one host
//! read, and the slow path that explains a failure.

use tch::Tensor;

use super::{StepGuard, Update};
use crate::clip::{defined_grads, measure, Measured};
use crate::config::check_max_norm;
use crate::diagnose::{diagnose, Evidence};
use crate::error::{Check, Diagnosis, GuardError};
use crate::flag::{read_slots, FiniteFlag, StepValues, ValueId};
use crate::slow_path;
use crate::sources::NameSource;
use crate::state::Key;

impl StepGuard<'_> {
    /// Clips (when `max_norm` is set) and checks the grads of `params`, then reads every check
    /// folded so far with one host read. Returns the total grad norm (a device tensor) when it
    /// was computed. On failure, finds the offending tensors and diagnoses the cause.
    pub fn before_update(&mut self, params: &[Tensor]) -> Result<Option<Tensor>, GuardError> {
        self.before_update_with(params, None, None)
    }

    /// [`StepGuard::before_update`] with a `max_norm` for this call and names given now. A
    /// rejected update's grads are cleared ([`GuardError::rejects_grads`]): a later backward
    /// must not add onto them.
    pub(crate) fn before_update_with(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
    ) -> Result<Option<Tensor>, GuardError> {
        let r = self.check_update(params, max_norm, names);
        if let Err(e) = &r {
            if e.rejects_grads() {
                StepGuard::zero_grads(params);
            }
        }
        r
    }

    fn check_update(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
    ) -> Result<Option<Tensor>, GuardError> {
        let names = names.or(self.names);
        // Every number is checked before anything is clipped or read.
        let max_norm = match max_norm
            .or(self.config.max_norm)
            .map(check_max_norm)
            .transpose()
            .and_then(|m| self.config.norm_type.validate().map(|_| m))
        {
            Ok(m) => m,
            Err(e) => {
                return Err(self.error(Check::Config, Vec::new(), Diagnosis::Config(e), self.call))
            }
        };
        let key = Key::of(params);
        let vars = names.map(|n| n.var_stores()).unwrap_or_default();
        let own = vars.iter().find(|v| Key::of_vars(v) == key);
        let (index, pending, carried) = {
            let mut models = self.state.lock();
            let m = models.model(key, own);
            let index = m.updates;
            m.updates += 1;
            let mut carried = std::mem::take(&mut m.carried);
            let pending = m.pending.take();
            if key != Key::UNKNOWN {
                let unknown = std::mem::take(&mut models.model(Key::UNKNOWN, None).carried);
                carried.absorb(unknown);
            }
            (index, pending, carried)
        };
        let mut obs = carried;
        obs.absorb(std::mem::take(&mut self.obs));
        self.update = Some(Update { key, index, vars });

        let mut pre = FiniteFlag::new();
        if self.config.checks.params {
            pre.fold_all(params);
        }
        // Clipping and the grads check: the total norm, computed where the grads allow, of
        // the grads unscaled first under loss scaling (as PyTorch documents for clipping).
        let want_norm = max_norm.is_some()
            || self.config.adaptive_clip.is_some()
            || self.config.checks.grads
            || self.config.spike.is_some();
        let grads = if want_norm || self.state().lock().scaler.is_some() {
            defined_grads(params)
        } else {
            Vec::new()
        };
        let unscaled = match self.unscale(params) {
            Ok(u) => u,
            Err(message) => return Err(self.device_error(message, index)),
        };
        let mut overflow = unscaled
            .as_ref()
            .map(|u| FiniteFlag::of_indicator(&u.found_inf))
            .unwrap_or_default();
        let grads = if want_norm { grads } else { Vec::new() };
        let measured = measure(&grads, self.config.norm_type);
        // Spike detection on the loss and the total norm before clipping; adaptive clipping's
        // threshold from the same statistics.
        let (threshold, spike) =
            match self.judge_spike(key, &obs, measured.as_ref(), None, max_norm.is_some()) {
                Ok(r) => r,
                Err(message) => return Err(self.device_error(message, index)),
            };
        let (mut spike_flag, z) = match &spike {
            Some(s) => (
                FiniteFlag::of_indicator(&s.judged.spike),
                Some(s.judged.z.shallow_clone()),
            ),
            None => (FiniteFlag::new(), None),
        };
        if let (Some(m), Some(max_norm)) = (&measured, max_norm) {
            m.clip(max_norm);
        }
        if let (Some(m), Some(t)) = (&measured, &threshold) {
            m.clip_to(t);
        }
        let mut grads_flag = FiniteFlag::new();
        let device_norm = match &measured {
            Some(Measured::Host(_, total)) if self.config.checks.grads => {
                grads_flag.fold_host(total.is_finite());
                None
            }
            Some(Measured::Device { total, .. }) => {
                if self.config.checks.grads {
                    grads_flag.fold(total);
                }
                Some(total)
            }
            _ => None,
        };
        let mut pending = pending;
        let mut pending_flag = pending
            .as_mut()
            .map(|p| std::mem::take(&mut p.flag))
            .unwrap_or_default();
        let flags_empty = pending_flag.is_empty()
            && pre.is_empty()
            && obs.flag.is_empty()
            && grads_flag.is_empty()
            && overflow.is_empty()
            && spike_flag.is_empty();
        // The values read with the flags: the norm (only with a flag to read: alone it would be
        // a read of its own), the loss scale, the adaptive threshold, the z-scores.
        let mut values = StepValues::default();
        let norm_id = device_norm.filter(|_| !flags_empty).map(|n| values.add(n));
        let scale_id = unscaled.as_ref().map(|u| values.add(&u.scale));
        let threshold_id = threshold.as_ref().map(|t| values.add(t));
        let z_id = z.as_ref().map(|z| values.add(z));
        let read = read_slots(
            &mut [
                &mut pending_flag,
                &mut pre,
                &mut obs.flag,
                &mut grads_flag,
                &mut overflow,
                &mut spike_flag,
            ],
            &values.to_read(),
        );
        let (mut oks, read) = match read {
            Ok(r) => r,
            Err(message) => return Err(self.device_error(message, index)),
        };
        let value = |id: Option<ValueId>| id.and_then(|id| values.get(id, &read));
        let first = |id| value(id).and_then(|v| v.first().copied());
        self.last_norm = match &measured {
            Some(Measured::Host(_, n)) => Some(*n),
            _ => first(norm_id),
        };
        self.last_threshold = first(threshold_id);
        let scale_read = first(scale_id);
        let z_read = match value(z_id) {
            Some(v) if v.len() == 2 => [v[0], v[1]],
            _ => [f64::NAN; 2],
        };
        let mut total = measured.as_ref().map(Measured::tensor);
        if let (Some(u), Some(s)) = (&unscaled, scale_read) {
            if !oks[4] && oks[..3] == [true; 3] {
                // The grads overflowed at the scale: an expected skip, unless at `min_scale`.
                self.keep_for_update(u.found_inf.shallow_clone());
                let names_now = names.map(|n| n.names());
                return Err(self.overflow_error(s, index, || {
                    self.bad_grads(measured.as_ref(), params, names_now.as_ref())
                }));
            }
        }
        if !oks[3] {
            if let Some((n, exact)) = self.rescue_overflow(measured.as_ref(), params, max_norm) {
                oks[3] = true;
                self.last_norm = Some(n);
                total = Some(exact);
            }
        }
        if oks.iter().all(|ok| *ok) {
            if let (Some(u), Some(s)) = (&unscaled, scale_read) {
                self.note_scale(s, false);
                self.keep_for_update(u.found_inf.shallow_clone());
            }
            if let Some(s) = &spike {
                self.accept_spike(key, s, None);
            }
            return Ok(total);
        }
        if !oks[5] && oks[..5] == [true; 5] {
            // Everything finite, but the loss or the grad norm spiked: skipped like a
            // non-finite step, its statistics left out.
            if let (Some(u), Some(s)) = (&unscaled, scale_read) {
                self.note_scale(s, false);
                self.keep_for_update(u.found_inf.shallow_clone());
            }
            return Err(self.spike_error(z_read, index));
        }
        let bad_update = match (&pending, oks[0]) {
            (Some(p), false) => slow_path::bad_update(p).map(|bad| (p.update, bad)),
            _ => None,
        };
        let names_now = names.map(|n| n.names());
        let mut evidence = Evidence {
            bad_update,
            protected: self.protected,
            grad_norm: self.last_norm,
            max_norm,
            ..Evidence::default()
        };
        // Corrupted parameters (of this update, or of any model the step names) explain
        // whatever failed downstream of them.
        if evidence.bad_update.is_none() {
            evidence.params_before = slow_path::scan_params(params, names, names_now.as_ref());
        }
        if !oks[2] {
            slow_path::forward(&obs, self.call, params, names_now.as_ref(), &mut evidence);
        }
        if !oks[3] {
            evidence.grads = Some(self.bad_grads(measured.as_ref(), params, names_now.as_ref()));
        }
        match diagnose(evidence) {
            Some(f) => Err(self.error(
                f.check,
                f.tensors,
                f.diagnosis,
                f.earlier_update.unwrap_or(index),
            )),
            None => Ok(total),
        }
    }
}
