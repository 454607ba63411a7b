//! Fused optimizer steps (`_fused_adam_`, `_fused_adamw_`, `_fused_sgd_`), and the SGD step of
//! parameters with sparse grads, which no fused kernel takes: the list lengths the C++ side
//! reads, checked here first.

use crate::error::TorchError;
use std::ffi::{c_char, c_double};

use tch::Tensor;
use torch_sys::C_tensor;

use super::{check, optional, pointers};

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn sg_fused_adam_(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        max_exp_avg_sqs: *const *mut C_tensor,
        n_max: usize,
        steps: *const *mut C_tensor,
        n: usize,
        lr: c_double,
        beta1: c_double,
        beta2: c_double,
        weight_decay: c_double,
        eps: c_double,
        amsgrad: bool,
        adamw: bool,
        grad_scale: *const C_tensor,
        found_inf: *const C_tensor,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn sg_fused_sgd_(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        momentum_buffers: *const *mut C_tensor,
        n_buf: usize,
        n: usize,
        weight_decay: c_double,
        momentum: c_double,
        lr: c_double,
        dampening: c_double,
        nesterov: bool,
        is_first_step: bool,
        grad_scale: *const C_tensor,
        found_inf: *const C_tensor,
    ) -> *mut c_char;
    fn sg_sgd_sparse_(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        n: usize,
        lr: c_double,
        grad_scale: *const C_tensor,
    ) -> *mut c_char;
}

/// Hyper-parameters of one fused Adam/AdamW step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub amsgrad: bool,
    pub adamw: bool,
}

/// The tensors of one fused step: all on one device, of one dtype, the lists of equal length
/// (`max_exp_avg_sqs` and momentum buffers may be empty).
#[derive(Debug)]
pub(crate) struct FusedLists<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub first: &'a [Tensor],
    pub second: &'a [Tensor],
    pub max: &'a [Tensor],
    pub steps: &'a [Tensor],
}

/// An error unless `list` holds as many tensors as `l.params` (or none, when `may_be_empty`).
fn same_length(
    l: &FusedLists<'_>,
    list: &[Tensor],
    what: &str,
    may_be_empty: bool,
) -> Result<(), TorchError> {
    let (n, k) = (l.params.len(), list.len());
    if k == n || (may_be_empty && k == 0) {
        Ok(())
    } else {
        Err(TorchError::new(format!(
            "stepguard: {k} {what} for {n} parameters"
        )))
    }
}

/// `_fused_adam_` / `_fused_adamw_`, with the step counters moved as torch.optim moves them,
/// once the kernel has succeeded: on an error, nothing has changed.
pub(crate) fn fused_adam_(
    l: &FusedLists<'_>,
    h: AdamStep,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<(), TorchError> {
    same_length(l, l.grads, "grads", false)?;
    same_length(l, l.first, "exp_avgs", false)?;
    same_length(l, l.second, "exp_avg_sqs", false)?;
    same_length(l, l.max, "max_exp_avg_sqs", !h.amsgrad)?;
    same_length(l, l.steps, "step counters", false)?;
    let (p, g, m, v, mx, st) = (
        pointers(l.params),
        pointers(l.grads),
        pointers(l.first),
        pointers(l.second),
        pointers(l.max),
        pointers(l.steps),
    );
    // SAFETY: module preconditions; every list outlives the call and holds `p.len()` pointers
    // (`max`: `mx.len()`), as checked above.
    check(unsafe {
        sg_fused_adam_(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            mx.as_ptr(),
            mx.len(),
            st.as_ptr(),
            p.len(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            h.amsgrad,
            h.adamw,
            optional(grad_scale),
            optional(found_inf),
        )
    })
}

/// Hyper-parameters of one fused SGD step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub is_first_step: bool,
}

/// `_fused_sgd_` (`l.first`: the momentum buffers, empty without momentum).
pub(crate) fn fused_sgd_(
    l: &FusedLists<'_>,
    h: SgdStep,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<(), TorchError> {
    same_length(l, l.grads, "grads", false)?;
    same_length(l, l.first, "momentum buffers", h.momentum == 0.0)?;
    let (p, g, b) = (pointers(l.params), pointers(l.grads), pointers(l.first));
    // SAFETY: module preconditions; every list outlives the call and holds `p.len()` pointers
    // (the buffers: `b.len()`), as checked above.
    check(unsafe {
        sg_fused_sgd_(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            b.len(),
            p.len(),
            h.weight_decay,
            h.momentum,
            h.lr,
            h.dampening,
            h.nesterov,
            h.is_first_step,
            optional(grad_scale),
            optional(found_inf),
        )
    })
}

/// SGD without momentum or weight decay over parameters whose grads are sparse:
/// `param.add_(grad, -lr)` for each, as torch.optim.SGD, each grad first divided in place by
/// `grad_scale` (a 0-dim tensor on the parameters' device) when given. Every parameter is
/// checked (dense, of its sparse grad's dtype, device and sizes) before any changes.
pub(crate) fn sgd_sparse_(
    params: &[Tensor],
    grads: &[Tensor],
    lr: f64,
    grad_scale: Option<&Tensor>,
) -> Result<(), TorchError> {
    if grads.len() != params.len() {
        return Err(TorchError::new(format!(
            "stepguard: {} grads for {} parameters",
            grads.len(),
            params.len()
        )));
    }
    let (p, g) = (pointers(params), pointers(grads));
    // SAFETY: module preconditions; both lists outlive the call and hold `p.len()` pointers, as
    // checked above.
    check(unsafe { sg_sgd_sparse_(p.as_ptr(), g.as_ptr(), p.len(), lr, optional(grad_scale)) })
}
