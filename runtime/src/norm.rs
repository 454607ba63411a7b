//! The norm of the global gradient norm, and its validation; used by the fast path and the
//! ATen path alike.

use std::fmt;

use crate::error::ConfigError;

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
