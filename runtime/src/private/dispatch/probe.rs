//! The probe: [`Probe`] holds the operands (by reference, their types settled by [`ByRef`] and
//! [`ByMut`]), [`IsTensor`] and [`IsNumber`] say what they are; plus what the call knows about
//! its site ([`At`]) and its clipping ([`Clip`]).

use tch::Tensor;

/// What a generated call knows about its place in the source: constants, one `&'static`
/// per call site.
#[derive(Debug, Clone, Copy)]
pub struct At {
    /// The line of the call.
    pub line: u32,
    /// The loss as written (`backward`, `backward_step`), for messages; else empty.
    pub expr: &'static str,
    /// `backward()` with no update after it in the function: the loss is read right there.
    pub read_now: bool,
    /// A manual update (no optimizer, `params = ...`): clip and check after `backward()`.
    pub manual: bool,
}

/// The clipping of tch's `backward_step` family.
#[derive(Debug, Clone, Copy)]
pub enum Clip {
    /// `backward_step(&loss)`.
    None,
    /// `backward_step_clip(&loss, value)`: each grad clamped to `[-value, value]`.
    Value(f64),
    /// `backward_step_clip_norm(&loss, max_norm)`: the global norm clipped.
    Norm(f64),
}

impl Clip {
    /// `(clip_value, max_norm)`.
    pub(super) fn split(self) -> (Option<f64>, Option<f64>) {
        match self {
            Clip::None => (None, None),
            Clip::Value(v) => (Some(v), None),
            Clip::Norm(m) => (None, Some(m)),
        }
    }
}

/// The loss of `backward_step(&loss)`: a `&Tensor`, as tch's `backward_step` takes, so the
/// same coercion settles the type of a loss built by operators.
pub fn loss_ref(loss: &Tensor) -> &Tensor {
    loss
}

/// `x.__sg_by_ref()` is `&x`; as a method call it makes the compiler settle `x`'s type (an
/// operator's output, say) before the probe's impls are chosen.
pub trait ByRef {
    /// `self`.
    fn __sg_by_ref(&self) -> &Self {
        self
    }
}
impl<T: ?Sized> ByRef for T {}

/// `x.__sg_by_mut()` is a reborrow `&mut *x` when `x: &mut T`, else `&mut x`: what method-call
/// syntax does, so an immutable binding of type `&mut Optimizer` works.
pub trait ByMut {
    /// `self`.
    fn __sg_by_mut(&mut self) -> &mut Self {
        self
    }
}
impl<T: ?Sized> ByMut for T {}

/// Types the loss check and the protected operations treat as tensors.
pub trait IsTensor {
    /// The tensor.
    fn as_tensor(&self) -> &Tensor;
}
impl IsTensor for Tensor {
    fn as_tensor(&self) -> &Tensor {
        self
    }
}
impl IsTensor for &Tensor {
    fn as_tensor(&self) -> &Tensor {
        self
    }
}
impl IsTensor for &mut Tensor {
    fn as_tensor(&self) -> &Tensor {
        self
    }
}

/// Numbers that may divide by a tensor (`1.0 / t`).
pub trait IsNumber: Copy + Into<f64> {}
impl IsNumber for f64 {}
impl IsNumber for f32 {}
impl IsNumber for i32 {}

/// Holds references to operands so that a method call picks an implementation by their types
/// (autoref specialization): the specialised impls are on `Probe`, the fallbacks on `&Probe`.
pub struct Probe<'a, A: ?Sized, B: ?Sized>(pub &'a A, pub &'a B);

impl<A: ?Sized, B: ?Sized> std::fmt::Debug for Probe<'_, A, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}
