//! Sparse gradients (an `nn::embedding` with `sparse: true`), which no fused kernel takes.
//!
//! SGD without momentum and weight decay steps them as torch.optim.SGD and tch's `nn::Sgd` do,
//! `param.add_(grad, -lr)` per parameter, with no state. Everything else refuses them before
//! anything changes: Adam and AdamW as PyTorch's (`Adam does not support sparse gradients`); SGD
//! with weight decay as PyTorch's (`add(sparse, dense) is not supported`); SGD with momentum
//! because its buffers are dense here (PyTorch keeps a sparse buffer whose entries grow with
//! every step, which no fused kernel takes either).

use tch::{TchError, Tensor};

use super::Algo;
use crate::shim;

/// What makes `algo` refuse sparse grads, or `None` when it takes them.
fn refusal(algo: Algo) -> Option<&'static str> {
    match algo {
        Algo::Adam(_, false) => Some("Adam does not take them (nor does torch.optim.Adam)"),
        Algo::Adam(_, true) => Some("AdamW does not take them (nor does torch.optim.AdamW)"),
        Algo::Sgd(s) if s.wd != 0.0 => Some(
            "Sgd with weight decay does not take them (nor does torch.optim.SGD: add(sparse, \
             dense) is not supported)",
        ),
        Algo::Sgd(s) if s.momentum != 0.0 => Some(
            "Sgd with momentum does not take them (its momentum buffers are dense tensors on \
             the fused kernels)",
        ),
        Algo::Sgd(_) => None,
    }
}

/// An error unless `algo` takes the sparse grad of the parameter `name`.
pub(super) fn check(algo: Algo, name: &str) -> Result<(), TchError> {
    match refusal(algo) {
        None => Ok(()),
        Some(why) => Err(TchError::Kind(format!(
            "stepguard::optim: parameter {name} has a sparse gradient, and {why}; sparse \
             gradients are taken by stepguard::optim::Sgd without momentum and weight decay, and \
             by tch's nn::Sgd without weight decay. Nothing was changed"
        ))),
    }
}

/// One step of SGD (learning rate `lr`) for parameters whose grads are sparse, all on one
/// device; their grads first divided in place by `grad_scale` when given.
pub(super) fn step(
    params: &[Tensor],
    lr: f64,
    grad_scale: Option<&Tensor>,
) -> Result<(), TchError> {
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
    shim::sgd_sparse_(params, &grads, lr, grad_scale).map_err(TchError::from)
}
