//! Global-norm gradient clipping that stays on the device.

use std::borrow::Borrow;
use std::fmt;
use tch::{Kind, Tensor};

use crate::error::ConfigError;
use crate::fused;

/// The norm used for the global gradient norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormType {
    /// Sum of absolute values.
    L1,
    /// Euclidean norm (the default).
    L2,
    /// Largest absolute value.
    Inf,
    /// `(Σ|g|^p)^(1/p)` for any `p > 0`.
    P(f64),
}

impl NormType {
    /// The norm's exponent (`f64::INFINITY` for [`NormType::Inf`]).
    pub fn p(self) -> f64 {
        match self {
            NormType::L1 => 1.0,
            NormType::L2 => 2.0,
            NormType::Inf => f64::INFINITY,
            NormType::P(p) => p,
        }
    }

    /// Checks that the exponent is a usable norm order (`p > 0`, or infinity).
    pub fn validate(self) -> Result<Self, ConfigError> {
        let p = self.p();
        if p > 0.0 && !p.is_nan() {
            Ok(self)
        } else {
            Err(ConfigError::NormType(p))
        }
    }
}

impl From<f64> for NormType {
    fn from(p: f64) -> Self {
        match p {
            1.0 => NormType::L1,
            2.0 => NormType::L2,
            p if p == f64::INFINITY => NormType::Inf,
            p => NormType::P(p),
        }
    }
}

impl From<i32> for NormType {
    fn from(p: i32) -> Self {
        NormType::from(p as f64)
    }
}

impl fmt::Display for NormType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NormType::Inf => f.write_str("inf"),
            other => write!(f, "{}", other.p()),
        }
    }
}

/// Grads of `params` that are defined (libtorch >= 2 leaves a zeroed grad undefined).
pub(crate) fn defined_grads<T: Borrow<Tensor>>(params: impl IntoIterator<Item = T>) -> Vec<Tensor> {
    params
        .into_iter()
        .map(|p| p.borrow().grad())
        .filter(Tensor::defined)
        .collect()
}

/// The stored values of `t`: itself when dense, the (coalesced) values when sparse, so norms,
/// sums and counts see each element once.
pub(crate) fn values_of(t: &Tensor) -> Tensor {
    if t.is_sparse() {
        t.coalesce().values()
    } else {
        t.shallow_clone()
    }
}

/// Total norm of `grads` as a 0-dim tensor on the first grad's device, computed like
/// PyTorch's `clip_grad_norm_`: one norm per tensor, then the norm of the stacked norms.
/// `None` when there is nothing to measure.
pub(crate) fn total_norm(grads: &[Tensor], norm_type: NormType) -> Option<Tensor> {
    let first = grads.first()?;
    let device = first.device();
    let p = norm_type.p();
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| {
            values_of(g)
                .norm_scalaropt_dtype(p, g.kind())
                .to_device(device)
        })
        .collect();
    Some(Tensor::stack(&norms, 0).norm_scalaropt_dtype(p, promoted_kind(grads)))
}

fn promoted_kind(grads: &[Tensor]) -> Kind {
    let mut kind = grads[0].kind();
    for g in &grads[1..] {
        kind = promote(kind, g.kind());
    }
    kind
}

fn promote(a: Kind, b: Kind) -> Kind {
    use Kind::*;
    let rank = |k: Kind| match k {
        Half | BFloat16 => 1,
        Float => 2,
        Double => 3,
        _ => 0,
    };
    match (a, b) {
        (Half, BFloat16) | (BFloat16, Half) => Float,
        _ if rank(a) >= rank(b) => a,
        _ => b,
    }
}

/// Scales every grad by `clamp(max_norm / (total + 1e-6), max = 1)`, on the device, without a
/// host read. A non-finite total leaves the grads untouched (coefficient 1), so the NaN/Inf
/// stays where it came from and can be attributed; PyTorch multiplies it into every grad.
pub(crate) fn scale_grads(grads: &[Tensor], total: &Tensor, max_norm: f64) {
    // Same arithmetic as PyTorch: `max_norm / t` is `t.reciprocal() * max_norm` there.
    let coef = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    let coef = coef.where_scalarother(&total.isfinite(), 1.0);
    let _guard = tch::no_grad_guard();
    for g in grads {
        let mut g = g.shallow_clone();
        let c = if g.device() == coef.device() {
            coef.shallow_clone()
        } else {
            coef.to_device(g.device())
        };
        let _ = g.g_mul_(&c);
    }
}

/// Clips the global norm of the parameters' gradients to `max_norm`, in place, and returns the
/// total norm (before clipping) as a 0-dim tensor on the grads' device.
///
/// The numbers are those of `torch.nn.utils.clip_grad_norm_` for every norm type: each grad is
/// multiplied by `clamp(max_norm / (total + 1e-6), max = 1)`. Unlike tch's
/// `Optimizer::clip_grad_norm`, nothing is read back to the host (zero syncs), and unlike both
/// a NaN or infinite total leaves the grads as they are instead of spreading NaN into all of
/// them: check the returned norm (or use `#[guarded_step]`) before stepping.
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
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(ConfigError::MaxNorm(max_norm));
    }
    let params: Vec<T> = params.into_iter().collect();
    let grads = defined_grads(params.iter().map(Borrow::borrow));
    if let Some(total) = fused::total_norm(&grads, norm_type) {
        clip_host(&grads, total, max_norm);
        return Ok(Tensor::from(total).to_kind(promoted_kind(&grads)));
    }
    let Some(total) = total_norm(&grads, norm_type) else {
        return Ok(zero_norm(params.first().map(Borrow::borrow)));
    };
    scale_grads(&grads, &total, max_norm);
    Ok(total)
}

/// The CPU fast path of clipping: the coefficient is known on the host, so the grads are only
/// touched when it is below 1 (and never for a non-finite total).
pub(crate) fn clip_host(grads: &[Tensor], total: f64, max_norm: f64) {
    let coef = max_norm / (total + 1e-6);
    if total.is_finite() && coef < 1.0 {
        fused::scale(grads, coef);
    }
}

/// Global gradient norm without clipping (zero host reads).
pub fn grad_norm<T: Borrow<Tensor>>(
    params: impl IntoIterator<Item = T>,
    norm_type: impl Into<NormType>,
) -> Result<Tensor, ConfigError> {
    let norm_type = norm_type.into().validate()?;
    let params: Vec<T> = params.into_iter().collect();
    let grads = defined_grads(params.iter().map(Borrow::borrow));
    if let Some(total) = fused::total_norm(&grads, norm_type) {
        return Ok(Tensor::from(total).to_kind(promoted_kind(&grads)));
    }
    Ok(total_norm(&grads, norm_type)
        .unwrap_or_else(|| zero_norm(params.first().map(Borrow::borrow))))
}

fn zero_norm(like: Option<&Tensor>) -> Tensor {
    match like {
        Some(p) => Tensor::zeros([], (p.kind(), p.device())),
        None => Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
    }
}
