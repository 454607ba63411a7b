//! What the attribute compiles to: which checks run, clipping, protection, the policy.

use crate::clip::NormType;

/// Which finiteness checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
pub enum OnNan {
    /// Panic with the [`GuardError`] text.
    #[default]
    Panic,
    /// Return `Err(GuardError.into())` before any further update.
    Error,
    /// Skip the optimizer step (parameters untouched, grads zeroed); escalate after
    /// `max_skips` consecutive skips.
    Skip,
}

/// The configuration of a guarded step (what `#[guarded_step(...)]` compiles to).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Which checks run.
    pub checks: Checks,
    /// Clip the global grad norm to this value before each optimizer step.
    pub max_norm: Option<f64>,
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
}

impl Config {
    /// The attribute's defaults: all three checks, no clipping, eps 1e-8, div and log
    /// protected, panic on failure, 3 skips.
    pub const DEFAULT: Config = Config {
        checks: Checks::DEFAULT,
        max_norm: None,
        norm_type: NormType::L2,
        eps: crate::safe::DEFAULT_EPS,
        protect_div: true,
        protect_log: true,
        on_nan: OnNan::Panic,
        max_skips: 3,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}
