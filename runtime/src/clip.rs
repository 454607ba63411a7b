//! Global-norm gradient clipping that stays on the device: the public functions.

use std::borrow::Borrow;
use tch::{Kind, Tensor};

use crate::config::check_max_norm;
use crate::error::ConfigError;
use crate::norm::{measure, NormType};

/// Grads of `params` that are defined (libtorch >= 2 leaves a zeroed grad undefined).
pub(crate) fn defined_grads<T: Borrow<Tensor>>(params: impl IntoIterator<Item = T>) -> Vec<Tensor> {
    params
        .into_iter()
        .map(|p| p.borrow().grad())
        .filter(Tensor::defined)
        .collect()
}

/// The dtype a total is returned in: the grads' promoted floating dtype, at least f32 (an f16
/// model's norm can exceed 65504).
fn reported_kind(grads: &[Tensor]) -> Kind {
    if grads.iter().any(|g| g.kind() == Kind::Double) {
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
/// [`ConfigError::MaxNorm`] when `max_norm` is not a finite number above zero,
/// [`ConfigError::NormType`] when the norm order is not above zero.
pub fn clip_grad_norm<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    max_norm: f64,
    norm_type: impl Into<NormType>,
) -> Result<Tensor, ConfigError> {
    let norm_type = norm_type.into().validate()?;
    let max_norm = check_max_norm(max_norm)?;
    total_and(params, norm_type, Some(max_norm))
}

/// Global gradient norm without clipping (zero host reads).
pub fn grad_norm<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    norm_type: impl Into<NormType>,
) -> Result<Tensor, ConfigError> {
    let norm_type = norm_type.into().validate()?;
    total_and(params, norm_type, None)
}

fn total_and<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    norm_type: NormType,
    max_norm: Option<f64>,
) -> Result<Tensor, ConfigError> {
    let params: Vec<T> = params.into_iter().collect();
    let grads = defined_grads(params.iter().map(Borrow::borrow));
    let Some(m) = measure(&grads, norm_type) else {
        return Ok(match params.first().map(Borrow::borrow) {
            Some(p) => Tensor::zeros([], (p.kind(), p.device())),
            None => Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
        });
    };
    if let Some(max_norm) = max_norm {
        m.clip(max_norm);
    }
    Ok(m.tensor().to_kind(reported_kind(&grads)))
}
