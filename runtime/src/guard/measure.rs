//! The phases of an update that both sync modes run, in one order ([`StepGuard::run_phases`]):
//! collect (the state taken for the update, the parameters, the forward pass), unscale (or plan
//! the kernel's unscale), measure the grads, agree across ranks, judge spikes. What they fold
//! ends in one of two [`Sink`]s: read on the host now (`update.rs`), or handed to a fused
//! optimizer's kernel (`deferred.rs`). No host read.

use crate::error::TorchError;

use tch::Tensor;

use super::results::StepResults;
use super::scaling::Scaling;
use super::slot::Slot;
use super::{StepGuard, Update};
use crate::clip::{measure, Measured};
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
    pub index: u64,
    /// The previous update's parameters check, not read yet.
    pub pending: Option<Pending>,
    /// `sync = "deferred"`: the previous update's verdict, not read yet.
    pub deferred: Option<Box<crate::state::DeferredVerdict>>,
    /// What this call and the calls without an update since the last one observed.
    pub obs: Observed,
    /// With a process group: every rank's verdicts, carried by the gradients' last bucket,
    /// when they cover this update ([`super::offer`]).
    pub folded: Option<super::offer::Folded>,
    /// Loss scaling: what the update needs of the scaler.
    pub scale: Option<crate::amp::ScalePlan>,
}

/// Where an update's verdicts end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sink {
    /// Read on the host before the update (`sync = "every_step"`): the previous update's
    /// parameters check joins the read.
    Read,
    /// Handed to a fused optimizer's kernel as `found_inf` and `grad_scale` (`sync =
    /// "deferred"`), read at the next update; the previous update's verdict was judged first.
    Kernel,
}

/// What the phases folded, for the sink.
pub(super) struct Phases<'g> {
    pub results: StepResults,
    pub measured: Option<Measured<'g>>,
    pub scaling: Option<Scaling>,
    pub spike: Option<Judged>,
    /// The adaptive clipping threshold (0-dim, on the device).
    pub threshold: Option<Tensor>,
    /// The ranks' verdicts came folded into the gradients' last bucket.
    pub folded: bool,
}

impl StepGuard<'_> {
    /// The phases of an update of `params`, in order, for either sink (no host read):
    /// 1. collect: the parameters before the update (unless the previous update's check, read
    ///    with this one, covers them), that check itself when the sink reads it, the forward
    ///    pass;
    /// 2. unscale the grads of a scaled loss (for the kernel: plan it);
    /// 3. measure the total norm of `grads` (the grads check);
    /// 4. agree across the ranks of a process group;
    /// 5. judge spikes, and the adaptive threshold, from the running statistics.
    pub(super) fn run_phases<'g>(
        &mut self,
        sink: Sink,
        params: &[Tensor],
        grads: &'g [Tensor],
        max_norm: Option<f64>,
        start: &mut Start,
    ) -> Result<Phases<'g>, TorchError> {
        let mut results = StepResults::default();
        let pending = match sink {
            Sink::Read => start.pending.as_ref(),
            Sink::Kernel => None,
        };
        let check_params = self.config.checks.params && !pending.is_some_and(|p| p.covers(params));
        let folded = start
            .folded
            .take()
            .filter(|f| f.covers(pending, check_params))
            .map(|f| f.matrix);
        if check_params && folded.is_none() {
            results.flags[Slot::ParamsBefore] = self.params_flag(params);
        }
        if let (Sink::Read, Some(p)) = (sink, start.pending.as_mut()) {
            results.flags[Slot::Pending] = std::mem::take(&mut p.flag);
        }
        results.flags[Slot::Forward] = std::mem::take(&mut start.obs.flag);
        // The total norm of the grads unscaled first under loss scaling (as PyTorch documents
        // for clipping); the kernel unscales them itself.
        let kernel_grads = (sink == Sink::Kernel).then_some(grads);
        let mut scaling = self.unscale(start.scale.take(), params, kernel_grads)?;
        if let Some(s) = &scaling {
            results.flags[Slot::Overflow] = FiniteFlag::of_indicator(s.found_inf());
            if let Scaling::Unscaled(u) = s {
                results.values.scale = Some(u.scale.shallow_clone());
            }
        }
        let grads = if self.wants_norm(max_norm) {
            grads
        } else {
            &grads[..0]
        };
        let measured = measure(grads, self.config.norm_type)?;
        results.flags[Slot::Grads] = self.grads_flag(measured.as_ref());
        // With a process group, every rank's verdicts so far and the mean of their losses.
        let device = measured
            .as_ref()
            .map(Measured::device)
            .or(params.first().map(Tensor::device));
        let agreed = self.agree_ranks(
            &mut results,
            folded,
            &start.obs,
            device,
            scaling.as_mut().map(Scaling::found_inf_mut),
        )?;
        // Spike detection on the loss and the total norm before clipping; adaptive clipping's
        // threshold from the same statistics.
        let obs = &start.obs;
        let loss = || match &agreed {
            Some(a) => a.loss.as_ref().map(Tensor::shallow_clone),
            None => obs.mean_loss(),
        };
        let (threshold, spike) = self.judge_spike(
            loss,
            obs,
            measured.as_ref(),
            scaling.as_ref().and_then(Scaling::kernel),
            max_norm.is_some(),
        )?;
        if let Some(s) = &spike {
            results.flags[Slot::Spike] = FiniteFlag::of_indicator(&s.spike);
            results.values.z = Some(s.z.shallow_clone());
        }
        Ok(Phases {
            results,
            measured,
            scaling,
            spike,
            threshold,
            folded: agreed.is_some_and(|a| a.folded),
        })
    }

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

    /// Counts the update and takes its parameters' state out of the [`GuardState`] (one lock,
    /// see [`StepGuard::commit`]), with what it reads: the previous update's check and
    /// verdict, the observations carried from calls without an update, what it needs of the
    /// scaler.
    ///
    /// [`GuardState`]: crate::GuardState
    pub(super) fn start_update(
        &mut self,
        params: &[Tensor],
        names: Option<&dyn NameSource>,
    ) -> Start {
        // An update not ended (a hand-written loop's `before_update` twice) ends now.
        self.commit();
        let key = Key::of(params);
        let vars = names.map(|n| n.var_stores()).unwrap_or_default();
        let own = vars.iter().find(|v| self.key_of(v) == key);
        let (mut model, scale, mut obs) = {
            let mut models = self.state.lock();
            let mut model = models.check_out(key, own);
            let mut carried = std::mem::take(&mut model.carried);
            if key != Key::UNKNOWN {
                carried.absorb(std::mem::take(
                    &mut models.model(Key::UNKNOWN, None).carried,
                ));
            }
            let scale = models.scaler.as_ref().map(|s| s.plan(params));
            carried.absorb(std::mem::take(&mut self.obs));
            if let Some(offer) = self.offer() {
                offer.note_pending(&models);
            }
            (model, scale, carried)
        };
        let (pending, deferred) = (model.pending.take(), model.deferred.take());
        let folded = self.take_folded(super::offer::count(&obs), Some(params));
        let mut update = Update::new(key, model, vars);
        update.scaler = scale.as_ref().map(|s| s.params);
        self.update = Some(update);
        Start {
            index: self.update.as_ref().map_or(0, |u| u.index),
            pending,
            deferred,
            obs: std::mem::take(&mut obs),
            folded,
            scale,
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
        &mut self,
        loss: impl FnOnce() -> Option<Tensor>,
        obs: &Observed,
        measured: Option<&Measured<'_>>,
        scale: Option<&Tensor>,
        clipping: bool,
    ) -> Result<(Option<Tensor>, Option<Judged>), TorchError> {
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
        let adaptive = self.config.adaptive_clip;
        self.with_model(|m| {
            let stats = m.spike.get_or_insert_with(|| SpikeStats::new(device));
            stats
                .judge_update(
                    &cfg,
                    adaptive,
                    loss.as_ref(),
                    total.as_ref(),
                    scale,
                    clipping,
                )
                .map(|(threshold, judged)| (threshold, Some(judged)))
                .map_err(TorchError::from)
        })
    }

    /// Folds an accepted update's values into the statistics (`keep`: on the device, for a
    /// verdict not read yet).
    pub(super) fn accept_spike(&mut self, judged: &Judged, keep: Option<&Tensor>) {
        let Some(cfg) = crate::spike::stats_config(self.config.spike, self.config.adaptive_clip)
        else {
            return;
        };
        self.with_model(|m| {
            if let Some(stats) = m.spike.as_mut() {
                // An error here surfaces at the next step's read.
                let _ = stats.accept(judged, keep, &cfg);
            }
        });
    }
}
