//! The traits that pick the tag: implemented on [`Probe`] for the specialised operands (a
//! tensor, a number by a tensor, a [`GuardedOptimizer`]) and on `&Probe` for the fallback, so
//! that method resolution on `&Probe(..)` prefers the specialised one.

use super::optimizer::Optimizer;
use super::plain::Other;
use super::probe::{IsNumber, IsTensor, Probe};
use super::tensors::{NumberByTensor, Tensors};
use crate::sources::GuardedOptimizer;

macro_rules! probe_trait {
    ($(#[$m:meta])* $tr:ident, $method:ident, $tag:ident) => {
        $(#[$m])*
        pub trait $tr {
            /// The tag.
            fn $method(&self) -> $tag {
                $tag
            }
        }
    };
}

probe_trait!(
    /// `tensor / tensor`.
    DivTensor, __sg_div_tag, Tensors
);
probe_trait!(
    /// `number / tensor`.
    DivNumber, __sg_div_tag, NumberByTensor
);
probe_trait!(
    /// Anything else divided.
    DivPlain, __sg_div_tag, Other
);
probe_trait!(
    /// A tensor's log.
    LogTensor, __sg_log_tag, Tensors
);
probe_trait!(
    /// Anything else's log.
    LogPlain, __sg_log_tag, Other
);
probe_trait!(
    /// A tensor loss.
    LossTensor, __sg_loss_tag, Tensors
);
probe_trait!(
    /// Anything else with a `backward()`.
    LossPlain, __sg_loss_tag, Other
);
probe_trait!(
    /// An optimizer.
    StepOptimizer, __sg_step_tag, Optimizer
);
probe_trait!(
    /// Anything else with a `step()` (an LR scheduler).
    StepPlain, __sg_step_tag, Other
);

impl<A: IsTensor, B: IsTensor> DivTensor for Probe<'_, A, B> {}
impl<A: IsNumber, B: IsTensor> DivNumber for Probe<'_, A, B> {}
impl<A: ?Sized, B: ?Sized> DivPlain for &Probe<'_, A, B> {}
impl<A: IsTensor, B: ?Sized> LogTensor for Probe<'_, A, B> {}
impl<A: ?Sized, B: ?Sized> LogPlain for &Probe<'_, A, B> {}
impl<A: IsTensor, B: ?Sized> LossTensor for Probe<'_, A, B> {}
impl<A: ?Sized, B: ?Sized> LossPlain for &Probe<'_, A, B> {}
impl<A: GuardedOptimizer + ?Sized, B: ?Sized> StepOptimizer for Probe<'_, A, B> {}
impl<A: ?Sized, B: ?Sized> StepPlain for &Probe<'_, A, B> {}
