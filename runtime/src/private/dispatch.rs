//! Autoref specialisation: the generated code calls a method on `&Probe(operands)`, and the
//! operands' types pick the tag ([`Tensors`], [`NumberByTensor`], [`Optimizer`]) or the
//! fallback ([`Other`]), whose methods do the guarded or the plain operation.

use tch::Tensor;

use super::ctx::{Ctx, Outcome, PlainStep, Verdict};
use crate::config::Config;
use crate::registry::Site;
use crate::sources::{DeviceSkipOptimizer, GuardedOptimizer, ParamSource};

/// The traits whose methods the generated code calls, all anonymous: one
/// `use ::stepguard::__private::ops::*;` brings them into scope without naming any.
pub mod ops {
    pub use super::super::escalate::{EscalateFrom as _, EscalatePanic as _};
    pub use super::{
        ByMut as _, ByRef as _, DivNumber as _, DivPlain as _, DivTensor as _, LogPlain as _,
        LogTensor as _, LossPlain as _, LossTensor as _, StepOptimizer as _, StepPlain as _,
    };
}

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
    fn split(self) -> (Option<f64>, Option<f64>) {
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
    pub fn backward<A: IsTensor + ?Sized, R: Default>(
        self,
        ctx: &Ctx<'_>,
        loss: &A,
        at: &At,
        names: &[&dyn ParamSource],
        backward: impl FnOnce(&A) -> R,
    ) -> Outcome<R> {
        match ctx.loss(loss.as_tensor(), at.read_now, at.line, at.expr, names) {
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
        if at.manual {
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
    pub fn backward<A: ?Sized, R>(
        self,
        _: &Ctx<'_>,
        loss: &A,
        _: &At,
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
        at: &At,
        names: &[&dyn ParamSource],
        step: impl FnOnce(&mut O) -> R,
    ) -> Outcome<R> {
        self.step(ctx, o, at, names, step)
    }
    /// Not a [`GuardedOptimizer`]: the plain `step()`, refused when it follows a
    /// `backward()` (it would update parameters unchecked).
    pub fn step<O: ?Sized, R>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        at: &At,
        _: &[&dyn ParamSource],
        step: impl FnOnce(&mut O) -> R,
    ) -> Outcome<R> {
        let (receiver, line) = (std::any::type_name::<O>(), at.line);
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

impl Other {
    /// Not a [`GuardedOptimizer`], checks stripped: nothing. A program never runs it: the
    /// guarded branch of the same function requires a `GuardedOptimizer` there and reports
    /// the type at compile time (this impl only keeps that the one error).
    pub fn backward_step_stripped<O: ?Sized, L: ?Sized>(
        self,
        _: &'static Site,
        _: &mut O,
        _: &L,
        _: Clip,
    ) {
    }

    /// Not an optimizer, checks stripped: the plain `step()`.
    pub fn step_stripped<O: ?Sized, R>(
        self,
        _: &'static Site,
        o: &mut O,
        step: impl FnOnce(&mut O) -> R,
    ) -> R {
        step(o)
    }
}

/// Clipping in a build whose checks are stripped (`strip-release`): training math, so it
/// stays. `max_norm` of the call, else the function's.
fn clip_stripped(config: &Config, params: &[Tensor], max_norm: Option<f64>) {
    if let Some(m) = max_norm.or(config.max_norm) {
        // An invalid `max_norm` (checked at compile time for the attribute's own) clips
        // nothing: the checks that would name it are what is stripped.
        let _ = crate::clip_grad_norm(params, m, config.norm_type);
    }
}

impl Optimizer {
    /// `opt.step()` with the checks stripped: clipping, then the step.
    pub fn step_stripped<O: GuardedOptimizer + ?Sized, R>(
        self,
        site: &'static Site,
        o: &mut O,
        step: impl FnOnce(&mut O) -> R,
    ) -> R {
        clip_stripped(site.effective_config(), &o.guard_params(), None);
        step(o)
    }

    /// tch's `backward_step` family with the checks stripped: zero_grad, backward, value
    /// clipping, norm clipping (the call's or the function's), step.
    pub fn backward_step_stripped<O: GuardedOptimizer + ?Sized, L: IsTensor + ?Sized>(
        self,
        site: &'static Site,
        opt: &mut O,
        loss: &L,
        clip: Clip,
    ) {
        let (clip_value, max_norm) = clip.split();
        opt.guard_zero_grad();
        loss.as_tensor().backward();
        if let Some(v) = clip_value {
            opt.guard_clip_grad_value(v);
        }
        clip_stripped(site.effective_config(), &opt.guard_params(), max_norm);
        opt.guard_step();
    }

    /// `opt.step()` under `sync = "deferred"`: the checks go to the optimizer's kernel as
    /// `found_inf` (and clipping as `grad_scale`), with no host read; the previous update's
    /// verdict is judged first.
    pub fn step_deferred<O: DeviceSkipOptimizer + ?Sized, R: Default>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        _: &At,
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
    pub fn backward_step_deferred<O: DeviceSkipOptimizer + ?Sized, L: IsTensor + ?Sized>(
        self,
        ctx: &Ctx<'_>,
        opt: &mut O,
        loss: &L,
        clip: Clip,
        at: &At,
        names: &[&dyn ParamSource],
    ) -> Outcome<()> {
        let loss = loss.as_tensor();
        let (clip_value, max_norm) = clip.split();
        if let Some(v) = ctx.backward_step_start(opt, loss, clip_value, (at.line, at.expr), names) {
            return v.into();
        }
        match ctx.before_deferred(opt.guard_params(), max_norm, names) {
            Ok((found_inf, grad_scale)) => {
                opt.guard_step_on_device(grad_scale.as_ref(), &found_inf);
                ctx.after();
                Outcome::Value(())
            }
            Err(e) => Outcome::Fail(e),
        }
    }

    /// `opt.step()`, guarded: clipping, the checks and their one host read before it; the
    /// parameters check folded after it. A skipped step returns `R::default()`.
    pub fn step<O: GuardedOptimizer + ?Sized, R: Default>(
        self,
        ctx: &Ctx<'_>,
        o: &mut O,
        _: &At,
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
    pub fn backward_step<O: GuardedOptimizer + ?Sized, L: IsTensor + ?Sized>(
        self,
        ctx: &Ctx<'_>,
        opt: &mut O,
        loss: &L,
        clip: Clip,
        at: &At,
        names: &[&dyn ParamSource],
    ) -> Outcome<()> {
        let loss = loss.as_tensor();
        let (clip_value, max_norm) = clip.split();
        if let Some(v) = ctx.backward_step_start(opt, loss, clip_value, (at.line, at.expr), names) {
            return v.into();
        }
        match ctx.before(opt.guard_params(), max_norm, names) {
            Verdict::Proceed => {
                ctx.refresh_snapshot(|| opt.guard_state());
                opt.guard_step();
                ctx.after();
                Outcome::Value(())
            }
            other => other.into(),
        }
    }
}

/// A verdict as the outcome of an operation that returns `()`: a skip is a `()` too.
impl From<Verdict> for Outcome<()> {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Proceed | Verdict::Skip => Outcome::Value(()),
            Verdict::Fail(e) => Outcome::Fail(e),
        }
    }
}
