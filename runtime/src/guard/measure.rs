//! The phases before an update's read that both modes share: the state taken for the update,
//! the loss scale (scaled before backward, unscaled before the update, updated when the call
//! ends), the grads measured and their flag, and spike detection. No host read.

use std::sync::{Arc, Mutex};

use tch::nn::Variables;
use tch::Tensor;

use super::{StepGuard, Update};
use crate::amp::{DeferredScale, Scaler, Unscaled};
use crate::clip::Measured;
use crate::config::check_max_norm;
use crate::error::{Check, Diagnosis, GuardError};
use crate::flag::FiniteFlag;
use crate::sources::NameSource;
use crate::spike::{Judged, SpikeStats};
use crate::state::{Key, Observed, Pending};

/// What an update starts from: its parameters' state, taken out of the [`GuardState`].
///
/// [`GuardState`]: crate::GuardState
pub(super) struct Start {
    pub key: Key,
    pub index: u64,
    /// The previous update's parameters check, not read yet.
    pub pending: Option<Pending>,
    /// `sync = "deferred"`: the previous update's verdict, not read yet.
    pub deferred: Option<crate::state::DeferredVerdict>,
    /// What this call and the calls without an update since the last one observed.
    pub obs: Observed,
    pub vars: Vec<Arc<Mutex<Variables>>>,
    /// With a process group: every rank's verdicts, carried by the gradients' last bucket,
    /// when they cover this update ([`super::offer`]).
    pub folded: Option<super::offer::Folded>,
}

impl StepGuard<'_> {
    /// This update's `max_norm` (the call's, else the configuration's), checked with the
    /// whole configuration before anything is clipped or read.
    pub(super) fn max_norm_now(&self, max_norm: Option<f64>) -> Result<Option<f64>, GuardError> {
        max_norm
            .or(self.config.max_norm)
            .map(check_max_norm)
            .transpose()
            .and_then(|m| self.config.validate().map(|()| m))
            .map_err(|e| self.config_error(Diagnosis::Config(e)))
    }

    /// A [`Check::Config`] error, before any update of the call.
    pub(super) fn config_error(&self, d: Diagnosis) -> GuardError {
        self.error(Check::Config, Vec::new(), d, self.next_update())
    }

    /// Counts the update and takes what it reads from the state: the previous update's
    /// check and verdict, and the observations carried from calls without an update.
    pub(super) fn start_update(
        &mut self,
        params: &[Tensor],
        names: Option<&dyn NameSource>,
    ) -> Start {
        let key = Key::of(params);
        let vars = names.map(|n| n.var_stores()).unwrap_or_default();
        let own = vars.iter().find(|v| Key::of_vars(v) == key);
        let (index, pending, deferred, mut obs) = {
            let mut models = self.state.lock();
            let m = models.model(key, own);
            let index = m.updates;
            m.updates += 1;
            let mut carried = std::mem::take(&mut m.carried);
            let (pending, deferred) = (m.pending.take(), m.deferred.take());
            if key != Key::UNKNOWN {
                let unknown = std::mem::take(&mut models.model(Key::UNKNOWN, None).carried);
                carried.absorb(unknown);
            }
            (index, pending, deferred, carried)
        };
        obs.absorb(std::mem::take(&mut self.obs));
        let folded = self.take_folded(super::offer::count(&obs), Some(params));
        self.update = Some(Update {
            key,
            index,
            vars: vars.clone(),
        });
        Start {
            key,
            index,
            pending,
            deferred,
            obs,
            vars,
            folded,
        }
    }

    /// The parameters before the update, folded when `params` is checked.
    pub(super) fn params_flag(&self, params: &[Tensor]) -> FiniteFlag {
        let mut pre = FiniteFlag::new();
        if self.config.checks.params {
            pre.fold_all(params);
        }
        pre
    }

    /// The grads check folded from the measured total (on the host or the device).
    pub(super) fn grads_flag(&self, measured: Option<&Measured<'_>>) -> FiniteFlag {
        let mut flag = FiniteFlag::new();
        if self.config.checks.grads {
            match measured {
                Some(Measured::Host(_, total)) => flag.fold_host(total.is_finite()),
                Some(Measured::Device { total, .. }) => flag.fold(total),
                None => {}
            }
        }
        flag
    }

    /// With spike detection or adaptive clipping: the adaptive threshold of this update and
    /// the judgement of its loss (`loss()`: the mean of the observed losses, or over the ranks
    /// of a process group) and grad norm (see [`SpikeStats::judge_update`]). `(None, None)`
    /// otherwise, with nothing computed. No host read.
    pub(super) fn judge_spike(
        &self,
        key: Key,
        loss: impl FnOnce() -> Option<Tensor>,
        obs: &Observed,
        measured: Option<&Measured<'_>>,
        scale: Option<&Tensor>,
        clipping: bool,
    ) -> Result<(Option<Tensor>, Option<Judged>), String> {
        let Some(cfg) = crate::spike::stats_config(self.config.spike, self.config.adaptive_clip)
        else {
            return Ok((None, None));
        };
        let loss = loss();
        let total = measured.map(Measured::tensor);
        let device = match &total {
            Some(t) => t.device(),
            None => obs
                .losses
                .first()
                .map_or(tch::Device::Cpu, |l| l.value.device()),
        };
        let mut models = self.state.lock();
        let stats = models
            .model(key, None)
            .spike
            .get_or_insert_with(|| SpikeStats::new(device));
        stats
            .judge_update(
                &cfg,
                self.config.adaptive_clip,
                loss.as_ref(),
                total.as_ref(),
                scale,
                clipping,
            )
            .map(|(threshold, judged)| (threshold, Some(judged)))
            .map_err(|e| e.to_string())
    }

    /// Folds an accepted update's values into the statistics (`keep`: on the device, for a
    /// verdict not read yet).
    pub(super) fn accept_spike(&self, key: Key, judged: &Judged, keep: Option<&Tensor>) {
        let Some(cfg) = crate::spike::stats_config(self.config.spike, self.config.adaptive_clip)
        else {
            return;
        };
        let mut models = self.state.lock();
        if let Some(stats) = models.model(key, None).spike.as_mut() {
            // An error here surfaces at the next step's read.
            let _ = stats.accept(judged, keep, &cfg);
        }
    }

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
            .map_err(|e| self.device_error(e.to_string(), self.next_update()))
    }

    /// Unscales the grads of `params` a scaled loss produced (`deferred`: or plans for the
    /// fused kernel to). `None` without a scaler (no loss was ever scaled): whatever this
    /// function's configuration, a function sharing the state with one that scales its loss
    /// unscales what that one scaled. No host read.
    pub(super) fn unscale(&mut self, params: &[Tensor]) -> Result<Option<Unscaled>, String> {
        self.scaling.scaled_after_update = false;
        let mut models = self.state.lock();
        let Some(scaler) = models.scaler.as_mut() else {
            return Ok(None);
        };
        self.scaling.unscaling = true;
        scaler.unscale_update(params).map(Some)
    }

    /// [`StepGuard::unscale`] for `sync = "deferred"` ([`Scaler::plan_deferred`]).
    pub(super) fn plan_deferred(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
    ) -> Result<Option<DeferredScale>, String> {
        self.scaling.scaled_after_update = false;
        let mut models = self.state.lock();
        let Some(scaler) = models.scaler.as_mut() else {
            return Ok(None);
        };
        self.scaling.unscaling = true;
        scaler.plan_deferred(params, grads).map(Some)
    }

    /// After an update that unscaled grads: notes them as unscaled as they are now (clipping
    /// and a fused kernel write them, which moves their version counters).
    pub(super) fn mark_after_update(&mut self, params: &[Tensor]) {
        if !std::mem::take(&mut self.scaling.unscaling) {
            return;
        }
        if let Some(s) = self.state.lock().scaler.as_mut() {
            s.mark_unscaled(params);
        }
    }

    /// Notes the scale the host just read, and counts an overflow.
    pub(super) fn note_scale(&self, scale: f64, overflow: bool) {
        if let Some(s) = self.state.lock().scaler.as_mut() {
            s.note(scale, overflow);
        }
    }

    /// The scaler's numbers (the state's scaler, else this configuration's).
    pub(super) fn loss_scale(&self) -> crate::amp::LossScale {
        let params = self.state.lock().scaler.as_ref().map(Scaler::params);
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
