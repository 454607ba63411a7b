//! How a failure leaves a function that returns `Result<_, E>`.

use super::ctx::fail;
use crate::error::GuardError;

/// Picks how a skip that ran out of `max_skips` escalates in a function returning
/// `Result<_, E>`: `Err(E::from(e))` when `E: From<GuardError>`, else a panic.
pub struct Escalate<E>(std::marker::PhantomData<E>);

impl<E> std::fmt::Debug for Escalate<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Escalate")
    }
}

impl<E> Escalate<E> {
    /// The probe.
    pub fn new() -> Self {
        Escalate(std::marker::PhantomData)
    }
}

impl<E> Default for Escalate<E> {
    fn default() -> Self {
        Self::new()
    }
}

/// `E: From<GuardError>`: return it.
pub trait EscalateFrom<E> {
    /// The error to return.
    fn __sg_escalate(&self, e: GuardError) -> E;
}
impl<E: From<GuardError>> EscalateFrom<E> for Escalate<E> {
    fn __sg_escalate(&self, e: GuardError) -> E {
        E::from(e)
    }
}

/// Any other `E`: panic.
pub trait EscalatePanic<E> {
    /// Panics with the error.
    fn __sg_escalate(&self, e: GuardError) -> E;
}
impl<E> EscalatePanic<E> for &Escalate<E> {
    fn __sg_escalate(&self, e: GuardError) -> E {
        fail(e)
    }
}

/// An error type that a `GuardError` converts into (`on_nan = "error"`).
#[diagnostic::on_unimplemented(
    message = "`on_nan = \"error\"` returns `Err(GuardError)` converted into `{Self}`, but `{Self}` does not implement `From<stepguard::GuardError>`",
    label = "`{Self}` cannot hold a `stepguard::GuardError`",
    note = "add `impl From<stepguard::GuardError> for {Self}`, or return `Result<_, stepguard::GuardError>`, `anyhow::Result<_>` or `Result<_, Box<dyn std::error::Error>>`"
)]
pub trait HoldsGuardError {
    /// The conversion.
    fn from_guard_error(e: GuardError) -> Self;
}

impl<E: From<GuardError>> HoldsGuardError for E {
    fn from_guard_error(e: GuardError) -> Self {
        E::from(e)
    }
}

/// `E::from(e)`, with a diagnostic that says which impl is missing.
pub fn into_error<E: HoldsGuardError>(e: GuardError) -> E {
    E::from_guard_error(e)
}
