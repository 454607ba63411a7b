//! The shim's loss-scaling and autocast functions (`sg_amp_*`, `sg_autocast_*`); the module
//! preconditions of [`super`] hold here too.

use crate::error::TorchError;
use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use super::{check, pointers};

extern "C" {
    fn sg_amp_unscale_(
        grads: *const *mut C_tensor,
        n: usize,
        inv_scale: *const C_tensor,
        found_inf: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn sg_amp_update_scale_(
        scale: *mut C_tensor,
        growth_tracker: *mut C_tensor,
        found_inf: *const C_tensor,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: i64,
        min_scale: f64,
    ) -> *mut c_char;
    fn sg_autocast_enter(
        device_type: i32,
        bf16: bool,
        was_enabled: *mut bool,
        was_bf16: *mut bool,
    ) -> *mut c_char;
    fn sg_autocast_exit(device_type: i32, was_enabled: bool, was_bf16: bool) -> *mut c_char;
}

/// Unscales `grads` in place by the 0-dim f32 `inv_scale` (one
/// `_amp_foreach_non_finite_check_and_unscale_` per (device, dtype) group) and returns
/// `found_inf`, a 0-dim f32 on `inv_scale`'s device, > 0 when a grad held NaN/Inf. `grads`
/// must be dense floating tensors.
pub(crate) fn amp_unscale_(grads: &[Tensor], inv_scale: &Tensor) -> Result<Tensor, TorchError> {
    let ptrs = pointers(grads);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: module preconditions; `ptrs` outlives the call, `out` is written on success.
    check(unsafe { sg_amp_unscale_(ptrs.as_ptr(), ptrs.len(), inv_scale.as_ptr(), &mut out) })?;
    // SAFETY: on success `out` is a new at::Tensor* that we own.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// The scaler's hyper-parameters as `_amp_update_scale_` takes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScaleUpdate {
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
    pub min_scale: f64,
}

/// `_amp_update_scale_(scale, growth_tracker, found_inf, ...)` in place, then the scale clamped
/// to at least `min_scale`: on the device, no host read.
pub(crate) fn amp_update_scale_(
    scale: &Tensor,
    growth_tracker: &Tensor,
    found_inf: &Tensor,
    u: ScaleUpdate,
) -> Result<(), TorchError> {
    // SAFETY: module preconditions; `scale` and `growth_tracker` are updated in place through
    // their at::Tensor (the Rust handles stay valid), the pointers are only used during the call.
    check(unsafe {
        sg_amp_update_scale_(
            scale.as_ptr() as *mut C_tensor,
            growth_tracker.as_ptr() as *mut C_tensor,
            found_inf.as_ptr(),
            u.growth_factor,
            u.backoff_factor,
            u.growth_interval,
            u.min_scale,
        )
    })
}

/// Autocast for one device type (0: CPU, 1: CUDA) switched on with f16 or bf16; the previous
/// state, to give to [`autocast_exit`].
pub(crate) fn autocast_enter(device_type: i32, bf16: bool) -> Result<(bool, bool), TorchError> {
    let (mut was_enabled, mut was_bf16) = (false, false);
    // SAFETY: the out-pointers are valid for the call; the shim catches its exceptions.
    check(unsafe { sg_autocast_enter(device_type, bf16, &mut was_enabled, &mut was_bf16) })?;
    Ok((was_enabled, was_bf16))
}

/// Restores the autocast state [`autocast_enter`] returned.
pub(crate) fn autocast_exit(device_type: i32, previous: (bool, bool)) -> Result<(), TorchError> {
    // SAFETY: plain values; the shim catches its exceptions.
    check(unsafe { sg_autocast_exit(device_type, previous.0, previous.1) })
}
