//! The [`Optimizer`](super::Optimizer) tag's guarded operations: `step()`, `backward_step*`, and their
//! `sync = "deferred"` forms.

use super::ctx::{Ctx, Outcome, Verdict};
use super::dispatch::{IsTensor, Optimizer};
use crate::sources::{DeviceSkipOptimizer, GuardedOptimizer, ParamSource};

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
        if let v @ (Verdict::Fail(_) | Verdict::Skip) = ctx.loss(loss, false, line, expr, names) {
            return v;
        }
        opt.guard_zero_grad();
        match ctx.scaled(loss) {
            Ok(None) => loss.backward(),
            Ok(Some(scaled)) => scaled.backward(),
            Err(e) => return Verdict::Fail(e),
        }
        if let Some(v) = clip_value {
            opt.guard_clip_grad_value(v);
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
        if let v @ (Verdict::Fail(_) | Verdict::Skip) = ctx.loss(loss, false, line, expr, names) {
            return v;
        }
        opt.guard_zero_grad();
        match ctx.scaled(loss) {
            Ok(None) => loss.backward(),
            Ok(Some(scaled)) => scaled.backward(),
            Err(e) => return Verdict::Fail(e),
        }
        if let Some(v) = clip_value {
            opt.guard_clip_grad_value(v);
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
