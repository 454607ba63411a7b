//! The likely cause of a failed check and what to try.

use super::{rank_list, ConfigError};

/// The likely cause of a failed check, following the usual troubleshooting order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Diagnosis {
    /// The loss is non-finite while the parameters are finite: the forward pass produced it.
    Forward {
        /// Whether division and log were epsilon-protected in this step; `None` when the step
        /// has no division or log to protect.
        protected: Option<bool>,
    },
    /// The loss is finite but the gradients are not: exploding or NaN gradients.
    ExplodingGradients {
        /// The max_norm of clipping, when clipping is on.
        max_norm: Option<f64>,
        /// Every gradient is finite but their norm overflowed.
        norm_overflow: bool,
    },
    /// Gradients were finite, but the optimizer update made parameters non-finite.
    Update,
    /// Parameters were already non-finite when the step began.
    CorruptedBefore,
    /// The loss is non-finite and the parameters, though finite, have grown huge: training
    /// diverged over the previous updates.
    Diverged {
        /// The parameter with the largest magnitude.
        param: String,
        /// Its largest absolute value.
        max_abs: f64,
    },
    /// A `.step()` on a type that is not a [`GuardedOptimizer`](crate::GuardedOptimizer) ran
    /// after a `backward()`: its update would go unchecked.
    Unguarded {
        /// The receiver's type.
        optimizer: &'static str,
        /// Source line of the `.step()` call.
        line: u32,
    },
    /// Dynamic loss scaling: the grads overflowed at the current scale while the loss and the
    /// parameters were finite. Expected, not a failure: the update is skipped, the scale backs
    /// off, and the skip is counted as an overflow (not toward `max_skips`).
    Overflow {
        /// The scale the grads overflowed at.
        scale: f64,
        /// The scale of the next step.
        next: f64,
    },
    /// Dynamic loss scaling: the grads overflow even at `min_scale`: the values exceed the
    /// range of the low-precision type, whatever the scale.
    ScaleExhausted {
        /// The scale (`min_scale`).
        scale: f64,
    },
    /// A loss spike: finite, but the loss or the total grad norm is far above its running
    /// mean (a destructive update came before, or a bad batch).
    Spike {
        /// How many standard deviations the loss lies above its running mean, if measured.
        loss_z: Option<f64>,
        /// The same for the total grad norm.
        norm_z: Option<f64>,
        /// The threshold (`spike = ...`).
        sigmas: f64,
    },
    /// An invalid configuration value.
    Config(ConfigError),
    /// An error from libtorch or the device.
    Device {
        /// Its text.
        message: String,
    },
    /// With a process group: another rank saw the bad tensor (this one's were finite), and
    /// every rank takes the same decision; that rank's own error names the tensor.
    OtherRank {
        /// The rank(s) where it was seen.
        ranks: Vec<usize>,
        /// What they saw ("loss NaN").
        what: String,
    },
}

impl Diagnosis {
    /// What probably happened.
    pub fn cause(&self) -> String {
        match self {
            Diagnosis::Forward { protected } => format!(
                "the forward pass produced it: a division by zero, the log of 0 or of a negative \
                 number, an overflow (exp of a large logit), or a NaN/Inf in the batch itself{}",
                match protected {
                    Some(true) => {
                        "; epsilon protection of the step's own / and log was on (it does not \
                         reach the operators inside the modules it calls)"
                    }
                    Some(false) => "; epsilon protection of the step's own / and log was off",
                    None => "",
                }
            ),
            Diagnosis::Config(e) => format!("{e}; the update was not applied"),
            Diagnosis::Spike {
                loss_z,
                norm_z,
                sigmas,
            } => {
                let z = |v: &Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
                format!(
                    "a loss spike: the loss is {} and the grad norm {} standard deviations above \
                     their running means (threshold {sigmas}); everything is finite, but an \
                     update like this one undoes training",
                    z(loss_z),
                    z(norm_z)
                )
            }
            Diagnosis::Overflow { scale, next } => format!(
                "the gradients overflowed at loss scale {scale} (expected under dynamic loss \
                 scaling): the update was skipped and the scale backs off to {next}"
            ),
            Diagnosis::ScaleExhausted { scale } => format!(
                "fp16 range exceeded even at loss scale {scale} (min_scale): the gradients \
                 overflow without any scaling up"
            ),
            Diagnosis::OtherRank { ranks, what } => format!(
                "{}: {what}; every rank takes the same decision for this step",
                rank_list(ranks)
            ),
            Diagnosis::Device { message } => format!(
                "libtorch reported an error while the guard checked the step (on a GPU, an \
                 earlier asynchronous error surfaces at the first sync): {}",
                message.lines().next().unwrap_or("")
            ),
            Diagnosis::Unguarded { optimizer, line } => format!(
                "`{optimizer}::step()` (line {line}) updates parameters after a backward(), but \
                 `{optimizer}` does not implement `stepguard::optim::GuardedOptimizer`, so nothing checks \
                 or clips that update"
            ),
            Diagnosis::ExplodingGradients { norm_overflow: true, .. } => {
                "exploding gradients: every gradient is finite but their global norm overflowed".into()
            }
            Diagnosis::ExplodingGradients { .. } => {
                "exploding or NaN gradients: backward produced non-finite values from a finite loss".into()
            }
            Diagnosis::Update => "the optimizer update made the parameters non-finite although the \
                                  gradients were finite: learning rate too large, or the optimizer \
                                  state is corrupted"
                .into(),
            Diagnosis::CorruptedBefore => "the parameters were already non-finite when the step began: \
                                           an unguarded update or a bad checkpoint corrupted them"
                .into(),
            Diagnosis::Diverged { param, max_abs } => format!(
                "training diverged: the parameters are finite but huge ({param} reaches |x| = {}), \
                 so the forward pass overflows; the learning rate is too large",
                crate::report::number(*max_abs)
            ),
        }
    }

    /// What to try.
    pub fn advice(&self) -> String {
        match self {
            Diagnosis::Config(_) => {
                "pass the value named above within its range (max_norm, eps and the loss scale \
                 finite and > 0)"
                    .into()
            }
            Diagnosis::Spike { .. } => "the step was not applied; if spikes persist the parameters \
                                        were damaged by an earlier update (a learning rate too \
                                        large for a batch): `rollback = N` restores a good state; \
                                        lower the learning rate or add warm-up"
                .into(),
            Diagnosis::Overflow { .. } => "nothing: overflow skips are counted in \
                                           stepguard::report(); many in a row mean a lower \
                                           init_scale or a larger growth_interval"
                .into(),
            Diagnosis::ScaleExhausted { .. } => "use bf16 (the range of f32), or find the op \
                                                 whose gradient is named above and keep it in \
                                                 f32 (autocast does so for losses and \
                                                 reductions)"
                .into(),
            Diagnosis::OtherRank { ranks, .. } => format!(
                "read the error of {}: it names the tensor and the cause",
                rank_list(ranks)
            ),
            Diagnosis::Device { .. } => "run with CUDA_LAUNCH_BLOCKING=1 to find the failing op \
                                         (often an out-of-range index in the batch)"
                .into(),
            Diagnosis::Unguarded { optimizer, .. } => format!(
                "implement `stepguard::optim::GuardedOptimizer` for `{optimizer}` (guard_params, \
                 guard_zero_grad, guard_step: a few lines); if it is not an optimizer (an LR \
                 scheduler), call it as `Type::step(&mut x)`, which `#[guarded_step]` leaves alone"
            ),
            Diagnosis::Forward { protected: Some(false) } => {
                "enable epsilon protection (`protect = \"div,log\"`), use a numerically stable op \
                 (log_softmax instead of softmax().log()), and check the batch for NaN/Inf"
                    .into()
            }
            Diagnosis::Forward { .. } => {
                "use a numerically stable op (log_softmax instead of softmax().log(), clamp before \
                 exp), and check the batch for NaN/Inf"
                    .into()
            }
            Diagnosis::ExplodingGradients { max_norm: None, .. } => {
                "clip the global gradient norm (`max_norm = 1`, 3 or 5), lower the learning rate, \
                 add normalisation layers; a log or division of a tiny value in the forward \
                 overflows in the backward: keep `protect = \"div,log\"` on"
                    .into()
            }
            Diagnosis::ExplodingGradients { max_norm: Some(m), .. } => format!(
                "clipping (max_norm = {m}) cannot repair NaN/Inf: lower the learning rate, look for \
                 an unstable op in the backward (sqrt or pow at 0, division by a tiny value), or use \
                 `on_nan = \"skip\"` to drop such batches"
            ),
            Diagnosis::Update => "lower the learning rate (try 10x smaller), add warm-up, or \
                                  reset the optimizer state from a checkpoint"
                .into(),
            Diagnosis::CorruptedBefore => "reload the last good checkpoint, and guard every step \
                                           that updates these parameters"
                .into(),
            Diagnosis::Diverged { .. } => "lower the learning rate (try 10x smaller), clip the gradient \
                                           norm (`max_norm = 1`), reload the last good checkpoint"
                .into(),
        }
    }
}
