//! The optimizers' hyper-parameters, checked when they are built.

use tch::nn::VarStore;
use tch::TchError;

use super::{Algo, FusedOptimizer};

/// SGD with momentum, dampening, Nesterov momentum and weight decay (tch's `nn::Sgd` defaults).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sgd {
    /// Momentum factor.
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// L2 weight decay.
    pub wd: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Adam (tch's `nn::Adam` defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay).
#[derive(Debug, Clone, Copy)]
pub struct Adam {
    /// First moment decay.
    pub beta1: f64,
    /// Second moment decay.
    pub beta2: f64,
    /// L2 weight decay (added to the gradient).
    pub wd: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// The AMSGrad variant.
    pub amsgrad: bool,
}

impl Default for Adam {
    fn default() -> Self {
        Adam {
            beta1: 0.9,
            beta2: 0.999,
            wd: 0.0,
            eps: 1e-8,
            amsgrad: false,
        }
    }
}

/// AdamW: Adam with decoupled weight decay (tch's `nn::AdamW` defaults: weight decay 0.01).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    /// First moment decay.
    pub beta1: f64,
    /// Second moment decay.
    pub beta2: f64,
    /// Decoupled weight decay.
    pub wd: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// The AMSGrad variant.
    pub amsgrad: bool,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: 0.01,
            eps: 1e-8,
            amsgrad: false,
        }
    }
}

impl Sgd {
    /// The optimizer of `vs`'s trainable variables, learning rate `lr`.
    ///
    /// # Errors
    /// A learning rate, momentum, dampening or weight decay that is negative or not finite.
    pub fn build(self, vs: &VarStore, lr: f64) -> Result<FusedOptimizer, TchError> {
        for (name, v) in [
            ("momentum", self.momentum),
            ("dampening", self.dampening),
            ("wd", self.wd),
        ] {
            check(name, v)?;
        }
        FusedOptimizer::new(Algo::Sgd(self), vs, lr)
    }
}

impl Adam {
    /// The optimizer of `vs`'s trainable variables, learning rate `lr`.
    ///
    /// # Errors
    /// A hyper-parameter out of range (betas in [0, 1), eps and lr >= 0).
    pub fn build(self, vs: &VarStore, lr: f64) -> Result<FusedOptimizer, TchError> {
        check_adam(self.beta1, self.beta2, self.eps, self.wd)?;
        FusedOptimizer::new(Algo::Adam(self, false), vs, lr)
    }
}

impl AdamW {
    /// The optimizer of `vs`'s trainable variables, learning rate `lr`.
    ///
    /// # Errors
    /// A hyper-parameter out of range (betas in [0, 1), eps and lr >= 0).
    pub fn build(self, vs: &VarStore, lr: f64) -> Result<FusedOptimizer, TchError> {
        check_adam(self.beta1, self.beta2, self.eps, self.wd)?;
        let a = Adam {
            beta1: self.beta1,
            beta2: self.beta2,
            wd: self.wd,
            eps: self.eps,
            amsgrad: self.amsgrad,
        };
        FusedOptimizer::new(Algo::Adam(a, true), vs, lr)
    }
}

pub(super) fn check(name: &str, v: f64) -> Result<(), TchError> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(TchError::Kind(format!(
            "stepguard::optim: {name} must be finite and >= 0, got {v}"
        )))
    }
}

fn check_adam(beta1: f64, beta2: f64, eps: f64, wd: f64) -> Result<(), TchError> {
    for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
        check(name, b)?;
        if b >= 1.0 {
            return Err(TchError::Kind(format!(
                "stepguard::optim: {name} must be < 1, got {b}"
            )));
        }
    }
    check("eps", eps)?;
    check("wd", wd)
}
