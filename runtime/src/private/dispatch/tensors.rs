//! The guarded forms for tensors: epsilon-protected division and log, the check of a `let`
//! binding (`forward`), and the loss check before `backward()`.

use tch::Tensor;

use super::super::ctx::{Ctx, Outcome, Verdict};
use super::probe::{At, IsNumber, IsTensor};
use crate::sources::ParamSource;

/// Tag: the operands are tensors (protect the operation, check the loss).
#[derive(Clone, Copy, Debug)]
pub struct Tensors;
/// Tag: a number divided by a tensor (protect the divisor).
#[derive(Clone, Copy, Debug)]
pub struct NumberByTensor;

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
