//! An optimizer's guarded step ([`Optimizer`]): `step()` and tch's `backward_step` family,
//! every step or deferred to a fused optimizer, and their clipping-only forms when the
//! checks are stripped.

use tch::Tensor;

use super::super::ctx::{Ctx, Outcome, Verdict};
use super::probe::{At, Clip, IsTensor};
use crate::config::Config;
use crate::registry::Site;
use crate::sources::{DeviceSkipOptimizer, GuardedOptimizer, ParamSource};

/// Tag: a [`GuardedOptimizer`] (guard its step).
#[derive(Clone, Copy, Debug)]
pub struct Optimizer;

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
        match on_device(ctx, o, None, names) {
            Outcome::Value(()) => Outcome::Value(R::default()),
            Outcome::Fail(e) => Outcome::Fail(e),
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
        backward_then(ctx, opt, loss, clip, at, names, on_device)
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
        checked(ctx, o, None, names, step)
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
        let update = |ctx: &Ctx<'_>, o: &mut O, max_norm, names: &[&dyn ParamSource]| {
            // A step the optimizer refuses (nothing changed) is the step's error.
            match checked(ctx, o, max_norm, names, |o| o.guard_try_step().err()) {
                Outcome::Value(None) => Outcome::Value(()),
                Outcome::Value(Some(e)) => Outcome::Fail(ctx.refused(e)),
                Outcome::Fail(e) => Outcome::Fail(e),
            }
        };
        backward_then(ctx, opt, loss, clip, at, names, update)
    }
}

/// tch's `backward_step` family up to the update (the loss check, zero_grad, backward, value
/// clipping), then `update` with the call's `max_norm`.
fn backward_then<O: GuardedOptimizer + ?Sized, L: IsTensor + ?Sized>(
    ctx: &Ctx<'_>,
    opt: &mut O,
    loss: &L,
    clip: Clip,
    at: &At,
    names: &[&dyn ParamSource],
    update: impl FnOnce(&Ctx<'_>, &mut O, Option<f64>, &[&dyn ParamSource]) -> Outcome<()>,
) -> Outcome<()> {
    let loss = loss.as_tensor();
    let (clip_value, max_norm) = clip.split();
    if let Some(v) = ctx.backward_step_start(opt, loss, clip_value, (at.line, at.expr), names) {
        return v.into();
    }
    update(ctx, opt, max_norm, names)
}

/// The update of `o` under `sync = "every_step"`: the checks' one read, then `step` when they
/// pass (a skip returns `R::default()`).
fn checked<O: GuardedOptimizer + ?Sized, R: Default>(
    ctx: &Ctx<'_>,
    o: &mut O,
    max_norm: Option<f64>,
    names: &[&dyn ParamSource],
    step: impl FnOnce(&mut O) -> R,
) -> Outcome<R> {
    match ctx.before(o.guard_params(), max_norm, names) {
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

/// The update of `o` under `sync = "deferred"`: the checks and the clipping handed to its
/// kernel, which skips on the device.
fn on_device<O: DeviceSkipOptimizer + ?Sized>(
    ctx: &Ctx<'_>,
    o: &mut O,
    max_norm: Option<f64>,
    names: &[&dyn ParamSource],
) -> Outcome<()> {
    match ctx.before_deferred(o.guard_params(), max_norm, names) {
        Ok((found_inf, grad_scale)) => {
            // A step the optimizer refuses (nothing changed) is the step's error.
            if let Err(e) = o.guard_try_step_on_device(grad_scale.as_ref(), &found_inf) {
                return Outcome::Fail(ctx.refused(e));
            }
            ctx.after();
            Outcome::Value(())
        }
        Err(e) => Outcome::Fail(e),
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
