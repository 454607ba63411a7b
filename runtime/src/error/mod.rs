//! Errors: what failed, where, why, and what to try.

use std::fmt;

use crate::report::TensorReport;

mod diagnosis;

pub use diagnosis::Diagnosis;

/// Which finiteness check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Check {
    /// The loss, before `backward()`.
    Loss,
    /// The gradients, before the optimizer step.
    Grads,
    /// The parameters, after the optimizer step (or at the start of one).
    Params,
    /// A tensor bound by `let` in the step body (`checks = "forward"`): names the first one
    /// that went non-finite.
    Forward,
    /// An optimizer step the guard cannot see: a `.step()` after a `backward()` on a type that
    /// does not implement [`GuardedOptimizer`](crate::GuardedOptimizer).
    Unguarded,
    /// An invalid number given at run time (`backward_step_clip_norm(&loss, -1.0)`, a
    /// hand-built [`Config`](crate::Config)): nothing was clipped or applied.
    Config,
    /// libtorch reported an error while the guard checked the step (an asynchronous device
    /// error surfaces at the guard's read): nothing was applied.
    Device,
    /// Spike detection (`spike = ...`): the loss or the grad norm lies far above its running
    /// mean, though finite.
    Spike,
}

impl Check {
    /// The name used in `checks = "..."`.
    pub fn name(self) -> &'static str {
        match self {
            Check::Loss => "loss",
            Check::Grads => "grads",
            Check::Params => "params",
            Check::Forward => "forward",
            Check::Unguarded => "unguarded",
            Check::Config => "config",
            Check::Device => "device",
            Check::Spike => "spike",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed finiteness check: the error a guarded step panics with or returns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GuardError {
    /// Which check failed.
    pub check: Check,
    /// Index (0-based) of the guarded update ("step") that failed, counted per set of
    /// parameters (per optimizer). A failure found before any update of the call (a loss read
    /// at once, an unguarded `.step()`) names the update that would have come next.
    pub step: u64,
    /// Index (0-based) of the call of the guarded function in which it was found.
    pub call: u64,
    /// Name of the guarded function.
    pub function: &'static str,
    /// File and line of the guarded function, when known.
    pub location: Option<(&'static str, u32)>,
    /// The offending tensors, by name, with NaN/Inf counts.
    pub tensors: Vec<TensorReport>,
    /// The likely cause and what to try.
    pub diagnosis: Diagnosis,
    /// The total gradient norm of the step, when it was computed.
    pub grad_norm: Option<f64>,
    /// Set when the step was skipped this many times in a row before escalating.
    pub consecutive_skips: Option<u32>,
    /// With a process group of more than one rank: the rank(s) where the failure was seen
    /// (empty otherwise).
    pub ranks: Vec<usize>,
    /// Where the NaN/Inf was born, from a replay of the failed call under the ATen observer
    /// (a failed `loss`, `forward` or `grads` check; the first of each function and check), or
    /// why there was no replay.
    pub origin: Option<crate::birth::Traced>,
}

/// "rank 1", "ranks 0, 1".
pub(crate) fn rank_list(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
    let s = if ranks.len() == 1 { "" } else { "s" };
    format!("rank{s} {}", list.join(", "))
}

impl std::error::Error for GuardError {}

/// Where a failure was found: the guarded function, its location and the call. Every
/// [`GuardError`] is built from one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub function: &'static str,
    pub location: Option<(&'static str, u32)>,
    pub call: u64,
}

impl Origin {
    /// The error of update `step` (see [`GuardError::step`]).
    pub(crate) fn error(
        &self,
        check: Check,
        tensors: Vec<TensorReport>,
        diagnosis: Diagnosis,
        step: u64,
    ) -> GuardError {
        GuardError {
            check,
            step,
            call: self.call,
            function: self.function,
            location: self.location,
            tensors,
            diagnosis,
            grad_norm: None,
            consecutive_skips: None,
            ranks: Vec::new(),
            origin: None,
        }
    }

    /// A [`Check::Device`] error: libtorch's `message`, nothing applied.
    pub(crate) fn device_error(&self, e: TorchError, step: u64) -> GuardError {
        self.error(
            Check::Device,
            Vec::new(),
            Diagnosis::Device { message: e.message },
            step,
        )
    }
}

impl GuardError {
    /// Whether `on_nan = "skip"` may skip this failure: not an update that already made
    /// parameters non-finite (it cannot be undone), an unguarded optimizer, an invalid
    /// configuration or a device error.
    pub fn is_skippable(&self) -> bool {
        if self.is_overflow() {
            return true;
        }
        match self.check {
            Check::Unguarded | Check::Config | Check::Device => false,
            Check::Params => self.diagnosis != Diagnosis::Update,
            _ => true,
        }
    }
}

impl GuardError {
    /// Whether restoring a snapshot (`rollback = N`) is the remedy: the parameters are already
    /// non-finite (an update made them so, or they were when the step began).
    pub fn rollback_heals(&self) -> bool {
        match &self.diagnosis {
            Diagnosis::Update | Diagnosis::CorruptedBefore => true,
            // Another rank's parameters went non-finite: every rank restores its snapshot.
            Diagnosis::OtherRank { .. } => self.check == Check::Params,
            _ => false,
        }
    }

    /// Whether this is an overflow of dynamic loss scaling ([`Diagnosis::Overflow`]): the
    /// update must be skipped (grads zeroed), and nothing else is wrong. `#[guarded_step]`
    /// does so under every `on_nan` policy; a [`StepGuard`](crate::StepGuard) user does it by
    /// hand.
    pub fn is_overflow(&self) -> bool {
        matches!(self.diagnosis, Diagnosis::Overflow { .. })
    }

    /// Whether the failure judged the update's grads unusable, so that they must not reach a
    /// later update (the guard zeroes them): every failure but an invalid configuration, a
    /// device error and an unguarded optimizer, which say nothing about the batch.
    pub fn rejects_grads(&self) -> bool {
        !matches!(self.check, Check::Config | Check::Device | Check::Unguarded)
    }
}

const SHOWN_TENSORS: usize = 8;

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.check {
            _ if self.is_overflow() => "gradient overflow under loss scaling",
            Check::Loss => "non-finite loss",
            Check::Grads => "non-finite gradients",
            Check::Params => "non-finite parameters",
            Check::Forward => "non-finite value in the forward pass",
            Check::Unguarded => "unguarded optimizer step",
            Check::Config => "invalid configuration",
            Check::Device => "device error",
            Check::Spike => "loss spike",
        };
        write!(
            f,
            "stepguard: {what} in `{}` at step {} (call {}, check `{}`",
            self.function, self.step, self.call, self.check
        )?;
        if let Some((file, line)) = self.location {
            write!(f, ", {file}:{line}")?;
        }
        writeln!(f, ")")?;
        if !self.ranks.is_empty() {
            writeln!(f, "  seen on {}", rank_list(&self.ranks))?;
        }
        if let Some(n) = self.consecutive_skips {
            writeln!(f, "  skipped {n} consecutive steps; giving up")?;
        }
        for t in self.tensors.iter().take(SHOWN_TENSORS) {
            writeln!(f, "  {t}")?;
        }
        if self.tensors.len() > SHOWN_TENSORS {
            writeln!(f, "  ... and {} more", self.tensors.len() - SHOWN_TENSORS)?;
        }
        if let Some(n) = self.grad_norm {
            writeln!(f, "  total grad norm: {}", crate::report::number(n))?;
        }
        if let Some(o) = &self.origin {
            writeln!(f, "  {o}")?;
        }
        writeln!(f, "  cause: {}", self.diagnosis.cause())?;
        write!(f, "  try: {}", self.diagnosis.advice())
    }
}

/// An error libtorch raised on the guard's path: a C++ exception the shim caught, an error
/// tch returned, or an asynchronous device error surfacing at a read. A guarded step reports
/// it as a [`GuardError`] with [`Check::Device`] and its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TorchError {
    message: String,
}

impl TorchError {
    /// An error with libtorch's (or the shim's) text.
    pub(crate) fn new(message: impl Into<String>) -> Self {
        TorchError {
            message: message.into(),
        }
    }

    /// Its text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error, with what the guard was doing first (`"restoring the buffers: ..."`).
    pub(crate) fn context(self, doing: &str) -> Self {
        TorchError::new(format!("{doing}: {}", self.message))
    }
}

impl From<TorchError> for tch::TchError {
    fn from(e: TorchError) -> Self {
        tch::TchError::Torch(e.message)
    }
}

impl From<tch::TchError> for TorchError {
    fn from(e: tch::TchError) -> Self {
        TorchError::new(e.to_string())
    }
}

/// An invalid argument to a runtime function (the attribute reports these at compile time).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_norm` must be finite and at least f32's smallest normal number (1.1754944e-38).
    #[error("stepguard: max_norm must be a finite number >= 1.1754944e-38 (f32's smallest normal number; a smaller one would zero the gradients), got {0:e}")]
    MaxNorm(f64),
    /// The norm order must be above zero.
    #[error("stepguard: norm_type must be > 0 (or inf), got {0}")]
    NormType(f64),
    /// eps must be a finite number above zero (from `stepguard::safe::Eps::new`).
    #[error("stepguard: eps must be a finite number > 0, got {0}")]
    Eps(f64),
    /// `rollback` must be >= 1, with `on_nan = "skip"` and `sync = "every_step"`.
    #[error(
        "stepguard: rollback = {0} needs a value >= 1, on_nan = \"skip\" and sync = \"every_step\""
    )]
    Rollback(u32),
    /// Adaptive clipping cannot be combined with a constant `max_norm`, and needs
    /// `sync = "every_step"`.
    #[error("stepguard: max_norm = \"adaptive\" replaces a constant max_norm and needs sync = \"every_step\"")]
    AdaptiveClip,
    /// A number of spike detection out of range.
    #[error("stepguard: {field} must be {want}, got {value}")]
    Spike {
        /// The parameter (`spike`, `spike_window`).
        field: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        want: &'static str,
    },
    /// A number of dynamic loss scaling out of range.
    #[error("stepguard: {field} must be {want}, got {value}")]
    LossScale {
        /// The parameter (`init_scale`, `growth_factor`, ...).
        field: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        want: &'static str,
    },
}

/// `on_nan = "error"` in a step returning `Result<_, tch::TchError>`: the error's text, as
/// `TchError::Torch`. Its fields (`check`, `step`, `tensors`, `origin`, ...) are not kept:
/// `TchError` holds text only. Return `Result<_, GuardError>` (or `std::io::Result`, or a
/// `Box<dyn Error>`, from which `downcast_ref::<GuardError>()` gets them back) to keep them.
impl From<GuardError> for tch::TchError {
    fn from(e: GuardError) -> Self {
        tch::TchError::Torch(e.to_string())
    }
}

/// `on_nan = "error"` in a step returning `std::io::Result<_>`: the `GuardError` is kept
/// inside (`io::Error::get_ref` + `downcast_ref`).
impl From<GuardError> for std::io::Error {
    fn from(e: GuardError) -> Self {
        std::io::Error::other(e)
    }
}
