//! Global-norm gradient clipping that stays on the device: where the total norm is computed
//! (the host view of the CPU fast path, or ATen on the tensors' device, decided once per
//! step), the clipping itself, and the public functions.

use std::borrow::Borrow;
use tch::{Kind, TchError, Tensor};

use crate::config::check_max_norm;
use crate::error::{ConfigError, TorchError};
use crate::host_view::HostView;
use crate::norm::NormType;
use crate::shim;
use crate::values::values_of;

/// Grads of `params` that are defined (libtorch >= 2 leaves a zeroed grad undefined),
/// borrowed from them.
pub(crate) fn defined_grads<T: Borrow<Tensor>>(params: &[T]) -> shim::Grads<'_> {
    shim::Grads::of(params)
}

/// The dtype a grad's norm accumulates in: f32 for f16 (whose values cannot overflow it),
/// f64 for everything else (bf16 and f32 squares overflow f32 above ~1.8e19).
fn accumulation_kind(g: &Tensor) -> Kind {
    match g.kind() {
        Kind::Half => Kind::Float,
        _ => Kind::Double,
    }
}

/// A total grad norm, and where it was computed.
#[derive(Debug)]
pub(crate) enum Measured<'a> {
    /// On the host, by a loop over the grads' memory (the CPU fast path).
    Host(HostView<'a>, f64),
    /// On the grads' device (an f64 0-dim tensor on the first grad's device); `multi`: with
    /// the multi-tensor operators (a constant number of operators, per-tensor norms
    /// accumulated in f32 as PyTorch's, see [`Measured::exact`]).
    Device {
        grads: &'a [Tensor],
        total: Tensor,
        /// The per-tensor norms (in the order of `grads`), kept on the device when the
        /// multi-tensor operators computed them: the slow path names the bad grads from them.
        norms: Option<Tensor>,
    },
}

/// The total norm of `grads` (`None` when there is none), computed like PyTorch's
/// `clip_grad_norm_` (one norm per tensor, then the norm of those), except that it accumulates
/// widely enough not to overflow while the true value is representable in f64 (PyTorch's
/// overflows for f16 grads whose norm exceeds 65504, or f32 elements above ~1.8e19), and
/// general p-norms are scaled by their largest element.
///
/// # Errors
/// What libtorch raises computing it (a grad of a dtype or on a device it cannot take the norm
/// of); nothing is changed.
pub(crate) fn measure(grads: &[Tensor], p: NormType) -> Result<Option<Measured<'_>>, TorchError> {
    if let Some(view) = HostView::of(grads) {
        let total = view.total_norm(p);
        return Ok(Some(Measured::Host(view, total)));
    }
    let p = p.canonical();
    if shim::takes(grads) && !matches!(p, NormType::P(_)) {
        if let Ok(norms) = shim::foreach_norms(grads, p.p()) {
            let total = norms.f_norm_scalaropt_dtype(p.p(), Kind::Double)?;
            return Ok(Some(Measured::Device {
                grads,
                total,
                norms: Some(norms),
            }));
        }
    }
    Ok(device_total(grads, p)?.map(|total| Measured::Device {
        grads,
        total,
        norms: None,
    }))
}

fn device_total(grads: &[Tensor], p: NormType) -> Result<Option<Tensor>, TchError> {
    let Some(device) = grads.first().map(Tensor::device) else {
        return Ok(None);
    };
    let p = p.canonical();
    let _guard = tch::no_grad_guard();
    // An empty grad adds nothing to any norm (and ATen has no max or inf-norm of nothing).
    if grads.iter().all(|g| g.numel() == 0) {
        return Tensor::f_zeros([], (Kind::Double, device)).map(Some);
    }
    let norms = grads
        .iter()
        .filter(|g| g.numel() > 0)
        .map(|g| {
            let v = values_of(g);
            // A complex grad's norm is its modulus's.
            let v = if v.is_complex() { v.f_abs()? } else { v };
            let v = v.f_to_kind(accumulation_kind(&v))?;
            let n = match p {
                NormType::P(q) => {
                    // Scaled by the largest element: `|x|^q` overflows f64 for large q.
                    let m = v.f_abs()?.f_max()?;
                    let safe_m = m.f_where_scalarother(&m.f_gt(0.0)?, 1.0)?;
                    v.f_div(&safe_m)?
                        .f_norm_scalaropt_dtype(q, Kind::Double)?
                        .f_mul(&safe_m)?
                }
                _ => v.f_norm_scalaropt_dtype(p.p(), Kind::Double)?,
            };
            n.f_to_kind(Kind::Double)?.f_to_device(device)
        })
        .collect::<Result<Vec<Tensor>, TchError>>()?;
    let norms = Tensor::f_stack(&norms, 0)?;
    let total = match p {
        NormType::P(q) => {
            let m = norms.f_max()?;
            let ok = m.f_isfinite()?.f_logical_and(&m.f_gt(0.0)?)?;
            let safe_m = m.f_where_scalarother(&ok, 1.0)?;
            let scaled = norms
                .f_div(&safe_m)?
                .f_norm_scalaropt_dtype(q, Kind::Double)?
                .f_mul(&safe_m)?;
            scaled.f_where_self(&ok, &m)?
        }
        _ => norms.f_norm_scalaropt_dtype(p.p(), Kind::Double)?,
    };
    Ok(Some(total))
}

impl Measured<'_> {
    /// Where the total is: the CPU on the host path, else the grads' device.
    pub(crate) fn device(&self) -> tch::Device {
        match self {
            Measured::Host(..) => tch::Device::Cpu,
            Measured::Device { total, .. } => total.device(),
        }
    }

    /// The total as a 0-dim tensor (on the host path, a CPU f64 tensor).
    pub(crate) fn tensor(&self) -> Tensor {
        match self {
            Measured::Host(_, t) => Tensor::from(*t),
            Measured::Device { total, .. } => total.shallow_clone(),
        }
    }

    /// The total recomputed with every per-tensor norm accumulated in f64, when the first
    /// measure used the multi-tensor operators (whose f32 accumulation overflows for elements
    /// above ~1.8e19). Called on the slow path only, when the total came back non-finite while
    /// every grad is finite.
    pub(crate) fn exact(&self, p: NormType) -> Option<Tensor> {
        match self {
            Measured::Device {
                grads,
                norms: Some(_),
                ..
            } => device_total(grads, p).ok().flatten(),
            _ => None,
        }
    }

    /// Indices (into the grads) of the grads whose own norm is not finite, from the per-tensor
    /// norms kept on the device (one read, no pass over the grads); `None` without them.
    pub(crate) fn suspects(&self) -> Option<Vec<usize>> {
        let Measured::Device {
            norms: Some(norms), ..
        } = self
        else {
            return None;
        };
        let values = crate::sync::read_f64s(norms).ok()?;
        Some(
            values
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.is_finite())
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// Clips to `max_norm` with a total computed elsewhere (see [`Measured::exact`]).
    pub(crate) fn clip_with(&self, total: Tensor, max_norm: f64) -> Result<(), TorchError> {
        match self {
            Measured::Device { grads, norms, .. } => Measured::Device {
                grads,
                total,
                norms: norms.as_ref().map(Tensor::shallow_clone),
            }
            .clip(max_norm),
            Measured::Host(..) => Ok(()),
        }
    }

    /// The clipping coefficient `clamp(max_norm / (total + 1e-6), max = 1)` (1 for a
    /// non-finite total) as a 0-dim f32 tensor on the grads' device, not applied: a fused
    /// optimizer applies it in its kernel (`grad_scale` = 1 / coefficient).
    pub(crate) fn coefficient(&self, max_norm: f64) -> Result<Tensor, TorchError> {
        let coef = match self {
            Measured::Host(view, total) => {
                let coef = max_norm / (total + 1e-6);
                let c = if total.is_finite() && coef < 1.0 {
                    coef
                } else {
                    1.0
                };
                Tensor::from(c as f32).f_to_device(view.device())
            }
            Measured::Device { total, .. } => {
                coefficient_of(total, max_norm).and_then(|c| c.f_to_kind(Kind::Float))
            }
        };
        Ok(coef?)
    }

    /// For grads multiplied by `scale` (0-dim, loss scaling): `scale / coefficient`, the
    /// coefficient computed from the unscaled norm; dividing the grads by it unscales and clips
    /// them in one pass (a fused optimizer's `grad_scale`). On the device, no host read.
    pub(crate) fn coefficient_unscaled(
        &self,
        max_norm: f64,
        scale: &Tensor,
    ) -> Result<Tensor, tch::TchError> {
        let _guard = tch::no_grad_guard();
        let scale = scale.f_to_kind(Kind::Float)?;
        let total = self
            .tensor()
            .f_to_device(scale.device())?
            .f_to_kind(Kind::Float)?
            .f_div(&scale)?;
        let coef = total
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?
            .f_where_scalarother(&total.f_isfinite()?, 1.0)?;
        scale.f_div(&coef)
    }

    /// Clips to a threshold that is itself a 0-dim tensor (adaptive clipping): the
    /// coefficient `clamp(threshold / (total + 1e-6), max = 1)` on the device; 1 where either
    /// is not finite (an infinite threshold during warm-up clips nothing). No host read (on
    /// the CPU fast path the threshold, a CPU tensor, is read in place).
    pub(crate) fn clip_to(&self, threshold: &Tensor) -> Result<(), TorchError> {
        match self {
            Measured::Host(..) => match f64::try_from(threshold) {
                Ok(t) if t.is_finite() && t > 0.0 => self.clip(t),
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            },
            Measured::Device { grads, total, .. } => {
                let _guard = tch::no_grad_guard();
                let t = threshold
                    .f_to_device(total.device())?
                    .f_to_kind(Kind::Float)?;
                let ok = total.f_isfinite()?.f_logical_and(&t.f_isfinite()?)?;
                let coef = total
                    .f_add_scalar(1e-6)?
                    .f_reciprocal()?
                    .f_mul(&t)?
                    .f_clamp_max(1.0)?
                    .f_where_scalarother(&ok, 1.0)?;
                if shim::foreach_mul_(grads, &coef).is_ok() {
                    return Ok(());
                }
                for g in grads.iter() {
                    let _ = g.shallow_clone().f_mul_(&coef.f_to_device(g.device())?)?;
                }
                Ok(())
            }
        }
    }

    /// The per-tensor norms kept on the device (the multi-tensor path), if any.
    pub(crate) fn per_tensor(&self) -> Option<Tensor> {
        match self {
            Measured::Device { norms: Some(n), .. } => Some(n.shallow_clone()),
            _ => None,
        }
    }

    /// Scales every grad by `clamp(max_norm / (total + 1e-6), max = 1)`, in place, without a
    /// host read. A non-finite total leaves the grads untouched (coefficient 1), so the
    /// NaN/Inf stays where it came from and can be attributed; PyTorch multiplies it into every
    /// grad. `max_norm` must be valid ([`crate::config::check_max_norm`]): then the
    /// coefficient is finite and in (0, 1], so the grads check of the total covers the clipped
    /// grads.
    ///
    /// # Errors
    /// What libtorch raises computing the coefficient (nothing is scaled then) or scaling.
    pub(crate) fn clip(&self, max_norm: f64) -> Result<(), TorchError> {
        match self {
            Measured::Host(view, total) => {
                let coef = max_norm / (total + 1e-6);
                if total.is_finite() && coef < 1.0 {
                    view.scale(coef);
                }
                Ok(())
            }
            Measured::Device {
                grads,
                total,
                norms,
            } => {
                let coef = coefficient_of(total, max_norm)?;
                let _guard = tch::no_grad_guard();
                if norms.is_some() && shim::foreach_mul_(grads, &coef).is_ok() {
                    return Ok(());
                }
                for g in grads.iter() {
                    let c = if g.device() == coef.device() {
                        coef.shallow_clone()
                    } else {
                        coef.f_to_device(g.device())?
                    };
                    let _ = g.shallow_clone().f_mul_(&c)?;
                }
                Ok(())
            }
        }
    }
}

/// `clamp(max_norm / (total + 1e-6), max = 1)`, 1 where `total` is not finite, with PyTorch's
/// arithmetic (`max_norm / t` is `t.reciprocal() * max_norm`). No host read.
fn coefficient_of(total: &Tensor, max_norm: f64) -> Result<Tensor, TchError> {
    total
        .f_add_scalar(1e-6)?
        .f_reciprocal()?
        .f_mul_scalar(max_norm)?
        .f_clamp_max(1.0)?
        .f_where_scalarother(&total.f_isfinite()?, 1.0)
}

/// The dtype a total is returned in: the grads' promoted floating dtype, at least f32 (an f16
/// model's norm can exceed 65504).
fn reported_kind(grads: &[Tensor]) -> Kind {
    if grads
        .iter()
        .any(|g| matches!(g.kind(), Kind::Double | Kind::ComplexDouble))
    {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Clips the global norm of the parameters' gradients to `max_norm`, in place, and returns the
/// total norm (before clipping) as a 0-dim tensor on the grads' device.
///
/// The numbers are those of `torch.nn.utils.clip_grad_norm_` for every norm type: each grad is
/// multiplied by `clamp(max_norm / (total + 1e-6), max = 1)`. Unlike tch's
/// `Optimizer::clip_grad_norm`, nothing is read back to the host (zero syncs), and unlike both
/// a NaN or infinite total leaves the grads as they are instead of spreading NaN into all of
/// them: check the returned norm (or use `#[guarded_step]`) before stepping. The norm is
/// accumulated in f64 (f32 for f16 grads), so it does not overflow where PyTorch's does (f16
/// grads with a norm above 65504, f32 elements above ~1.8e19): such grads are clipped.
///
/// Parameters without a gradient are skipped; with no gradient at all the result is a zero
/// norm (on the CPU when there are no parameters either).
///
/// # Errors
/// [`ClipError::Config`] when `max_norm` is not valid ([`ConfigError::MaxNorm`]) or the norm
/// order is not above zero ([`ConfigError::NormType`]); [`ClipError::Torch`] when libtorch
/// cannot compute the norm (a grad of a dtype without one). The grads are unchanged then.
pub fn clip_grad_norm<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    max_norm: f64,
    norm_type: impl Into<NormType>,
) -> Result<Tensor, ClipError> {
    let norm_type = norm_type.into().validate()?;
    let max_norm = check_max_norm(max_norm)?;
    total_and(params, norm_type, Some(max_norm))
}

/// Global gradient norm without clipping (zero host reads).
///
/// # Errors
/// As [`clip_grad_norm`].
pub fn grad_norm<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    norm_type: impl Into<NormType>,
) -> Result<Tensor, ClipError> {
    let norm_type = norm_type.into().validate()?;
    total_and(params, norm_type, None)
}

fn total_and<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    norm_type: NormType,
    max_norm: Option<f64>,
) -> Result<Tensor, ClipError> {
    let params: Vec<T> = params.into_iter().collect();
    let grads = defined_grads(&params);
    let Some(m) = measure(&grads, norm_type)? else {
        let first = params.first().map(Borrow::borrow);
        let kind = reported_kind(first.map(Tensor::shallow_clone).as_slice());
        let device = first.map_or(tch::Device::Cpu, Tensor::device);
        return Ok(Tensor::f_zeros([], (kind, device)).map_err(TorchError::from)?);
    };
    if let Some(max_norm) = max_norm {
        m.clip(max_norm)?;
    }
    let total = m.tensor().f_to_kind(reported_kind(&grads));
    Ok(total.map_err(TorchError::from)?)
}

/// Why [`clip_grad_norm`] or [`grad_norm`] returned no norm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClipError {
    /// An invalid `max_norm` or norm order: nothing was computed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// libtorch could not compute the norm (the grads are unchanged) or scale a grad.
    #[error(transparent)]
    Torch(#[from] TorchError),
}

#[cfg(test)]
mod tests;
