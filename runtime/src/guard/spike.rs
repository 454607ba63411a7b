//! Spike detection in the step: the loss and the grad norm judged against the running
//! statistics of the parameters, folded into the step's flag (no read of its own).

use tch::{Kind, Tensor};

use super::StepGuard;
use crate::clip::Measured;
use crate::error::{Check, Diagnosis, GuardError};
use crate::spike::{Judged, Spike, SpikeStats};
use crate::state::{Key, Observed};

/// What spike detection left for the step's read.
#[derive(Debug)]
pub(crate) struct SpikeCheck {
    pub judged: Judged,
}

/// The mean of the losses observed for this update (micro-batches included), 0-dim.
fn mean_loss(obs: &Observed) -> Option<Tensor> {
    let values: Vec<Tensor> = obs
        .losses
        .iter()
        .filter_map(|l| {
            let v = l.value.f_to_kind(Kind::Double).ok()?;
            let v = if v.dim() == 0 {
                v
            } else {
                v.f_mean(Kind::Double).ok()?
            };
            v.f_to_device(obs.losses[0].value.device()).ok()
        })
        .collect();
    if values.is_empty() {
        return None;
    }
    Tensor::f_stack(&values, 0).ok()?.f_mean(Kind::Double).ok()
}

impl StepGuard<'_> {
    /// With spike detection or adaptive clipping: the adaptive threshold of this update (from
    /// the statistics before it) and the judgement of its loss and grad norm (`measured`, the
    /// total before clipping, divided by `scale` when the grads still carry the loss scale;
    /// capped at the threshold, as ZClip feeds its statistics). `(None, None)` otherwise, with
    /// nothing computed. No host read.
    pub(super) fn judge_spike(
        &self,
        key: Key,
        obs: &Observed,
        measured: Option<&Measured<'_>>,
        scale: Option<&Tensor>,
        clipping: bool,
    ) -> Result<(Option<Tensor>, Option<SpikeCheck>), String> {
        let Some(cfg) = self.stats_config() else {
            return Ok((None, None));
        };
        let total = measured.map(Measured::tensor);
        let device = match &total {
            Some(t) => t.device(),
            None => obs
                .losses
                .first()
                .map_or(tch::Device::Cpu, |l| l.value.device()),
        };
        let loss = mean_loss(obs);
        let mut models = self.state.lock();
        let stats = models
            .model(key, None)
            .spike
            .get_or_insert_with(|| SpikeStats::new(device));
        let r = (|| {
            let threshold = match self.config.adaptive_clip {
                Some(a) if !clipping => Some(stats.threshold(a.sigmas, a.warmup)?),
                _ => None,
            };
            let norm = match &total {
                None => None,
                Some(t) => {
                    let mut n = t.f_to_kind(tch::Kind::Double)?;
                    if let Some(s) = scale {
                        n = n.f_div(&s.f_to_device(n.device())?)?;
                    }
                    if let Some(t) = &threshold {
                        n = n.f_minimum(&t.f_to_device(n.device())?)?;
                    }
                    Some(n)
                }
            };
            let clipping = clipping || threshold.is_some();
            let judged = stats.judge(loss.as_ref(), norm.as_ref(), &cfg, !clipping)?;
            Ok::<_, tch::TchError>((threshold, Some(SpikeCheck { judged })))
        })();
        r.map_err(|e| e.to_string())
    }

    /// Folds an accepted update's values into the statistics (`keep`: on the device, for a
    /// verdict not read yet).
    pub(super) fn accept_spike(&self, key: Key, check: &SpikeCheck, keep: Option<&Tensor>) {
        let Some(cfg) = self.stats_config() else {
            return;
        };
        let mut models = self.state.lock();
        if let Some(stats) = models.model(key, None).spike.as_mut() {
            // An error here surfaces at the next step's read.
            let _ = stats.accept(&check.judged, keep, &cfg);
        }
    }

    /// The statistics' configuration: spike detection's, else adaptive clipping's (whose
    /// statistics judge nothing: an infinite threshold).
    fn stats_config(&self) -> Option<Spike> {
        self.config.spike.or(self
            .config
            .adaptive_clip
            .map(|a| Spike::new(f64::INFINITY, a.warmup, a.window)))
    }

    /// The spike error of this update, with its z-scores.
    pub(super) fn spike_error(&self, z: [f64; 2], step: u64) -> GuardError {
        let sigmas = self.config.spike.map_or(6.0, |s| s.sigmas);
        let d = spike_diagnosis(z, sigmas);
        self.error(Check::Spike, Vec::new(), d, step)
    }
}

/// [`Diagnosis::Spike`] from the z-scores read (NaN: not measured).
pub(crate) fn spike_diagnosis(z: [f64; 2], sigmas: f64) -> Diagnosis {
    let finite = |v: f64| v.is_finite().then_some(v);
    Diagnosis::Spike {
        loss_z: finite(z[0]),
        norm_z: finite(z[1]),
        sigmas,
    }
}
