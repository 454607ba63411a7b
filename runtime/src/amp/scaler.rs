//! The scaler of one [`GuardState`](crate::GuardState): the scale on the device, which grads
//! still carry it, unscaling before an update, and GradScaler.update at the end of a call.

use crate::error::TorchError;
use tch::{Device, Kind, TchError, Tensor};

use super::LossScale;
use crate::shim::{self, ScaleUpdate};
use crate::values::values_of;

/// What unscaling left for the step's read.
#[derive(Debug)]
pub(crate) struct Unscaled {
    /// The scale the grads were unscaled by (0-dim f32), read with the step's flags.
    pub scale: Tensor,
    /// `found_inf` of the unscale (0-dim f32, > 0 on overflow).
    pub found_inf: Tensor,
}

/// How an update under `sync = "deferred"` deals with the scale.
#[derive(Debug)]
pub(crate) struct DeferredScale {
    /// 0-dim f32, > 0 when a grad overflowed.
    pub found_inf: Tensor,
    /// The scale for the kernel to divide the grads by, when it unscales them.
    pub kernel: Option<Tensor>,
    /// The scale now (a copy), for the verdict read later.
    pub scale_now: Tensor,
    /// The scaler's numbers.
    pub params: LossScale,
}

/// What one update needs of the scaler ([`Scaler::plan`]): the scale, the grads that still
/// carry it, the scaler's numbers.
#[derive(Debug)]
pub(crate) struct ScalePlan {
    scale: Tensor,
    todo: Vec<Tensor>,
    pub params: LossScale,
}

impl ScalePlan {
    /// Before an update: unscales the grads that a scaled loss produced and no update
    /// unscaled yet. No host read.
    pub(crate) fn unscale_update(self) -> Result<Unscaled, TorchError> {
        let found_inf = unscale(&self.scale, &self.todo)?;
        Ok(Unscaled {
            scale: self.scale,
            found_inf,
        })
    }

    /// Before an update under `sync = "deferred"`: when every grad of `grads` still carries
    /// the scale, they are left scaled for the fused kernel to unscale (`kernel`: the scale,
    /// divided by in the kernel) and only checked for overflow; otherwise those that carry it
    /// are unscaled here. No host read.
    pub(crate) fn plan_deferred(self, grads: &[Tensor]) -> Result<DeferredScale, TorchError> {
        let all = !grads.is_empty() && self.todo.len() == grads.len();
        let found_inf = if all {
            check_overflow(&self.scale, grads)?
        } else {
            unscale(&self.scale, &self.todo)?
        };
        Ok(DeferredScale {
            found_inf,
            kernel: all.then(|| self.scale.shallow_clone()),
            scale_now: self.scale.f_detach_copy()?,
            params: self.params,
        })
    }
}

/// Unscales `grads` by `scale` in place; the returned 0-dim f32 `found_inf` is > 0 when one of
/// them held NaN/Inf. No host read.
fn unscale(scale: &Tensor, grads: &[Tensor]) -> Result<Tensor, TorchError> {
    let _guard = tch::no_grad_guard();
    // As GradScaler: the reciprocal in f64, then f32.
    let inv = scale
        .f_to_kind(Kind::Double)
        .and_then(|s| s.f_reciprocal())
        .and_then(|s| s.f_to_kind(Kind::Float))
        .map_err(TorchError::from)?;
    Scaler::unscale_by(grads, &inv)
}

/// `found_inf` of the (still scaled) grads, left as they are: what GradScaler checks before a
/// fused optimizer's step (an unscale by 1). No host read.
fn check_overflow(scale: &Tensor, grads: &[Tensor]) -> Result<Tensor, TorchError> {
    let _guard = tch::no_grad_guard();
    let one = scale.f_ones_like().map_err(TorchError::from)?;
    Scaler::unscale_by(grads, &one)
}

/// The scale and growth tracker of one [`GuardState`](crate::GuardState), on the device of the
/// first scaled loss.
#[derive(Debug)]
pub(crate) struct Scaler {
    params: LossScale,
    scale: Tensor,
    growth_tracker: Tensor,
    /// The scale last read by the host (with a step's read), for reports.
    pub(crate) last_read: Option<f64>,
    /// Updates skipped because their grads overflowed at the scale.
    pub(crate) overflows: u64,
    /// A loss was scaled and its grads may not all be unscaled yet: updates unscale only then
    /// (grads from a backward the guard did not scale are left as they are).
    pub(crate) scaled_pending: bool,
    /// Grads already unscaled, per parameter (by its data pointer; the parameter is held, so
    /// the address is its own): the grad (held too, so that a new grad cannot take its
    /// address) and its version counter then. A second optimizer on the same backward, or a
    /// second update of the same grads, does not unscale them twice.
    unscaled: std::collections::HashMap<usize, (Tensor, Tensor, i64)>,
}

impl Scaler {
    pub(crate) fn new(params: LossScale, device: Device) -> Self {
        Scaler {
            params,
            scale: Tensor::full([], params.init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([], (Kind::Int, device)),
            last_read: Some(params.init_scale),
            overflows: 0,
            scaled_pending: false,
            unscaled: std::collections::HashMap::new(),
        }
    }

    /// What a checkpoint keeps: copies of the scale and the growth tracker (on the CPU), and
    /// the overflows counted.
    pub(crate) fn saved(&self) -> Result<(Tensor, Tensor, u64), tch::TchError> {
        let cpu = |t: &Tensor| t.f_detach_copy().and_then(|t| t.f_to_device(Device::Cpu));
        Ok((
            cpu(&self.scale)?,
            cpu(&self.growth_tracker)?,
            self.overflows,
        ))
    }

    /// A scaler that continues from a checkpoint ([`Scaler::saved`]) on `device`.
    pub(crate) fn resumed(
        params: LossScale,
        device: Device,
        scale: &Tensor,
        growth_tracker: &Tensor,
        overflows: u64,
    ) -> Result<Scaler, tch::TchError> {
        let mut s = Scaler::new(params, device);
        s.scale = scale
            .f_to_kind(Kind::Float)?
            .f_to_device(device)?
            .f_reshape([])?;
        s.growth_tracker = growth_tracker
            .f_to_kind(Kind::Int)?
            .f_to_device(device)?
            .f_reshape([])?;
        s.last_read = Some(f64::try_from(&s.scale.f_to_device(Device::Cpu)?)?);
        s.overflows = overflows;
        Ok(s)
    }

    /// The scaler's numbers.
    pub(crate) fn params(&self) -> LossScale {
        self.params
    }

    /// The scale (a 0-dim f32 on the scaler's device; shares its storage, so read it before
    /// the scale is updated).
    pub(crate) fn scale(&self) -> Tensor {
        self.scale.shallow_clone()
    }

    /// `loss * scale` (the scale moved to the loss's device; the loss's dtype kept, as
    /// GradScaler.scale does).
    pub(crate) fn scale_loss(&self, loss: &Tensor) -> Result<Tensor, TchError> {
        loss.f_mul(&self.scale.f_to_device(loss.device())?)
    }

    /// The grads of `params` that still carry the scale: none unless a scaled loss is pending,
    /// and not those an earlier update unscaled (the same grad, unchanged since).
    pub(crate) fn still_scaled(&self, params: &[Tensor]) -> Vec<Tensor> {
        if !self.scaled_pending {
            return Vec::new();
        }
        params
            .iter()
            .filter_map(|p| {
                let g = p.grad();
                if !g.defined() {
                    return None;
                }
                let done =
                    self.unscaled
                        .get(&(p.data_ptr() as usize))
                        .is_some_and(|(_, old, version)| {
                            old.data_ptr() == g.data_ptr() && *version == g.internal_version()
                        });
                (!done).then_some(g)
            })
            .collect()
    }

    /// Notes the grads of `params` as unscaled, as they are now.
    pub(crate) fn mark_unscaled(&mut self, params: &[Tensor]) {
        for p in params {
            let g = p.grad();
            if g.defined() {
                let version = g.internal_version();
                self.unscaled
                    .insert(p.data_ptr() as usize, (p.shallow_clone(), g, version));
            }
        }
    }

    /// Every scaled grad has been unscaled: the next update unscales nothing unless a loss is
    /// scaled again.
    pub(crate) fn settle(&mut self) {
        self.scaled_pending = false;
        self.unscaled.clear();
    }

    /// Unscales `grads` by `inv` in place; the returned 0-dim f32 `found_inf` is > 0 when one of
    /// them held NaN/Inf. No host read.
    fn unscale_by(grads: &[Tensor], inv: &Tensor) -> Result<Tensor, TorchError> {
        if grads.is_empty() {
            return inv.f_zeros_like().map_err(TorchError::from);
        }
        if shim::takes(grads) {
            return shim::amp_unscale_(grads, inv);
        }
        // Sparse (or mkldnn) grads: one multiply per tensor, found_inf from the stored values.
        (|| -> Result<Tensor, TchError> {
            let mut found = inv.f_zeros_like()?;
            for g in grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_(&inv.f_to_device(g.device())?)?;
                let bad = values_of(&g).f_isfinite()?.f_all()?.f_logical_not()?;
                found = found.f_add(&bad.f_to_kind(Kind::Float)?.f_to_device(inv.device())?)?;
            }
            Ok(found)
        })()
        .map_err(TorchError::from)
    }

    /// GradScaler.update: `_amp_update_scale_` with `found_inf` (the sum of the updates'
    /// indicators), then the scale clamped to `min_scale`. On the device, no host read.
    pub(crate) fn update(&self, found_inf: &Tensor) -> Result<(), TorchError> {
        let _guard = tch::no_grad_guard();
        let found = found_inf
            .f_to_device(self.scale.device())
            .and_then(|f| f.f_to_kind(Kind::Float))
            .map_err(TorchError::from)?;
        shim::amp_update_scale_(
            &self.scale,
            &self.growth_tracker,
            &found,
            ScaleUpdate {
                growth_factor: self.params.growth_factor,
                backoff_factor: self.params.backoff_factor,
                growth_interval: i64::from(self.params.growth_interval),
                min_scale: self.params.min_scale,
            },
        )
    }
}

impl Scaler {
    /// What an update of `params` needs of the scaler, taken with the update's state: the
    /// scale, the grads that still carry it, the scaler's numbers. The scaler itself changes
    /// only when the update's state goes back ([`Scaler::mark_unscaled`], [`Scaler::note`]).
    pub(crate) fn plan(&self, params: &[Tensor]) -> ScalePlan {
        ScalePlan {
            scale: self.scale(),
            todo: self.still_scaled(params),
            params: self.params,
        }
    }

    /// Notes the scale the host just read, and counts an overflow.
    pub(crate) fn note(&mut self, scale: f64, overflow: bool) {
        self.last_read = Some(scale);
        self.overflows += u64::from(overflow);
    }

    /// The end of a call with updates: GradScaler.update with the updates' `found_inf` summed,
    /// on the device. `settle`: every scaled grad has been unscaled (no loss was scaled after
    /// the call's last update). Errors here surface at the next step's read.
    pub(crate) fn end_call(&mut self, found: &[Tensor], settle: bool) {
        if settle {
            self.settle();
        }
        let _guard = tch::no_grad_guard();
        let device = found[0].device();
        let mut total = Ok(found[0].shallow_clone());
        for f in &found[1..] {
            total = total.and_then(|t| t.f_add(&f.f_to_device(device)?));
        }
        if let Ok(total) = total {
            let _ = self.update(&total);
        }
    }
}
