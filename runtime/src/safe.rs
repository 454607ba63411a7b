//! Epsilon-protected division and logarithm.

use tch::{Kind, Tensor};

/// Default epsilon of the protected operations.
pub const DEFAULT_EPS: f64 = 1e-8;

/// The epsilon actually usable in `kind`: `eps`, raised to the smallest normal number of the
/// dtype when it would underflow (1e-8 is zero in f16).
fn eps_for(kind: Kind, eps: f64) -> f64 {
    let tiny = match kind {
        Kind::Half => 6.103_515_625e-5,
        Kind::BFloat16 | Kind::Float => f32::MIN_POSITIVE as f64,
        _ => f64::MIN_POSITIVE,
    };
    eps.max(tiny)
}

/// `a / b` with the divisor kept away from zero.
///
/// Where `|b| >= eps` the result is bitwise identical to `a / b`. Where `|b| < eps` the divisor
/// is replaced by `±eps` with the sign of `b` (`-0.0` counts as negative), so the value is
/// finite and so is the gradient (with respect to `b` it is zero there). NaN in `b` stays NaN,
/// so the finiteness checks still see it. Integer divisors are left to the plain operation.
pub fn safe_div(a: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    if !b.is_floating_point() {
        return a / b;
    }
    a / &protect_divisor(b, eps)
}

/// The divisor of [`safe_div`]: `b` where `|b| >= eps`, else `±eps` with the sign of `b`.
pub fn protect_divisor(b: &Tensor, eps: f64) -> Tensor {
    if !b.is_floating_point() {
        return b.shallow_clone();
    }
    let eps = eps_for(b.kind(), eps);
    let small = b.abs().lt(eps);
    let signed_eps = Tensor::where_scalar(&b.signbit(), -eps, eps).to_kind(b.kind());
    signed_eps.where_self(&small, b)
}

/// A scalar divided by a tensor, `s / b`, with `b` protected as in [`safe_div`].
pub fn safe_rdiv(s: f64, b: &Tensor, eps: f64) -> Tensor {
    if !b.is_floating_point() {
        return s / b;
    }
    s / &protect_divisor(b, eps)
}

fn protect_log_arg(x: &Tensor, eps: f64) -> Option<Tensor> {
    x.is_floating_point()
        .then(|| x.clamp_min(eps_for(x.kind(), eps)))
}

/// `ln(x)` with `x` clamped from below at `eps`.
///
/// Where `x >= eps` the result is bitwise identical to `x.log()`; below (zero and negative
/// values included) it is `ln(eps)` with a zero gradient, so both are finite. NaN stays NaN.
/// Integer tensors are left to the plain operation.
pub fn safe_log(x: &Tensor, eps: f64) -> Tensor {
    protect_log_arg(x, eps).map_or_else(|| x.log(), |x| x.log())
}

/// `log2(x)`, protected like [`safe_log`].
pub fn safe_log2(x: &Tensor, eps: f64) -> Tensor {
    protect_log_arg(x, eps).map_or_else(|| x.log2(), |x| x.log2())
}

/// `log10(x)`, protected like [`safe_log`].
pub fn safe_log10(x: &Tensor, eps: f64) -> Tensor {
    protect_log_arg(x, eps).map_or_else(|| x.log10(), |x| x.log10())
}
