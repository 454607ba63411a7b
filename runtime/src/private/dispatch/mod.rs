//! Autoref specialisation: the generated code calls a method on `&Probe(operands)`, and the
//! operands' types pick the tag ([`Tensors`], [`NumberByTensor`], [`Optimizer`]) or the
//! fallback ([`Other`]), whose methods do the guarded or the plain operation.
//!
//! - `probe`: the operands' holder, the tags and the traits that pick them, the call site's
//!   constants;
//! - `tensors`: the tags' guarded forms for tensors (protected operations, the loss check);
//! - `plain`: the fallback's plain operations, and the watch on a `step()` of a non-optimizer;
//! - `optimizer`: an optimizer's guarded step, in both sync modes, and with checks stripped.

mod optimizer;
mod plain;
mod probe;
mod tensors;

pub use probe::*;

/// The traits whose methods the generated code calls, all anonymous: one
/// `use ::stepguard::__private::ops::*;` brings them into scope without naming any.
pub mod ops {
    pub use super::super::escalate::{EscalateFrom as _, EscalatePanic as _};
    pub use super::probe::{
        ByMut as _, ByRef as _, DivNumber as _, DivPlain as _, DivTensor as _, LogPlain as _,
        LogTensor as _, LossPlain as _, LossTensor as _, StepOptimizer as _, StepPlain as _,
    };
}
