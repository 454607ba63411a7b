//! Autoref specialisation: the generated code calls a method on `&Probe(operands)`, and the
//! operands' types pick the tag ([`Tensors`], [`NumberByTensor`], [`Optimizer`]) or the
//! fallback ([`Other`]), whose methods do the guarded or the plain operation.

use tch::Tensor;

use super::ctx::{Ctx, Outcome, PlainStep, Verdict};
use crate::sources::{DeviceSkipOptimizer, GuardedOptimizer, ParamSource};

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

/// Tag: the operands are tensors (protect the operation, check the loss).
#[derive(Clone, Copy, Debug)]
pub struct Tensors;
/// Tag: a number divided by a tensor (protect the divisor).
#[derive(Clone, Copy, Debug)]
pub struct NumberByTensor;
/// Tag: anything else (the plain operation).
#[derive(Clone, Copy, Debug)]
pub struct Other;
/// Tag: a [`GuardedOptimizer`] (guard its step).
#[derive(Clone, Copy, Debug)]
pub struct Optimizer;

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

impl Tensors {
    /// Protected `a / b`.
    pub fn div<A: IsTensor, B: IsTensor, R>(
        self,
        a: A,
        b: B,
        eps: f64,
        _plain: impl FnOnce(A, B) -> R,
    ) -> Tensor {
        crate::safe::div(a.as_tensor(), b.as_tensor(), crate::safe::Eps::checked(eps))
    }
    /// Protected `a /= b`, in place.
    pub fn div_assign<B: IsTensor>(
        self,
        a: &mut Tensor,
        b: B,
        eps: f64,
        _plain: impl FnOnce(&mut Tensor, B),
    ) {
        crate::safe::div_assign(a, b.as_tensor(), crate::safe::Eps::checked(eps))
    }
    /// Protected `a.div(b)`.
    pub fn div_method<A: IsTensor, B: IsTensor, R>(
        self,
        a: &A,
        b: B,
        eps: f64,
        _plain: impl FnOnce(&A, B) -> R,
    ) -> Tensor {
        crate::safe::div(a.as_tensor(), b.as_tensor(), crate::safe::Eps::checked(eps))
    }
    /// Protected `x.log()`.
    pub fn log<A: IsTensor, R>(self, x: &A, eps: f64, _plain: impl FnOnce(&A) -> R) -> Tensor {
        crate::safe::log(x.as_tensor(), crate::safe::Eps::checked(eps))
    }
    /// Protected `x.log2()`.
    pub fn log2<A: IsTensor, R>(self, x: &A, eps: f64, _plain: impl FnOnce(&A) -> R) -> Tensor {
        crate::safe::log2(x.as_tensor(), crate::safe::Eps::checked(eps))
    }
    /// Protected `x.log10()`.
    pub fn log10<A: IsTensor, R>(self, x: &A, eps: f64, _plain: impl FnOnce(&A) -> R) -> Tensor {
        crate::safe::log10(x.as_tensor(), crate::safe::Eps::checked(eps))
    }
    /// A tensor bound by `let`: the `forward` check.
    pub fn bind<A: IsTensor>(
        self,
        ctx: &Ctx<'_>,
        x: &A,
        name: &'static str,
        line: u32,
        kind: &'static str,
    ) {
        ctx.bind(x.as_tensor(), name, line, kind)
    }
    /// `loss.backward()`, guarded: the loss check before it, and for a manual update (no
    /// optimizer, `params = ...`) clipping and the grads check after it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<A: IsTensor + ?Sized, R: Default>(
        self,
        ctx: &Ctx<'_>,
        loss: &A,
        read_now: bool,
        manual: bool,
        line: u32,
        expr: &'static str,
        names: &[&dyn ParamSource],
        backward: impl FnOnce(&A) -> R,
    ) -> Outcome<R> {
        match ctx.loss(loss.as_tensor(), read_now, line, expr, names) {
            Verdict::Proceed => {}
            Verdict::Skip => return Outcome::Value(R::default()),
            Verdict::Fail(e) => return Outcome::Fail(e),
        }
        let r = match ctx.scaled(loss.as_tensor()) {
            Ok(None) => backward(loss),
            Ok(Some(scaled)) => {
                scaled.backward();
                R::default() // `Tensor::backward` returns `()`
            }
            Err(e) => return Outcome::Fail(e),
        };
        if manual {
            if let Verdict::Fail(e) = ctx.before_manual(names) {
                return Outcome::Fail(e);
            }
        }
        Outcome::Value(r)
    }
}

impl NumberByTensor {
    /// Protected `n / b`.
    pub fn div<A: IsNumber, B: IsTensor, R>(
        self,
        a: A,
        b: B,
        eps: f64,
        _plain: impl FnOnce(A, B) -> R,
    ) -> Tensor {
        crate::safe::rdiv(a.into(), b.as_tensor(), crate::safe::Eps::checked(eps))
    }
}

impl Other {
    /// Other `a / b`.
    pub fn div<A, B, R>(self, a: A, b: B, _eps: f64, plain: impl FnOnce(A, B) -> R) -> R {
        plain(a, b)
    }
    /// Other `a /= b`.
    pub fn div_assign<A: ?Sized, B>(
        self,
        a: &mut A,
        b: B,
        _eps: f64,
        plain: impl FnOnce(&mut A, B),
    ) {
        plain(a, b)
    }
    /// Other `a.div(b)`.
    pub fn div_method<A: ?Sized, B, R>(
        self,
        a: &A,
        b: B,
        _eps: f64,
        plain: impl FnOnce(&A, B) -> R,
    ) -> R {
        plain(a, b)
    }
    /// Other `x.log()`.
    pub fn log<A: ?Sized, R>(self, x: &A, _eps: f64, plain: impl FnOnce(&A) -> R) -> R {
        plain(x)
    }
    /// Other `x.log2()`.
    pub fn log2<A: ?Sized, R>(self, x: &A, _eps: f64, plain: impl FnOnce(&A) -> R) -> R {
        plain(x)
    }
    /// Other `x.log10()`.
    pub fn log10<A: ?Sized, R>(self, x: &A, _eps: f64, plain: impl FnOnce(&A) -> R) -> R {
        plain(x)
    }
    /// Not a tensor: nothing to check.
    pub fn bind<A: ?Sized>(self, _: &Ctx<'_>, _: &A, _: &'static str, _: u32, _: &'static str) {}
    /// Not a tensor: the plain `backward()`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<A: ?Sized, R>(
        self,
        _: &Ctx<'_>,
        loss: &A,
        _: bool,
        _: bool,
        _: u32,
        _: &'static str,
        _: &[&dyn ParamSource],
        backward: impl FnOnce(&A) -> R,
    ) -> Outcome<R> {
        Outcome::Value(backward(loss))
    }
    /// Not an optimizer under `sync = "deferred"`: as [`Other::step`].
    pub fn step_deferred<O: ?Sized, R>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        line: u32,
        names: &[&dyn ParamSource],
        step: impl FnOnce(&mut O) -> R,
    ) -> Outcome<R> {
        self.step(ctx, o, line, names, step)
    }
    /// Not a [`GuardedOptimizer`]: the plain `step()`, refused when it follows a
    /// `backward()` (it would update parameters unchecked).
    pub fn step<O: ?Sized, R>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        line: u32,
        _: &[&dyn ParamSource],
        step: impl FnOnce(&mut O) -> R,
    ) -> Outcome<R> {
        let receiver = std::any::type_name::<O>();
        match ctx.plain_step(receiver, line) {
            PlainStep::Free => Outcome::Value(step(o)),
            PlainStep::Refuse(e) => Outcome::Fail(e),
            PlainStep::Watch(before) => {
                let r = step(o);
                match ctx.after_plain_step(&before, receiver, line) {
                    Verdict::Fail(e) => Outcome::Fail(e),
                    _ => Outcome::Value(r),
                }
            }
        }
    }
}

impl Optimizer {
    /// `opt.step()` under `sync = "deferred"`: the checks go to the optimizer's kernel as
    /// `found_inf` (and clipping as `grad_scale`), with no host read; the previous update's
    /// verdict is judged first.
    pub fn step_deferred<O: DeviceSkipOptimizer + ?Sized, R: Default>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        _line: u32,
        names: &[&dyn ParamSource],
        _step: impl FnOnce(&mut O) -> R,
    ) -> Outcome<R> {
        match ctx.before_deferred(o.guard_params(), None, names) {
            Ok((found_inf, grad_scale)) => {
                o.guard_step_on_device(grad_scale.as_ref(), &found_inf);
                ctx.after();
                Outcome::Value(R::default())
            }
            Err(e) => Outcome::Fail(e),
        }
    }

    /// `backward_step` under `sync = "deferred"` (see [`Optimizer::step_deferred`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_step_deferred<O: DeviceSkipOptimizer + ?Sized, L: IsTensor + ?Sized>(
        self,
        ctx: &Ctx<'_>,
        opt: &mut O,
        loss: &L,
        clip_value: Option<f64>,
        max_norm: Option<f64>,
        line: u32,
        expr: &'static str,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let loss = loss.as_tensor();
        if let Some(v) = ctx.backward_step_start(opt, loss, clip_value, (line, expr), names) {
            return v;
        }
        match ctx.before_deferred(opt.guard_params(), max_norm, names) {
            Ok((found_inf, grad_scale)) => {
                opt.guard_step_on_device(grad_scale.as_ref(), &found_inf);
                ctx.after();
                Verdict::Proceed
            }
            Err(e) => Verdict::Fail(e),
        }
    }

    /// `opt.step()`, guarded: clipping, the checks and their one host read before it; the
    /// parameters check folded after it. A skipped step returns `R::default()`.
    pub fn step<O: GuardedOptimizer + ?Sized, R: Default>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        _line: u32,
        names: &[&dyn ParamSource],
        step: impl FnOnce(&mut O) -> R,
    ) -> Outcome<R> {
        match ctx.before(o.guard_params(), None, names) {
            Verdict::Proceed => {
                ctx.refresh_snapshot(|| o.guard_state());
                let r = step(o);
                ctx.after();
                Outcome::Value(r)
            }
            Verdict::Skip => Outcome::Value(R::default()),
            Verdict::Fail(e) => Outcome::Fail(e),
        }
    }

    /// tch's `backward_step` family, guarded: loss check, zero_grad, backward, optional
    /// value clipping, then clipping and the step's one read, and the step itself when it
    /// passes. `Skip` and `Fail` leave the parameters untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_step<O: GuardedOptimizer + ?Sized, L: IsTensor + ?Sized>(
        self,
        ctx: &Ctx<'_>,
        opt: &mut O,
        loss: &L,
        clip_value: Option<f64>,
        max_norm: Option<f64>,
        line: u32,
        expr: &'static str,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let loss = loss.as_tensor();
        if let Some(v) = ctx.backward_step_start(opt, loss, clip_value, (line, expr), names) {
            return v;
        }
        match ctx.before(opt.guard_params(), max_norm, names) {
            Verdict::Proceed => {
                ctx.refresh_snapshot(|| opt.guard_state());
                opt.guard_step();
                ctx.after();
                Verdict::Proceed
            }
            other => other,
        }
    }
}
