//! What the attribute compiles to: which checks run, clipping, protection, the policy.

use crate::amp::LossScale;
use crate::error::ConfigError;
use crate::norm::NormType;
use crate::spike::{AdaptiveClip, Spike};

// The attribute's argument table, shared with the macro crate.
use stepguard_spec as spec;

use spec::{Id, Setting};

/// Which finiteness checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checks {
    /// The loss, before backward.
    pub loss: bool,
    /// The gradients, before the optimizer step.
    pub grads: bool,
    /// The parameters, after the optimizer step.
    pub params: bool,
    /// Every tensor bound by `let` in the step body (off by default).
    pub forward: bool,
}

impl Checks {
    /// `loss`, `grads` and `params`: the default.
    pub const DEFAULT: Checks = Checks {
        loss: true,
        grads: true,
        params: true,
        forward: false,
    };
    /// No check at all.
    pub const NONE: Checks = Checks {
        loss: false,
        grads: false,
        params: false,
        forward: false,
    };
    /// Every check, `forward` included.
    pub const ALL: Checks = Checks {
        loss: true,
        grads: true,
        params: true,
        forward: true,
    };
}

impl Default for Checks {
    fn default() -> Self {
        Checks::DEFAULT
    }
}

/// What a failed check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnNan {
    /// Panic with the [`GuardError`](crate::GuardError) text.
    #[default]
    Panic,
    /// Return `Err(GuardError.into())` before any further update.
    Error,
    /// Skip the optimizer step (parameters untouched, grads zeroed); escalate after
    /// `max_skips` consecutive skips.
    Skip,
}

/// When the step's verdict is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SyncMode {
    /// One host read before each optimizer update: a failure stops that update.
    #[default]
    EveryStep,
    /// No blocking read: the verdict goes to an optimizer that skips on the device
    /// ([`DeviceSkipOptimizer`](crate::sources::DeviceSkipOptimizer)); it is looked at when the
    /// next update of the same parameters comes (or at `flush()`), so a failure is reported one
    /// step late, with nothing damaged.
    Deferred,
}

/// The configuration of a guarded step (what `#[guarded_step(...)]` compiles to).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Which checks run.
    pub checks: Checks,
    /// Clip the global grad norm to this value before each optimizer step.
    pub max_norm: Option<f64>,
    /// Clip it to a threshold that follows its running statistics instead (`max_norm =
    /// "adaptive"`; not with `max_norm`, and with [`SyncMode::EveryStep`] only).
    pub adaptive_clip: Option<AdaptiveClip>,
    /// The norm used by `max_norm` (and for the reported grad norm).
    pub norm_type: NormType,
    /// Epsilon of the protected operations.
    pub eps: f64,
    /// Whether `/` and `.div()` are protected.
    pub protect_div: bool,
    /// Whether `.log()`, `.log2()` and `.log10()` are protected.
    pub protect_log: bool,
    /// What a failed check does.
    pub on_nan: OnNan,
    /// With [`OnNan::Skip`], consecutive skips before escalating.
    pub max_skips: u32,
    /// When the verdict is read.
    pub sync: SyncMode,
    /// Dynamic loss scaling (mixed precision), off by default.
    pub loss_scale: Option<LossScale>,
    /// Spike detection on the loss and the grad norm, off by default.
    pub spike: Option<Spike>,
    /// Roll back to a snapshot of a good update, taken before the first update and refreshed
    /// every this many updates, on a failure a skip cannot undo (needs [`OnNan::Skip`] and
    /// [`SyncMode::EveryStep`]); off by default.
    pub rollback: Option<u32>,
    /// Whether a failed call is replayed under the ATen observer to name where its NaN/Inf
    /// was born.
    pub diagnose: Diagnose,
}

/// What a failed check does to find where its NaN/Inf was born (`checks(diagnose = ..)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Diagnose {
    /// Replay the failed call once with an ATen observer (the first failure of each function
    /// and check).
    Replay,
    /// No replay.
    Off,
}

impl Config {
    /// The attribute's defaults: all three checks, no clipping, eps 1e-8, div and log
    /// protected, panic on failure, 3 skips.
    pub const DEFAULT: Config = Config {
        checks: Checks::DEFAULT,
        max_norm: None,
        adaptive_clip: None,
        norm_type: NormType::L2,
        eps: crate::safe::DEFAULT_EPS,
        protect_div: true,
        protect_log: true,
        on_nan: OnNan::Panic,
        max_skips: 3,
        sync: SyncMode::EveryStep,
        loss_scale: None,
        spike: None,
        rollback: None,
        diagnose: Diagnose::Replay,
    };
}

impl Config {
    /// Checks every number against the attribute's ranges (`max_norm` finite and at least
    /// f32's smallest normal number, the warm-ups at least 1,
    /// the norm order above 0, `eps` finite and above 0, the loss scaling's and spike
    /// detection's numbers) and the rules between them (`rollback` at least 1 with the `skip`
    /// policy and `every_step`, adaptive clipping without a constant `max_norm` and with
    /// `every_step`, `min_scale` at most `init_scale`): the table the attribute checks at
    /// compile time. [`StepGuard`](crate::StepGuard) calls it before its first update.
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // A guarded function validates its (constant) configuration at every update: the last
        // configuration found valid on this thread is remembered, so the table is walked once.
        // Validity depends on the values only, and equal values (`==`) are equally valid.
        thread_local! {
            static LAST_VALID: std::cell::RefCell<Option<Config>> = const { std::cell::RefCell::new(None) };
        }
        if LAST_VALID.with(|v| v.try_borrow().is_ok_and(|c| c.as_ref() == Some(self))) {
            return Ok(());
        }
        self.validate_table()?;
        LAST_VALID.with(|v| {
            if let Ok(mut v) = v.try_borrow_mut() {
                *v = Some(*self);
            }
        });
        Ok(())
    }

    /// [`Config::validate`] without its memory.
    fn validate_table(&self) -> Result<(), ConfigError> {
        if let Some((_, arg, value)) = spec::out_of_range(|id| self.setting(id)).next() {
            let want = arg.kind.range().map_or("", spec::Range::want);
            return Err(config_error(arg.id, value, want));
        }
        match spec::broken_rules(|id| self.setting(id)).next() {
            None => Ok(()),
            Some(rule) => Err(match self.setting(rule.arg) {
                Setting::Number(v) => config_error(rule.arg, v, "at most `init_scale`"),
                Setting::Off | Setting::On | Setting::Text(_) => {
                    config_error(rule.arg, f64::NAN, rule.message)
                }
            }),
        }
    }

    /// The value of one argument of the table, as the attribute would have written it.
    fn setting(&self, id: Id) -> Setting {
        let num = |v: Option<f64>| v.map_or(Setting::Off, Setting::Number);
        let on = |b: bool| if b { Setting::On } else { Setting::Off };
        let (scale, spike, adaptive) = (self.loss_scale, self.spike, self.adaptive_clip);
        match id {
            Id::MaxNorm => num(self.max_norm),
            Id::Adaptive => on(adaptive.is_some()),
            Id::AdaptiveSigmas => num(adaptive.map(|a| a.sigmas)),
            Id::AdaptiveWarmup => num(adaptive.map(|a| f64::from(a.warmup))),
            Id::AdaptiveWindow => num(adaptive.map(|a| f64::from(a.window))),
            Id::NormType => Setting::Number(self.norm_type.p()),
            Id::Checks | Id::ChecksList => on(self.checks != Checks::NONE),
            Id::Diagnose => Setting::Text(match self.diagnose {
                Diagnose::Replay => "replay",
                Diagnose::Off => "off",
            }),
            Id::Protect | Id::ProtectOps => on(self.protect_div || self.protect_log),
            Id::Eps => Setting::Number(self.eps),
            Id::OnNan => Setting::Text(match self.on_nan {
                OnNan::Panic => "panic",
                OnNan::Error => "error",
                OnNan::Skip => "skip",
            }),
            Id::MaxSkips => Setting::Number(f64::from(self.max_skips)),
            Id::Rollback => num(self.rollback.map(f64::from)),
            // Written in the attribute only: the generated code uses them.
            Id::Params | Id::State | Id::Group => Setting::Off,
            Id::Sync => Setting::Text(match self.sync {
                SyncMode::EveryStep => "every_step",
                SyncMode::Deferred => "deferred",
            }),
            Id::LossScale => on(scale.is_some()),
            Id::ScaleInit => num(scale.map(|s| s.init_scale)),
            Id::ScaleGrowth => num(scale.map(|s| s.growth_factor)),
            Id::ScaleBackoff => num(scale.map(|s| s.backoff_factor)),
            Id::ScaleInterval => num(scale.map(|s| f64::from(s.growth_interval))),
            Id::ScaleMin => num(scale.map(|s| s.min_scale)),
            Id::Spike => on(spike.is_some()),
            Id::SpikeSigmas => num(spike.map(|s| s.sigmas)),
            Id::SpikeWarmup => num(spike.map(|s| f64::from(s.warmup))),
            Id::SpikeWindow => num(spike.map(|s| f64::from(s.window))),
        }
    }

    /// This configuration with clipping to `max_norm`.
    pub const fn with_max_norm(mut self, max_norm: f64) -> Self {
        self.max_norm = Some(max_norm);
        self
    }
    /// This configuration with another norm type.
    pub const fn with_norm_type(mut self, norm_type: NormType) -> Self {
        self.norm_type = norm_type;
        self
    }
    /// This configuration with other checks.
    pub const fn with_checks(mut self, checks: Checks) -> Self {
        self.checks = checks;
        self
    }
    /// This configuration with another epsilon for the protected operations.
    pub const fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// This configuration with division and log protected or not.
    pub const fn with_protect(mut self, div: bool, log: bool) -> Self {
        self.protect_div = div;
        self.protect_log = log;
        self
    }
    /// This configuration with `/` and `.div()` protected or not.
    pub const fn with_protect_div(mut self, on: bool) -> Self {
        self.protect_div = on;
        self
    }
    /// This configuration with `.log()`, `.log2()` and `.log10()` protected or not.
    pub const fn with_protect_log(mut self, on: bool) -> Self {
        self.protect_log = on;
        self
    }
    /// This configuration with failed calls replayed under the ATen observer, or not.
    pub const fn with_diagnose(mut self, diagnose: Diagnose) -> Self {
        self.diagnose = diagnose;
        self
    }
    /// This configuration with another failure policy.
    pub const fn with_on_nan(mut self, on_nan: OnNan) -> Self {
        self.on_nan = on_nan;
        self
    }
    /// This configuration with another verdict timing.
    pub const fn with_sync(mut self, sync: SyncMode) -> Self {
        self.sync = sync;
        self
    }
    /// This configuration with dynamic loss scaling.
    pub const fn with_loss_scale(mut self, loss_scale: LossScale) -> Self {
        self.loss_scale = Some(loss_scale);
        self
    }
    /// This configuration with adaptive clipping (and no constant `max_norm`).
    pub const fn with_adaptive_clip(mut self, clip: AdaptiveClip) -> Self {
        self.adaptive_clip = Some(clip);
        self.max_norm = None;
        self
    }
    /// This configuration with spike detection.
    pub const fn with_spike(mut self, spike: Spike) -> Self {
        self.spike = Some(spike);
        self
    }
    /// This configuration with rollback to a snapshot refreshed every `updates` updates.
    pub const fn with_rollback(mut self, updates: u32) -> Self {
        self.rollback = Some(updates);
        self
    }
    /// This configuration with another limit of consecutive skips.
    pub const fn with_max_skips(mut self, max_skips: u32) -> Self {
        self.max_skips = max_skips;
        self
    }
}

/// `max_norm` if it is finite and at least f32's smallest normal number (a smaller one is
/// zero or subnormal in f32 and would zero the gradients): the one check of every `max_norm`,
/// from the attribute's `Config`, a hand-built one, `backward_step_clip_norm(&loss, m)` at run
/// time, or [`clip_grad_norm`](crate::clip_grad_norm).
pub(crate) fn check_max_norm(max_norm: f64) -> Result<f64, ConfigError> {
    if spec::Range::NormalPositive.holds(max_norm) {
        Ok(max_norm)
    } else {
        Err(ConfigError::MaxNorm(max_norm))
    }
}

impl Checks {
    /// The checks named.
    pub const fn new(loss: bool, grads: bool, params: bool, forward: bool) -> Self {
        Checks {
            loss,
            grads,
            params,
            forward,
        }
    }
    /// These checks and the loss's.
    pub const fn with_loss(mut self) -> Self {
        self.loss = true;
        self
    }
    /// These checks and the grads'.
    pub const fn with_grads(mut self) -> Self {
        self.grads = true;
        self
    }
    /// These checks and the parameters'.
    pub const fn with_params(mut self) -> Self {
        self.params = true;
        self
    }
    /// These checks and every tensor bound by `let` in the step body.
    pub const fn with_forward(mut self) -> Self {
        self.forward = true;
        self
    }
}

/// The error naming `id`: `value` out of range (`want`), or a rule it breaks.
fn config_error(id: Id, value: f64, want: &'static str) -> ConfigError {
    let scale = |field| ConfigError::LossScale { field, value, want };
    let spike = |field| ConfigError::Spike { field, value, want };
    match id {
        Id::MaxNorm => ConfigError::MaxNorm(value),
        Id::NormType => ConfigError::NormType(value),
        Id::Eps => ConfigError::Eps(value),
        Id::Rollback => ConfigError::Rollback(value as u32),
        Id::Adaptive => ConfigError::AdaptiveClip,
        Id::ScaleInit => scale("init_scale"),
        Id::ScaleGrowth => scale("growth_factor"),
        Id::ScaleBackoff => scale("backoff_factor"),
        Id::ScaleInterval => scale("growth_interval"),
        Id::ScaleMin => scale("min_scale"),
        Id::SpikeSigmas => spike("spike"),
        Id::SpikeWarmup => spike("spike_warmup"),
        Id::SpikeWindow => spike("spike_window"),
        Id::AdaptiveSigmas => spike("clip_sigmas"),
        Id::AdaptiveWarmup => spike("adaptive_clip.warmup"),
        Id::AdaptiveWindow => spike("adaptive_clip.window"),
        Id::MaxSkips => spike("max_skips"),
        // Neither ranges nor rules: named as the attribute writes them.
        Id::Checks
        | Id::ChecksList
        | Id::Diagnose
        | Id::Protect
        | Id::ProtectOps
        | Id::OnNan
        | Id::Params
        | Id::State
        | Id::Group
        | Id::Sync
        | Id::LossScale
        | Id::Spike => spike(spec::row(id).name),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

#[cfg(test)]
mod tests;
