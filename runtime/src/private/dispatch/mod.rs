//! Autoref specialisation: the generated code calls a method on `&Probe(operands)`, and the
//! operands' types pick the tag ([`Tensors`], [`NumberByTensor`], [`Optimizer`]) or the
//! fallback ([`Other`]), whose methods do the guarded or the plain operation.
//!
//! - `probe`: the operands' holder and what they are, the call site's constants;
//! - `pick`: the traits that pick the tag;
//! - `tensors`: the tensor tags and their guarded forms (protected operations, the loss check);
//! - `plain`: the fallback tag, its plain operations, and the watch on a `step()` of a
//!   non-optimizer;
//! - `optimizer`: the optimizer tag, its guarded step in both sync modes and with checks
//!   stripped.
//!
//! Each tag is defined with its methods, so that a compile error naming a method's bound
//! reads `stepguard::__private::Optimizer::backward_step`.

mod optimizer;
mod pick;
mod plain;
mod probe;
mod tensors;

pub use optimizer::Optimizer;
pub use pick::*;
pub use plain::Other;
pub use probe::*;
pub use tensors::{NumberByTensor, Tensors};

/// The traits whose methods the generated code calls, all anonymous: one
/// `use ::stepguard::__private::ops::*;` brings them into scope without naming any.
pub mod ops {
    pub use super::super::escalate::{EscalateFrom as _, EscalatePanic as _};
    pub use super::pick::{
        DivNumber as _, DivPlain as _, DivTensor as _, LogPlain as _, LogTensor as _,
        LossPlain as _, LossTensor as _, StepOptimizer as _, StepPlain as _,
    };
    pub use super::probe::{ByMut as _, ByRef as _};
}
