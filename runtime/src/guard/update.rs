//! Before the optimizer step (`sync = "every_step"`): the update's phases
//! ([`StepGuard::run_phases`]) end in the host read ([`Sink::Read`]): clip, read every check
//! folded into the step's [`StepResults`](super::results::StepResults) with one host read, judge, and explain a failure on
//! the slow path.

use tch::Tensor;

use super::explain::{bad_grads, rescue_overflow, scan_params, Subject};
use super::judge::{judge, Judgement};
use super::measure::{Phases, Sink, Start};
use super::results::Read;
use super::scaling::Scaling;
use super::slot::Slot;
use super::StepGuard;
use crate::amp::Unscaled;
use crate::clip::{defined_grads, Measured};
use crate::error::{Check, GuardError};
use crate::shim::Grads;
use crate::sources::NameSource;
use crate::spike::Judged;

/// What the measure phase left for the judge.
struct Measures<'g> {
    measured: Option<Measured<'g>>,
    unscaled: Option<Unscaled>,
    spike: Option<Judged>,
    /// The ranks' verdicts came folded into the gradients' last bucket.
    folded: bool,
    /// The caller wants the total norm as a tensor.
    want_total: bool,
}

impl StepGuard<'_> {
    /// Clips (when `max_norm` is set) and checks the grads of `params`, then reads every check
    /// folded so far with one host read. Returns the total grad norm (a device tensor) when it
    /// was computed. On failure, finds the offending tensors and diagnoses the cause.
    ///
    /// This applies no policy and leaves the grads as they are: [`StepGuard::decide`] does
    /// (skips, loss-scaling overflows, rollback, and clearing the grads of a rejected update
    /// so that a later backward cannot add onto them), as `#[guarded_step]` does.
    pub fn before_update(&mut self, params: &[Tensor]) -> Result<Option<Tensor>, GuardError> {
        self.check_update(params, None, None, true)
    }

    /// [`StepGuard::before_update`] with a `max_norm` for this call and names given now,
    /// without the total norm as a tensor (on the CPU fast path, making one costs more than
    /// the rest of a small step's checks).
    pub(crate) fn before_update_with(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
    ) -> Result<(), GuardError> {
        self.check_update(params, max_norm, names, false).map(drop)
    }

    fn check_update(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
        want_total: bool,
    ) -> Result<Option<Tensor>, GuardError> {
        let names = names.or(self.known.names);
        let max_norm = self.max_norm_now(max_norm)?;
        let mut start = self.start_update(params, names);
        let index = start.index;
        let grads = self.grads_to_measure(params, max_norm, None);
        let phases = self
            .run_phases(Sink::Read, params, &grads, max_norm, &mut start)
            .map_err(|message| self.device_error(message, index))?;
        let Phases {
            mut results,
            measured,
            scaling,
            spike,
            threshold,
            folded,
        } = phases;
        // Clipping: a constant `max_norm`, or the adaptive threshold.
        let clipped = (|| {
            if let (Some(m), Some(max_norm)) = (&measured, max_norm) {
                m.clip(max_norm)?;
            }
            if let (Some(m), Some(t)) = (&measured, &threshold) {
                m.clip_to(t)?;
            }
            Ok(())
        })();
        clipped.map_err(|message| self.device_error(message, index))?;
        results.values.threshold = threshold;
        if let Some(Measured::Device { total, .. }) = &measured {
            results.values.norm = Some(total.shallow_clone());
        }
        let read = results
            .read()
            .map_err(|message| self.device_error(message, index))?;
        let unscaled = match scaling {
            Some(Scaling::Unscaled(u)) => Some(u),
            _ => None,
        };
        let m = Measures {
            measured,
            unscaled,
            spike,
            folded,
            want_total,
        };
        self.conclude(read, m, params, max_norm, names, &start)
    }

    /// The grads the update measures: when a norm is wanted, or the scaler needs them
    /// (`scale`: the update's plan, when the kernel unscales); else none, nothing read.
    pub(super) fn grads_to_measure<'p>(
        &self,
        params: &'p [Tensor],
        max_norm: Option<f64>,
        scale: Option<&crate::amp::ScalePlan>,
    ) -> Grads<'p> {
        if self.wants_norm(max_norm) || scale.is_some() {
            defined_grads(params)
        } else {
            Grads::none()
        }
    }

    /// Whether the update needs the total norm: clipping, the grads check, statistics.
    pub(super) fn wants_norm(&self, max_norm: Option<f64>) -> bool {
        max_norm.is_some()
            || self.config.adaptive_clip.is_some()
            || self.config.checks.grads
            || self.config.spike.is_some()
    }

    /// Judges the read and acts on it: the scale noted and kept for its update, the
    /// statistics fed, or the failure explained.
    fn conclude(
        &mut self,
        read: Read,
        m: Measures<'_>,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
        start: &Start,
    ) -> Result<Option<Tensor>, GuardError> {
        let index = start.index;
        self.last.norm = match &m.measured {
            Some(Measured::Host(_, n)) => Some(*n),
            _ => read.norm,
        };
        self.last.threshold = read.threshold;
        let mut total = m
            .measured
            .as_ref()
            .filter(|_| m.want_total)
            .map(Measured::tensor);
        let scale = m.unscaled.as_ref().zip(read.scale);
        let mut ok = read.ok;
        let mut verdict = judge(&ok);
        if let (Judgement::Overflow, Some((u, s))) = (verdict, scale) {
            self.scaling.updates.push(u.found_inf.shallow_clone());
            return Err(self.overflow_error(s, index, m.measured.as_ref(), params, names));
        }
        let mut rescued_grads = false;
        if !ok[Slot::Grads] {
            let rescued =
                rescue_overflow(m.measured.as_ref(), params, self.config.norm_type, max_norm);
            if let Some((n, exact)) = rescued {
                ok[Slot::Grads] = true;
                rescued_grads = true;
                verdict = judge(&ok);
                self.last.norm = Some(n);
                total = Some(exact);
            }
        }
        match verdict {
            Judgement::Pass | Judgement::Spike => {
                if let Some((u, s)) = scale {
                    self.note_scale(s, false);
                    self.scaling.updates.push(u.found_inf.shallow_clone());
                }
                if verdict == Judgement::Spike {
                    let sigmas = self.config.spike.map_or(6.0, |s| s.sigmas);
                    let d = crate::spike::diagnosis(read.z, sigmas);
                    return Err(self.error(Check::Spike, Vec::new(), d, index));
                }
                if let Some(s) = &m.spike {
                    self.accept_spike(s, None);
                }
                Ok(total)
            }
            _ => {
                // With a process group: the error of the first check that failed names its
                // rank(s); a rank whose own tensors passed it reports the other rank's.
                let ranks = self.group().and_then(|g| {
                    let replicated = m.folded.then_some(&ok);
                    super::consensus::Ranks::new(&read.ranks, g.rank(), replicated)
                });
                if let Some((check, d, on)) = ranks.as_ref().and_then(|r| r.elsewhere()) {
                    let mut e = self.error(check, Vec::new(), d, index);
                    e.ranks = on;
                    return Err(e);
                }
                let mut seen = Vec::new();
                if let Some((r, (_, on))) =
                    ranks.as_ref().and_then(|r| Some((r, r.first_failure()?)))
                {
                    ok = r.own(ok[Slot::Spike]);
                    ok[Slot::Grads] |= rescued_grads;
                    seen = on;
                }
                let names_now = names.map(|n| n.names());
                let subject = Subject {
                    origin: self.origin(),
                    update: index,
                    pending: start.pending.as_ref(),
                    params,
                    obs: &start.obs,
                    names: names_now.as_ref(),
                    protected: self.protected,
                    max_norm,
                    grad_norm: self.last.norm,
                };
                let error = subject.explain(
                    &ok,
                    || scan_params(params, names, names_now.as_ref()),
                    || bad_grads(m.measured.as_ref(), params, names_now.as_ref()),
                );
                error.map_or(Ok(total), |mut e| {
                    e.ranks = seen;
                    Err(e)
                })
            }
        }
    }

    /// The grads overflowed at `scale` while the loss and the parameters were finite: an
    /// expected skip (the scale backs off), or, at `min_scale`, a failure naming the grads.
    fn overflow_error(
        &mut self,
        scale: f64,
        step: u64,
        measured: Option<&Measured<'_>>,
        params: &[Tensor],
        names: Option<&dyn NameSource>,
    ) -> GuardError {
        let d = self.loss_scale().after_overflow(scale);
        let overflow = matches!(d, crate::Diagnosis::Overflow { .. });
        self.note_scale(scale, overflow);
        let tensors = if overflow {
            Vec::new()
        } else {
            let names_now = names.map(|n| n.names());
            bad_grads(measured, params, names_now.as_ref())
        };
        self.error(Check::Grads, tensors, d, step)
    }
}
