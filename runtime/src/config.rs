//! What the attribute compiles to: which checks run, clipping, protection, the policy.

use crate::amp::LossScale;
use crate::error::ConfigError;
use crate::norm::NormType;
use crate::spike::{AdaptiveClip, Spike};

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
pub enum Sync {
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
    /// "adaptive"`; not with `max_norm`, and with [`Sync::EveryStep`] only).
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
    pub sync: Sync,
    /// Dynamic loss scaling (mixed precision), off by default.
    pub loss_scale: Option<LossScale>,
    /// Spike detection on the loss and the grad norm, off by default.
    pub spike: Option<Spike>,
    /// Roll back to a snapshot of a good step at most this many updates back, on a failure a
    /// skip cannot undo (needs [`OnNan::Skip`] and [`Sync::EveryStep`]); off by default.
    pub rollback: Option<u32>,
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
        sync: Sync::EveryStep,
        loss_scale: None,
        spike: None,
        rollback: None,
    };
}

impl Config {
    /// Checks every number: `max_norm` finite and above 0, the norm order above 0, `eps`
    /// finite and above 0, the loss scaling's and spike detection's numbers, `rollback` at
    /// least 1 with the `skip` policy and `every_step` (the attribute checks the same at
    /// compile time).
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = self.max_norm {
            check_max_norm(m)?;
        }
        self.norm_type.validate()?;
        crate::safe::check_eps(self.eps)?;
        if let Some(s) = &self.loss_scale {
            s.validate()?;
        }
        if let Some(s) = &self.spike {
            s.validate()?;
        }
        if let Some(a) = &self.adaptive_clip {
            a.validate()?;
            if self.max_norm.is_some() || self.sync != Sync::EveryStep {
                return Err(ConfigError::AdaptiveClip);
            }
        }
        if let Some(r) = self.rollback {
            if r == 0 || self.on_nan != OnNan::Skip || self.sync != Sync::EveryStep {
                return Err(ConfigError::Rollback(r));
            }
        }
        Ok(())
    }

    /// What `#[guarded_step(...)]` compiles to (generated code only; use the `with_*`
    /// methods).
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub const fn __from_attribute(
        checks: Checks,
        max_norm: Option<f64>,
        norm_type: NormType,
        eps: f64,
        protect_div: bool,
        protect_log: bool,
        on_nan: OnNan,
        max_skips: u32,
        sync: Sync,
        loss_scale: Option<LossScale>,
        spike: Option<Spike>,
        rollback: Option<u32>,
        adaptive_clip: Option<AdaptiveClip>,
    ) -> Self {
        Config {
            checks,
            max_norm,
            adaptive_clip,
            norm_type,
            eps,
            protect_div,
            protect_log,
            on_nan,
            max_skips,
            sync,
            loss_scale,
            spike,
            rollback,
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
    /// This configuration with another failure policy.
    pub const fn with_on_nan(mut self, on_nan: OnNan) -> Self {
        self.on_nan = on_nan;
        self
    }
    /// This configuration with another verdict timing.
    pub const fn with_sync(mut self, sync: Sync) -> Self {
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
    /// This configuration with rollback to a snapshot at most `updates` updates back.
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

/// `max_norm` if it is a finite number above zero: the one check of every `max_norm`, from
/// the attribute's `Config`, a hand-built one, `backward_step_clip_norm(&loss, m)` at run
/// time, or [`clip_grad_norm`](crate::clip_grad_norm).
pub(crate) fn check_max_norm(max_norm: f64) -> Result<f64, ConfigError> {
    if max_norm > 0.0 && max_norm.is_finite() {
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
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}
