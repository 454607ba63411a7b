//! Epsilon-protected division and logarithm.
//!
//! # The rule, on every floating dtype (f16, bf16, f32, f64)
//!
//! * **The eps of a dtype.** `eps` is used as the dtype of the protected tensor (the divisor, or
//!   the argument of the log) sees it: rounded to that dtype, exactly as libtorch rounds a scalar
//!   (so `1e-8` is the f64 `1e-8` in f64 and `1e-8f32` in f32), and raised to the dtype's
//!   smallest normal number where it would be below it (`1e-8` is zero in f16, whose smallest
//!   normal is `2^-14`; `1e-50` is zero in f32 and bf16) or lowered to its largest finite value.
//! * **Identity.** Where `|b| >= eps` (`x >= eps` for the logs) the result is bitwise the plain
//!   op's, overflow included: the plain op's own infinities are real and are not touched.
//! * **Division: replaced divisor, saturated quotient.** Where `|b| < eps` (zeros, subnormals,
//!   `-0.0` counting as negative) the divisor is replaced by `±eps` with the sign of `b`. The
//!   quotient `a / ±eps` of a finite `a` can still overflow, by a lot in f16 (`5 / 2^-14`), and
//!   in any dtype for a large enough `a` (`1e38 / 1e-8` in f32): there, and only there, it
//!   saturates to `±max` of the result's dtype (65504 in f16). No eps can avoid this for every
//!   numerator, so saturation is the rule. Its gradient is zero (it is a `clamp`), with respect
//!   to the divisor it is zero wherever the divisor was replaced, and finite elsewhere.
//! * **Logs: clamped argument.** Below eps (zero and finite negative values included) the
//!   result is `log(eps)`, finite in every dtype thanks to the smallest-normal floor, with a
//!   zero gradient.
//! * **Non-finite inputs are not hidden.** NaN stays NaN (in either operand), an infinite
//!   numerator divided by a replaced divisor stays infinite, and the log of `-inf` is NaN (of
//!   `+inf`, `+inf`), so the finiteness checks still see them.
//! * Integer divisors and integer log arguments are left to the plain operation.
//!
//! # The epsilon
//!
//! Every operation takes an [`Eps`], a finite number above zero, validated once where it is
//! made ([`Eps::new`]), so the operations themselves cannot fail on it:
//!
//! ```no_run
//! use stepguard::safe::{self, Eps};
//! use tch::Tensor;
//!
//! let eps = Eps::new(1e-6)?; // or Eps::DEFAULT (1e-8)
//! let (a, b) = (Tensor::from_slice(&[1.0f32, 2.0]), Tensor::from_slice(&[0.0f32, 4.0]));
//! let q = safe::div(&a, &b, eps); // [1e6, 0.5]
//! let l = safe::log(&b, Eps::DEFAULT); // [ln(1e-8), ln(4)]
//! # Ok::<(), stepguard::ConfigError>(())
//! ```

use tch::{Kind, Tensor};

use crate::error::ConfigError;

/// The epsilon of the protected operations: a finite number above zero.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Eps(f64);

impl Eps {
    /// `1e-8`, the attribute's default.
    pub const DEFAULT: Eps = Eps(1e-8);

    /// `eps` when it is a finite number above zero, else [`ConfigError::Eps`].
    ///
    /// # Errors
    /// Zero, a negative number, NaN or an infinity.
    pub const fn new(eps: f64) -> Result<Eps, ConfigError> {
        if eps > 0.0 && eps.is_finite() {
            Ok(Eps(eps))
        } else {
            Err(ConfigError::Eps(eps))
        }
    }

    /// The value.
    pub const fn get(self) -> f64 {
        self.0
    }

    /// An eps `#[guarded_step]` checked at compile time; panics with [`ConfigError::Eps`]'s
    /// message when it is not valid after all.
    #[track_caller]
    pub(crate) fn checked(eps: f64) -> Eps {
        Eps::new(eps).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Default for Eps {
    fn default() -> Self {
        Eps::DEFAULT
    }
}

impl TryFrom<f64> for Eps {
    type Error = ConfigError;
    fn try_from(eps: f64) -> Result<Self, ConfigError> {
        Eps::new(eps)
    }
}

impl From<Eps> for f64 {
    fn from(eps: Eps) -> f64 {
        eps.0
    }
}

impl std::fmt::Display for Eps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The default epsilon as a number (the configuration's default).
pub(crate) const DEFAULT_EPS: f64 = Eps::DEFAULT.get();

/// The smallest normal number and the largest finite value of a floating dtype.
fn limits(kind: Kind) -> (f64, f64) {
    match kind {
        Kind::Half => (6.103_515_625e-5, 65504.0),
        Kind::BFloat16 => (f32::MIN_POSITIVE as f64, 3.389_531_389_251_535_5e38),
        Kind::Float => (f32::MIN_POSITIVE as f64, f32::MAX as f64),
        Kind::Float8e5m2 => (6.103_515_625e-5, 57344.0),
        Kind::Float8e4m3fn => (0.015_625, 448.0),
        Kind::Float8e5m2fnuz => (3.051_757_812_5e-5, 57344.0),
        Kind::Float8e4m3fnuz => (0.007_812_5, 240.0),
        _ => (f64::MIN_POSITIVE, f64::MAX),
    }
}

/// The epsilon actually usable in `kind`: `eps`, raised to the smallest normal number of the
/// dtype when it would underflow (1e-8 is zero in f16) and lowered to its largest finite value.
/// libtorch rounds it to the dtype when it fills or compares a tensor of that dtype.
fn eps_for(kind: Kind, eps: f64) -> f64 {
    let (tiny, max) = limits(kind);
    eps.max(tiny).min(max)
}

/// `(small, divisor)`: where `|b| < eps` (as `b`'s dtype sees eps), and `b` with those entries
/// replaced by `±eps` in `b`'s own dtype. `small` carries no gradient; the divisor passes `b`'s
/// gradient through where `b` is kept.
fn protect(b: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let bd = b.detach();
    // Filled in b's dtype: exactly the f64 eps in f64, its f32 rounding in f32, ...
    let e = bd.full_like(eps_for(b.kind(), eps));
    let small = bd.abs().lt_tensor(&e);
    let divisor = e.copysign(&bd).where_self(&small, b);
    (small, divisor)
}

/// `q` saturated to the finite range of its dtype where `mask` is set: an overflow there (`±inf`)
/// becomes `±max`; finite values and NaN are unchanged.
fn saturate(q: Tensor, mask: &Tensor) -> Tensor {
    if !q.is_floating_point() {
        return q;
    }
    let max = limits(q.kind()).1;
    q.clamp(-max, max).where_self(mask, &q)
}

/// `a / b` with the divisor kept away from zero.
///
/// Where `|b| >= eps` the result is bitwise identical to `a / b`. Where `|b| < eps` the divisor
/// is replaced by `±eps` (in `b`'s dtype; see the [module's rule](self)) with the sign of `b`
/// (`-0.0` counts as negative), and a finite numerator's quotient that overflows saturates to
/// `±max` of the result's dtype, so the value is finite and so is the gradient (with respect to
/// `b` it is zero there). NaN in either operand stays NaN and an infinite numerator stays
/// infinite, so the finiteness checks still see them. Integer divisors are left to the plain
/// operation.
pub fn div(a: &Tensor, b: &Tensor, eps: Eps) -> Tensor {
    if !b.is_floating_point() {
        return a / b;
    }
    let (small, divisor) = protect(b, eps.get());
    let q = a / &divisor;
    saturate(q, &small.logical_and(&a.detach().isfinite()))
}

/// `a /= b` in place, protected as in [`div`] (divisor and saturation).
pub fn div_assign(a: &mut Tensor, b: &Tensor, eps: Eps) {
    if !b.is_floating_point() {
        let _ = a.g_div_(b);
        return;
    }
    let (small, divisor) = protect(b, eps.get());
    let mask = small.logical_and(&a.detach().isfinite());
    let _ = a.g_div_(&divisor);
    if a.is_floating_point() {
        let max = limits(a.kind()).1;
        let saturated = a.clamp(-max, max).where_self(&mask, a);
        a.copy_(&saturated);
    }
}

/// The divisor of [`div`]: `b` where `|b| >= eps`, else `±eps` in `b`'s dtype with the sign
/// of `b`. Dividing by it does not saturate: use [`div`] for that.
pub fn protect_divisor(b: &Tensor, eps: Eps) -> Tensor {
    if !b.is_floating_point() {
        return b.shallow_clone();
    }
    protect(b, eps.get()).1
}

/// A scalar divided by a tensor, `s / b`, with `b` protected as in [`div`].
pub fn rdiv(s: f64, b: &Tensor, eps: Eps) -> Tensor {
    if !b.is_floating_point() {
        return s / b;
    }
    let (small, divisor) = protect(b, eps.get());
    let q = s / &divisor;
    if s.is_finite() {
        saturate(q, &small)
    } else {
        q
    }
}

/// `x` clamped from below at `eps`, except `-inf`, which stays (its log is NaN: a non-finite
/// input stays non-finite, so the checks see it).
fn protect_log_arg(x: &Tensor, eps: f64) -> Option<Tensor> {
    x.is_floating_point().then(|| {
        let clamped = x.clamp_min(eps_for(x.kind(), eps));
        x.where_self(&x.detach().isneginf(), &clamped)
    })
}

/// `ln(x)` with `x` clamped from below at `eps`.
///
/// Where `x >= eps` the result is bitwise identical to `x.log()`; below (zero and negative
/// values included) it is `ln(eps)` with a zero gradient, so both are finite: eps is taken in
/// `x`'s dtype and raised to its smallest normal number (the [module's rule](self)). A
/// non-finite input stays non-finite, so the checks still see it: NaN and `-inf` give NaN,
/// `+inf` gives `+inf`. Integer tensors are left to the plain operation.
pub fn log(x: &Tensor, eps: Eps) -> Tensor {
    protect_log_arg(x, eps.get()).map_or_else(|| x.log(), |x| x.log())
}

/// `log2(x)`, protected like [`log`].
pub fn log2(x: &Tensor, eps: Eps) -> Tensor {
    protect_log_arg(x, eps.get()).map_or_else(|| x.log2(), |x| x.log2())
}

/// `log10(x)`, protected like [`log`].
pub fn log10(x: &Tensor, eps: Eps) -> Tensor {
    protect_log_arg(x, eps.get()).map_or_else(|| x.log10(), |x| x.log10())
}
