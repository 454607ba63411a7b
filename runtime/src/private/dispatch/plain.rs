//! The fallback ([`Other`]): the plain operation for anything that is not a tensor or an
//! optimizer, and a watched `step()` on a non-optimizer after a `backward()`.

use super::super::ctx::{Ctx, Outcome, PlainStep, Verdict};
use super::probe::{At, Clip};
use crate::registry::Site;
use crate::sources::ParamSource;

/// Tag: anything else (the plain operation).
#[derive(Clone, Copy, Debug)]
pub struct Other;

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
