//! `tracing` events (feature `tracing`, on by default): failures at ERROR, skipped steps at
//! WARN, loss-scaling overflows at INFO, clipping at DEBUG, with structured fields, so existing subscribers see them.

use crate::error::GuardError;

#[cfg(feature = "tracing")]
fn tensor_names(e: &GuardError) -> String {
    e.tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "non-finite loss", "loss spike".
#[cfg(feature = "tracing")]
fn what(e: &GuardError) -> String {
    match e.check {
        crate::Check::Spike => "loss spike".into(),
        c => format!("non-finite {c}"),
    }
}

/// A check failed and the step panics or returns the error.
pub(crate) fn failed(e: &GuardError) {
    #[cfg(feature = "tracing")]
    tracing::error!(
        function = e.function,
        step = e.step,
        check = e.check.name(),
        tensors = %tensor_names(e),
        grad_norm = e.grad_norm,
        cause = %e.diagnosis.cause(),
        "stepguard: {} in `{}` at step {}", what(e), e.function, e.step
    );
    #[cfg(not(feature = "tracing"))]
    let _ = e;
}

/// A check failed and the step was skipped.
pub(crate) fn skipped(e: &GuardError, consecutive: u32, max_skips: u32) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        function = e.function,
        step = e.step,
        check = e.check.name(),
        tensors = %tensor_names(e),
        grad_norm = e.grad_norm,
        consecutive,
        max_skips,
        "stepguard: skipped step {} of `{}` ({})", e.step, e.function, what(e)
    );
    #[cfg(not(feature = "tracing"))]
    let _ = (e, consecutive, max_skips);
}

/// Dynamic loss scaling: the grads overflowed and the update was skipped (expected).
pub(crate) fn overflow(e: &GuardError) {
    #[cfg(feature = "tracing")]
    if let crate::Diagnosis::Overflow { scale, next } = e.diagnosis {
        tracing::info!(
            function = e.function,
            step = e.step,
            scale,
            next,
            "stepguard: gradient overflow at loss scale {scale} in `{}`: update skipped",
            e.function
        );
    }
    #[cfg(not(feature = "tracing"))]
    let _ = e;
}

/// `rollback = N` restored the state saved before update `update` (call `call`).
pub(crate) fn rolled_back(e: &GuardError, update: u64, call: u64) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        function = e.function,
        step = e.step,
        check = e.check.name(),
        restored_update = update,
        restored_call = call,
        "stepguard: rolled `{}` back to the state before update {update} (after {} at step {})",
        e.function,
        e.check,
        e.step
    );
    #[cfg(not(feature = "tracing"))]
    let _ = (e, update, call);
}

/// Clipping scaled the gradients down.
pub(crate) fn clipped(function: &'static str, step: u64, grad_norm: f64, max_norm: f64) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        function,
        step,
        grad_norm,
        max_norm,
        "stepguard: clipped gradients"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = (function, step, grad_norm, max_norm);
}

/// A skipped update's parameters live in a `VarStore` the step does not name: its buffers
/// were not restored.
pub(crate) fn buffers_not_restored(function: &'static str) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        function,
        "stepguard: `{function}` skipped an update of parameters that live in none of the VarStores \
         the step names: that VarStore's buffers (BatchNorm running statistics) keep what the bad \
         batch wrote; name it too, e.g. `#[guarded_step(params = (vs, other_vs))]` (by hand: \
         `StepGuard::with_names`)"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = function;
}

/// A checkpoint left something out, or a resume could not restore it: said on stderr (a run
/// without a subscriber sees it) and as a WARN event.
pub(crate) fn checkpoint_notice(text: &str) {
    #[cfg(feature = "tracing")]
    tracing::warn!("{text}");
    eprintln!("{text}");
}
