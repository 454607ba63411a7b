//! What `#[guarded_step]` expands to calls. Not a public API: paths here may change.

use std::sync::atomic::Ordering::Relaxed;

use tch::Tensor;

pub use inventory;

pub use crate::guard::{Checks, Config, OnNan};
pub use crate::optim::{GuardedOptimizer, ParamSource};
pub use crate::registry::{Registration, Site, CHECKS_ENABLED};
pub use crate::NormType;

use crate::error::GuardError;
use crate::guard::StepGuard;
use crate::optim::Sources;

/// What a checkpoint tells the generated code to do.
pub enum Verdict {
    /// Go on.
    Proceed,
    /// Skip the guarded operation (the grads are already zeroed).
    Skip,
    /// Panic with, or return, this error.
    Fail(GuardError),
}

/// Panics with the error's text (`on_nan = "panic"`).
#[cold]
#[track_caller]
pub fn fail(e: GuardError) -> ! {
    panic!("{e}")
}

/// The state of one call of a guarded function. Shared (`&Ctx`) by the generated code, so a
/// closure in the step body that contains a guarded operation stays `Fn`.
pub struct Ctx(std::cell::RefCell<CtxInner>);

impl Ctx {
    /// Starts a call.
    pub fn begin(site: &'static Site) -> Self {
        Ctx(std::cell::RefCell::new(CtxInner::begin(site)))
    }
    /// See [`CtxInner::loss`].
    pub fn loss(&self, loss: &Tensor, read_now: bool, names: &[&dyn ParamSource]) -> Verdict {
        self.0.borrow_mut().loss(loss, read_now, names)
    }
    /// See [`CtxInner::before`].
    pub fn before(
        &self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        self.0.borrow_mut().before(params, max_norm, names)
    }
    /// See [`CtxInner::before_manual`].
    pub fn before_manual(&self, names: &[&dyn ParamSource]) -> Verdict {
        self.0.borrow_mut().before_manual(names)
    }
    /// See [`CtxInner::after`].
    pub fn after(&self) {
        self.0.borrow_mut().after()
    }
    /// A tensor bound by `let` (the `forward` check).
    pub fn bind(&self, t: &Tensor, name: &'static str, line: u32, kind: &'static str) {
        self.0.borrow_mut().guard.bind(t, name, line, kind)
    }
}

/// The state behind [`Ctx`].
pub struct CtxInner {
    site: &'static Site,
    guard: StepGuard<'static>,
    params: Vec<Tensor>,
    /// Parameters of a manual update (no optimizer), folded into the next call's read on drop.
    manual: bool,
}

impl CtxInner {
    /// Starts a call.
    fn begin(site: &'static Site) -> Self {
        let step = site.calls.fetch_add(1, Relaxed);
        let pending = if site.effective_config().checks.params {
            site.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        } else {
            None
        };
        let guard = StepGuard::from_parts(site.effective_config(), site.name(), step, pending)
            .with_location(site.file(), site.line());
        CtxInner {
            site,
            guard,
            params: Vec::new(),
            manual: false,
        }
    }

    fn config(&self) -> &'static Config {
        self.site.effective_config()
    }

    /// The loss check, before `backward()`. With `read_now` (no update follows in the
    /// function) the flag is read here; otherwise it is read before the update.
    fn loss(&mut self, loss: &Tensor, read_now: bool, names: &[&dyn ParamSource]) -> Verdict {
        if !self.config().checks.loss {
            return Verdict::Proceed;
        }
        self.guard.loss(loss);
        if !read_now {
            return Verdict::Proceed;
        }
        let r = self.guard.check_loss_now(Some(&Sources(names)));
        self.verdict(r.map(|_| ()))
    }

    /// Before an optimizer step: clip, check, one host read.
    pub fn before(
        &mut self,
        params: Vec<Tensor>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let r = self
            .guard
            .before_update_with(&params, max_norm, Some(&Sources(names)));
        if let Some(n) = self.guard.last_grad_norm() {
            self.site.set_last_norm(n);
            if let Some(m) = max_norm.or(self.config().max_norm).filter(|m| n > *m) {
                self.site.clipped.fetch_add(1, Relaxed);
                crate::events::clipped(self.site.name(), self.guard.step(), n, m);
            }
        }
        self.params = params;
        self.verdict(r.map(|_| ()))
    }

    /// Before a manual update (no optimizer): the parameters come from `params = ...`.
    pub fn before_manual(&mut self, names: &[&dyn ParamSource]) -> Verdict {
        let params: Vec<Tensor> = names.iter().flat_map(|s| s.guard_params()).collect();
        self.manual = true;
        self.before(params, None, names)
    }

    /// After an optimizer step: fold the parameters check; it is read with the next optimizer
    /// step of this call, or of the next call.
    pub fn after(&mut self) {
        self.guard.after_update(&self.params);
        let pending = self.take_guard().into_pending();
        self.guard =
            StepGuard::from_parts(self.config(), self.site.name(), self.guard.step(), pending)
                .with_location(self.site.file(), self.site.line());
    }

    fn take_guard(&mut self) -> StepGuard<'static> {
        let empty = StepGuard::from_parts(self.config(), self.site.name(), self.guard.step(), None);
        std::mem::replace(&mut self.guard, empty)
    }

    fn verdict(&mut self, r: Result<(), GuardError>) -> Verdict {
        let site = self.site;
        match r {
            Ok(()) => {
                site.consecutive_skips.store(0, Relaxed);
                Verdict::Proceed
            }
            Err(mut e) => {
                let cfg = self.config();
                let skippable =
                    e.check != crate::Check::Params || e.diagnosis != crate::Diagnosis::Update;
                if cfg.on_nan == OnNan::Skip && skippable {
                    let n = site.consecutive_skips.fetch_add(1, Relaxed) + 1;
                    if n <= cfg.max_skips {
                        site.skipped.fetch_add(1, Relaxed);
                        StepGuard::zero_grads(&self.params);
                        crate::events::skipped(&e, n, cfg.max_skips);
                        return Verdict::Skip;
                    }
                    e.consecutive_skips = Some(n - 1);
                }
                site.failures.fetch_add(1, Relaxed);
                crate::events::failed(&e);
                Verdict::Fail(e)
            }
        }
    }
}

impl Drop for CtxInner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if self.manual {
            let params = std::mem::take(&mut self.params);
            self.guard.after_update(&params);
        }
        if let Some(p) = self.take_guard().into_pending() {
            *self.site.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
    }
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

/// Tag: the operands are tensors, protect the operation.
#[derive(Clone, Copy)]
pub struct Protect;
/// Tag: a number divided by a tensor, protect the divisor.
#[derive(Clone, Copy)]
pub struct ProtectNumerator;
/// Tag: anything else, the plain operation.
#[derive(Clone, Copy)]
pub struct Plain;
/// Tag: an optimizer, guard its step.
#[derive(Clone, Copy)]
pub struct Guard;

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
    DivTensor, __sg_div_tag, Protect
);
probe_trait!(
    /// `number / tensor`.
    DivNumber, __sg_div_tag, ProtectNumerator
);
probe_trait!(
    /// Anything else divided.
    DivPlain, __sg_div_tag, Plain
);
probe_trait!(
    /// A tensor's log.
    LogTensor, __sg_log_tag, Protect
);
probe_trait!(
    /// Anything else's log.
    LogPlain, __sg_log_tag, Plain
);
probe_trait!(
    /// A tensor loss.
    LossTensor, __sg_loss_tag, Protect
);
probe_trait!(
    /// Anything else with a `backward()`.
    LossPlain, __sg_loss_tag, Plain
);
probe_trait!(
    /// An optimizer.
    StepOptimizer, __sg_step_tag, Guard
);
probe_trait!(
    /// Anything else with a `step()` (an LR scheduler).
    StepPlain, __sg_step_tag, Plain
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

impl Protect {
    /// Protected `a / b`.
    pub fn div<A: IsTensor, B: IsTensor, R>(
        self,
        a: A,
        b: B,
        eps: f64,
        _plain: impl FnOnce(A, B) -> R,
    ) -> Tensor {
        crate::safe_div(a.as_tensor(), b.as_tensor(), eps)
    }
    /// Protected `a /= b`, in place.
    pub fn div_assign<B: IsTensor>(
        self,
        a: &mut Tensor,
        b: B,
        eps: f64,
        _plain: impl FnOnce(&mut Tensor, B),
    ) {
        let d = crate::protect_divisor(b.as_tensor(), eps);
        let _ = a.g_div_(&d);
    }
    /// Protected `a.div(b)`.
    pub fn div_method<A: IsTensor, B: IsTensor, R>(
        self,
        a: &A,
        b: B,
        eps: f64,
        _plain: impl FnOnce(&A, B) -> R,
    ) -> Tensor {
        crate::safe_div(a.as_tensor(), b.as_tensor(), eps)
    }
    /// Protected `x.log()`.
    pub fn log<A: IsTensor, R>(self, x: &A, eps: f64, _plain: impl FnOnce(&A) -> R) -> Tensor {
        crate::safe_log(x.as_tensor(), eps)
    }
    /// Protected `x.log2()`.
    pub fn log2<A: IsTensor, R>(self, x: &A, eps: f64, _plain: impl FnOnce(&A) -> R) -> Tensor {
        crate::safe_log2(x.as_tensor(), eps)
    }
    /// Protected `x.log10()`.
    pub fn log10<A: IsTensor, R>(self, x: &A, eps: f64, _plain: impl FnOnce(&A) -> R) -> Tensor {
        crate::safe_log10(x.as_tensor(), eps)
    }
    /// A tensor bound by `let`: the `forward` check.
    pub fn bind<A: IsTensor>(
        self,
        ctx: &Ctx,
        x: &A,
        name: &'static str,
        line: u32,
        kind: &'static str,
    ) {
        ctx.bind(x.as_tensor(), name, line, kind)
    }
    /// The loss check.
    pub fn loss<A: IsTensor>(
        self,
        ctx: &Ctx,
        loss: &A,
        read_now: bool,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        ctx.loss(loss.as_tensor(), read_now, names)
    }
}

impl ProtectNumerator {
    /// Protected `n / b`.
    pub fn div<A: IsNumber, B: IsTensor, R>(
        self,
        a: A,
        b: B,
        eps: f64,
        _plain: impl FnOnce(A, B) -> R,
    ) -> Tensor {
        crate::safe_rdiv(a.into(), b.as_tensor(), eps)
    }
}

impl Plain {
    /// Plain `a / b`.
    pub fn div<A, B, R>(self, a: A, b: B, _eps: f64, plain: impl FnOnce(A, B) -> R) -> R {
        plain(a, b)
    }
    /// Plain `a /= b`.
    pub fn div_assign<A: ?Sized, B>(
        self,
        a: &mut A,
        b: B,
        _eps: f64,
        plain: impl FnOnce(&mut A, B),
    ) {
        plain(a, b)
    }
    /// Plain `a.div(b)`.
    pub fn div_method<A: ?Sized, B, R>(
        self,
        a: &A,
        b: B,
        _eps: f64,
        plain: impl FnOnce(&A, B) -> R,
    ) -> R {
        plain(a, b)
    }
    /// Plain `x.log()`.
    pub fn log<A: ?Sized, R>(self, x: &A, _eps: f64, plain: impl FnOnce(&A) -> R) -> R {
        plain(x)
    }
    /// Plain `x.log2()`.
    pub fn log2<A: ?Sized, R>(self, x: &A, _eps: f64, plain: impl FnOnce(&A) -> R) -> R {
        plain(x)
    }
    /// Plain `x.log10()`.
    pub fn log10<A: ?Sized, R>(self, x: &A, _eps: f64, plain: impl FnOnce(&A) -> R) -> R {
        plain(x)
    }
    /// Not a tensor: nothing to check.
    pub fn bind<A: ?Sized>(self, _: &Ctx, _: &A, _: &'static str, _: u32, _: &'static str) {}
    /// Not a tensor: no loss check.
    pub fn loss<A: ?Sized>(self, _: &Ctx, _: &A, _: bool, _: &[&dyn ParamSource]) -> Verdict {
        Verdict::Proceed
    }
    /// Not an optimizer: no check around its `step()`.
    pub fn before<A: ?Sized>(
        self,
        _: &Ctx,
        _: &A,
        _: Option<f64>,
        _: &[&dyn ParamSource],
    ) -> Verdict {
        Verdict::Proceed
    }
    /// Not an optimizer.
    pub fn after(self, _: &Ctx) {}
}

impl Guard {
    /// Before the optimizer's step: clip, check, one host read.
    pub fn before<A: GuardedOptimizer + ?Sized>(
        self,
        ctx: &Ctx,
        opt: &A,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        ctx.before(opt.guard_params(), max_norm, names)
    }
    /// After the step.
    pub fn after(self, ctx: &Ctx) {
        ctx.after()
    }

    /// tch's `backward_step` family, guarded: loss check, zero_grad, backward, optional
    /// value clipping, then clipping and the step's one read, and the step itself when it
    /// passes. `Skip` and `Fail` leave the parameters untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_step<O: GuardedOptimizer + ?Sized, L: IsTensor + ?Sized>(
        self,
        ctx: &Ctx,
        opt: &mut O,
        loss: &L,
        clip_value: Option<f64>,
        max_norm: Option<f64>,
        names: &[&dyn ParamSource],
    ) -> Verdict {
        let loss = loss.as_tensor();
        if let v @ (Verdict::Fail(_) | Verdict::Skip) = ctx.loss(loss, false, names) {
            return v;
        }
        opt.guard_zero_grad();
        loss.backward();
        if let Some(v) = clip_value {
            opt.guard_clip_grad_value(v);
        }
        match ctx.before(opt.guard_params(), max_norm, names) {
            Verdict::Proceed => {
                opt.guard_step();
                ctx.after();
                Verdict::Proceed
            }
            other => other,
        }
    }
}

/// Picks how a skip that ran out of `max_skips` escalates in a function returning
/// `Result<_, E>`: `Err(E::from(e))` when `E: From<GuardError>`, else a panic.
pub struct Escalate<E>(std::marker::PhantomData<E>);

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
