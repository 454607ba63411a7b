//! The global gradient norm: its type, and where it is computed (the host view of the CPU
//! fast path, or ATen on the tensors' device), decided once per step.

use std::fmt;

use tch::{Kind, Tensor};

use crate::error::ConfigError;
use crate::host_view::HostView;

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

    /// The same norm with `P(1)`, `P(2)` and `P(inf)` written as `L1`, `L2` and `Inf`, so
    /// every path computes each norm one way.
    pub fn canonical(self) -> Self {
        match self {
            NormType::P(p) => NormType::from(p),
            other => other,
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

/// The stored values of `t`: itself when dense, the (coalesced) values when sparse, so norms,
/// sums and counts see each element once; dense values of an mkldnn tensor.
pub(crate) fn values_of(t: &Tensor) -> Tensor {
    if t.is_sparse() {
        t.coalesce().values()
    } else if t.is_mkldnn() {
        t.to_dense(None, false)
    } else {
        t.shallow_clone()
    }
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
    /// On the grads' device (an f64 0-dim tensor on the first grad's device).
    Device(&'a [Tensor], Tensor),
}

/// The total norm of `grads` (`None` when there is none), computed like PyTorch's
/// `clip_grad_norm_` (one norm per tensor, then the norm of those), except that it accumulates
/// widely enough not to overflow while the true value is representable in f64 (PyTorch's
/// overflows for f16 grads whose norm exceeds 65504, or f32 elements above ~1.8e19), and
/// general p-norms are scaled by their largest element.
pub(crate) fn measure(grads: &[Tensor], p: NormType) -> Option<Measured<'_>> {
    if let Some(view) = HostView::of(grads) {
        let total = view.total_norm(p);
        return Some(Measured::Host(view, total));
    }
    device_total(grads, p).map(|t| Measured::Device(grads, t))
}

fn device_total(grads: &[Tensor], p: NormType) -> Option<Tensor> {
    let device = grads.first()?.device();
    let p = p.canonical();
    let _guard = tch::no_grad_guard();
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| {
            let v = values_of(g).to_kind(accumulation_kind(g));
            let n = match p {
                NormType::P(q) => {
                    // Scaled by the largest element: `|x|^q` overflows f64 for large q.
                    let m = v.abs().max();
                    let safe_m = m.where_scalarother(&m.gt(0.0), 1.0);
                    (&v / &safe_m).norm_scalaropt_dtype(q, Kind::Double) * &safe_m
                }
                _ => v.norm_scalaropt_dtype(p.p(), Kind::Double),
            };
            n.to_kind(Kind::Double).to_device(device)
        })
        .collect();
    let norms = Tensor::stack(&norms, 0);
    Some(match p {
        NormType::P(q) => {
            let m = norms.max();
            let ok = m.isfinite().logical_and(&m.gt(0.0));
            let safe_m = m.where_scalarother(&ok, 1.0);
            let scaled = (&norms / &safe_m).norm_scalaropt_dtype(q, Kind::Double) * &safe_m;
            scaled.where_self(&ok, &m)
        }
        _ => norms.norm_scalaropt_dtype(p.p(), Kind::Double),
    })
}

impl Measured<'_> {
    /// The total as a 0-dim tensor (on the host path, a CPU f64 tensor).
    pub(crate) fn tensor(&self) -> Tensor {
        match self {
            Measured::Host(_, t) => Tensor::from(*t),
            Measured::Device(_, t) => t.shallow_clone(),
        }
    }

    /// Scales every grad by `clamp(max_norm / (total + 1e-6), max = 1)`, in place, without a
    /// host read. A non-finite total leaves the grads untouched (coefficient 1), so the
    /// NaN/Inf stays where it came from and can be attributed; PyTorch multiplies it into every
    /// grad. `max_norm` must be valid ([`crate::config::check_max_norm`]): then the
    /// coefficient is finite and in (0, 1], so the grads check of the total covers the clipped
    /// grads.
    pub(crate) fn clip(&self, max_norm: f64) {
        match self {
            Measured::Host(view, total) => {
                let coef = max_norm / (total + 1e-6);
                if total.is_finite() && coef < 1.0 {
                    view.scale(coef);
                }
            }
            Measured::Device(grads, total) => {
                // Same arithmetic as PyTorch: `max_norm / t` is `t.reciprocal() * max_norm`.
                let coef = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
                let coef = coef.where_scalarother(&total.isfinite(), 1.0);
                let _guard = tch::no_grad_guard();
                for g in grads.iter() {
                    let c = if g.device() == coef.device() {
                        coef.shallow_clone()
                    } else {
                        coef.to_device(g.device())
                    };
                    let _ = g.shallow_clone().f_mul_(&c);
                }
            }
        }
    }
}
