//! Copies of device values to pinned host memory, with an event to wait for only them.

use crate::error::TorchError;
use std::ffi::{c_char, c_void};

use tch::Tensor;
use torch_sys::C_tensor;

use super::check;

extern "C" {
    fn sg_copy_to_host_async(
        src: *const C_tensor,
        dst: *mut *mut C_tensor,
        event: *mut *mut c_void,
    ) -> *mut c_char;
    fn sg_event_synchronize(event: *mut c_void) -> *mut c_char;
    fn sg_event_free(event: *mut c_void);
}

/// Values on their way to the host: copied without blocking to pinned memory, with an event
/// recorded after the copy (a CPU tensor needs neither and is read directly).
#[derive(Debug)]
pub(crate) struct HostCopy {
    host: Tensor,
    /// A `c10::Event*` owned by this value (null for a CPU tensor).
    event: *mut c_void,
}

// SAFETY: the event is only touched through the shim (synchronize, free), which c10 allows
// from any thread; the tensor is tch's, which is Send.
unsafe impl Send for HostCopy {}

impl HostCopy {
    /// Starts the copy of `src`.
    pub(crate) fn start(src: &Tensor) -> Result<HostCopy, TorchError> {
        if src.device() == tch::Device::Cpu {
            return Ok(HostCopy {
                host: src.shallow_clone(),
                event: std::ptr::null_mut(),
            });
        }
        let mut dst: *mut C_tensor = std::ptr::null_mut();
        let mut event: *mut c_void = std::ptr::null_mut();
        // SAFETY: module preconditions; `dst` and `event` are written on success.
        if check(unsafe { sg_copy_to_host_async(src.as_ptr(), &mut dst, &mut event) }).is_err() {
            // No pinned memory or events on this device: a blocking copy, still correct.
            let host = src
                .f_to_device(tch::Device::Cpu)
                .map_err(TorchError::from)?;
            return Ok(HostCopy {
                host,
                event: std::ptr::null_mut(),
            });
        }
        Ok(HostCopy {
            // SAFETY: on success `dst` is a new at::Tensor* that we own.
            host: unsafe { Tensor::from_ptr(dst) },
            event,
        })
    }

    /// Waits for the copy (only for it: work queued after it on the device goes on) and reads
    /// the values; no device synchronisation beyond that.
    pub(crate) fn finish(mut self) -> Result<Vec<f64>, TorchError> {
        if !self.event.is_null() {
            // SAFETY: `event` is the live c10::Event this value owns.
            check(unsafe { sg_event_synchronize(self.event) })?;
        }
        let host = std::mem::replace(&mut self.host, Tensor::new());
        Vec::<f64>::try_from(host.to_kind(tch::Kind::Double)).map_err(TorchError::from)
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        if !self.event.is_null() {
            // SAFETY: the event is owned by this value and freed once.
            unsafe { sg_event_free(self.event) };
        }
    }
}
