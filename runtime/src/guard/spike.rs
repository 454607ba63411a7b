//! Spike detection in the step: the loss and the grad norm judged against the running
//! statistics of the parameters, folded into the step's flag (no read of its own).

use tch::{Kind, Tensor};

use super::StepGuard;
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
    /// Judges this update's loss and grad norm (`norm`: the total before clipping) when spike
    /// detection is on. No host read.
    pub(super) fn judge_spike(
        &self,
        key: Key,
        obs: &Observed,
        norm: Option<&Tensor>,
        device: tch::Device,
        clipping: bool,
    ) -> Result<Option<SpikeCheck>, String> {
        let Some(cfg) = self.stats_config() else {
            return Ok(None);
        };
        let loss = mean_loss(obs);
        let mut models = self.state.lock();
        let m = models.model(key, None);
        let stats = m.spike.get_or_insert_with(|| SpikeStats::new(device));
        let judged = stats
            .judge(loss.as_ref(), norm, &cfg, !clipping)
            .map_err(|e| e.to_string())?;
        Ok(Some(SpikeCheck { judged }))
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

    /// Adaptive clipping: the threshold of this update, from the statistics before it (0-dim
    /// f64, +inf during warm-up). No host read.
    pub(super) fn clip_threshold(
        &self,
        key: Key,
        device: tch::Device,
    ) -> Result<Option<Tensor>, String> {
        let Some(a) = self.config.adaptive_clip else {
            return Ok(None);
        };
        let mut models = self.state.lock();
        let m = models.model(key, None);
        let stats = m.spike.get_or_insert_with(|| SpikeStats::new(device));
        stats
            .threshold(a.sigmas, a.warmup)
            .map(Some)
            .map_err(|e| e.to_string())
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
