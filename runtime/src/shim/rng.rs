//! What a replay needs of libtorch: the default random generators' states, saved when a
//! guarded call begins and restored before it is replayed (so that dropout draws the same
//! masks), and the guard's own operators kept out of the replay's record.

use crate::error::TorchError;
use std::ffi::{c_char, c_void};

use super::check;

extern "C" {
    fn sg_generators_save(out: *mut *mut c_void) -> *mut c_char;
    fn sg_generators_restore(saved: *const c_void) -> *mut c_char;
    fn sg_generators_free(saved: *mut c_void);
    fn sg_record_functions(enable: bool) -> bool;
}

/// Copies of the states of the CPU's and every CUDA device's default generator.
#[derive(Debug)]
pub(crate) struct Generators(*mut c_void);

// SAFETY: the copies are only read through the shim, under the live generators' own locks;
// nothing else refers to them.
unsafe impl Send for Generators {}

impl Generators {
    /// The generators' states now (a few kilobytes copied, no device work).
    pub(crate) fn save() -> Result<Generators, TorchError> {
        let mut out = std::ptr::null_mut();
        // SAFETY: the shim writes `out` (a `new Generators`, owned by the value returned) only
        // on success, and throws nothing.
        check(unsafe { sg_generators_save(&mut out) })?;
        Ok(Generators(out))
    }

    /// Writes the saved states back into the live generators.
    pub(crate) fn restore(&self) -> Result<(), TorchError> {
        // SAFETY: `self.0` is the shim's, alive until `drop`; the shim only reads it.
        check(unsafe { sg_generators_restore(self.0) })
    }
}

impl Drop for Generators {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `sg_generators_save` and is freed once, here.
        unsafe { sg_generators_free(self.0) }
    }
}

/// The ATen operators this thread runs are not recorded (by `RecordFunction` observers) while
/// this lives: the guard's own work during a replay.
#[derive(Debug)]
pub(crate) struct Unrecorded {
    was: bool,
}

impl Unrecorded {
    pub(crate) fn start() -> Unrecorded {
        // SAFETY: a thread-local switch of libtorch; throws nothing.
        Unrecorded {
            was: unsafe { sg_record_functions(false) },
        }
    }
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        // SAFETY: as in `start`.
        unsafe { sg_record_functions(self.was) };
    }
}
