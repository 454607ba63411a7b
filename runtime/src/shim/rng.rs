//! What a replay needs of libtorch: the default random generators' states, saved when a
//! guarded call begins and restored before it is replayed (so that dropout draws the same
//! masks), and the guard's own operators kept out of the replay's record.

use crate::error::TorchError;
use std::ffi::{c_char, c_void};

use super::check;

extern "C" {
    fn sg_generators_new(out: *mut *mut c_void) -> *mut c_char;
    fn sg_generators_save(saved: *mut c_void) -> *mut c_char;
    fn sg_generators_restore(saved: *const c_void) -> *mut c_char;
    fn sg_generators_free(saved: *mut c_void);
    fn sg_record_functions(enable: bool) -> bool;
    fn sg_cuda_devices() -> i64;
    fn sg_rng_state(device: i64, out: *mut *mut torch_sys::C_tensor) -> *mut c_char;
    fn sg_rng_set_state(device: i64, state: *const torch_sys::C_tensor) -> *mut c_char;
}

/// The states of the default random generators, the CPU's (`"cpu"`) and each CUDA device's
/// (`"cuda:0"`, ...), as uint8 tensors (what `torch.get_rng_state()` returns), for a checkpoint.
///
/// # Errors
/// What libtorch raises.
pub(crate) fn rng_states() -> Result<Vec<(String, tch::Tensor)>, TorchError> {
    // SAFETY: no arguments; throws nothing.
    let cuda = unsafe { sg_cuda_devices() };
    let mut out = Vec::new();
    for device in -1..cuda {
        let mut t = std::ptr::null_mut();
        // SAFETY: the shim writes `t` (a new at::Tensor*, owned by the Tensor made of it)
        // only on success.
        check(unsafe { sg_rng_state(device, &mut t) })?;
        // SAFETY: as above.
        let t = unsafe { tch::Tensor::from_ptr(t) };
        let name = if device < 0 {
            "cpu".to_string()
        } else {
            format!("cuda:{device}")
        };
        out.push((name, t));
    }
    Ok(out)
}

/// The generator (-1: the CPU's, else a CUDA device) of each of `states`' names, all checked.
fn devices_of(states: &[(String, tch::Tensor)]) -> Result<Vec<i64>, TorchError> {
    // SAFETY: no arguments; throws nothing.
    let cuda = unsafe { sg_cuda_devices() };
    states
        .iter()
        .map(|(name, _)| match name.as_str() {
            "cpu" => Ok(-1),
            n => n
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<i64>().ok())
                .filter(|i| (0..cuda).contains(i))
                .ok_or_else(|| TorchError::new(format!("no generator `{n}` in this process"))),
        })
        .collect()
}

/// Whether [`set_rng_states`] can take `states`: every generator named exists here.
///
/// # Errors
/// The first one that does not.
pub(crate) fn check_rng_states(states: &[(String, tch::Tensor)]) -> Result<(), TorchError> {
    devices_of(states).map(drop)
}

/// Sets the default generators' states saved by [`rng_states`]; a CUDA device this process
/// does not have is an error, before any generator is changed.
///
/// # Errors
/// An unknown name, a missing device, or a state libtorch refuses (a wrong size).
pub(crate) fn set_rng_states(states: &[(String, tch::Tensor)]) -> Result<(), TorchError> {
    let devices = devices_of(states)?;
    for ((_, t), device) in states.iter().zip(devices) {
        let t = t.f_to_device(tch::Device::Cpu)?;
        // SAFETY: `t` is a live tensor for the call; the shim only reads it.
        check(unsafe { sg_rng_set_state(device, t.as_ptr()) })?;
    }
    Ok(())
}

/// Copies of the states of the CPU's and every CUDA device's default generator. The shim's
/// object is reused: a dropped value goes back to its thread's pool.
#[derive(Debug)]
pub(crate) struct Generators(*mut c_void);

// SAFETY: the copies are only read through the shim, under the live generators' own locks;
// nothing else refers to them.
unsafe impl Send for Generators {}

thread_local! {
    /// Saved states no call holds now (one per nesting level of guarded calls).
    static POOL: std::cell::RefCell<Vec<Generators>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Generators {
    /// The generators' states now (no device work; the CPU's 2.5 KB are copied only when they
    /// changed since the save this object last held).
    pub(crate) fn save() -> Result<Generators, TorchError> {
        let g = match POOL.with(|p| p.borrow_mut().pop()) {
            Some(g) => g,
            None => {
                let mut out = std::ptr::null_mut();
                // SAFETY: the shim writes `out` (a `new Generators`, owned by the value
                // returned) only on success, and throws nothing.
                check(unsafe { sg_generators_new(&mut out) })?;
                Generators(out)
            }
        };
        // SAFETY: `g.0` is the shim's, alive until it is freed; the shim writes it.
        check(unsafe { sg_generators_save(g.0) })?;
        Ok(g)
    }

    /// Writes the saved states back into the live generators.
    pub(crate) fn restore(&self) -> Result<(), TorchError> {
        // SAFETY: `self.0` is the shim's, alive until it is freed; the shim only reads it.
        check(unsafe { sg_generators_restore(self.0) })
    }
}

impl Drop for Generators {
    fn drop(&mut self) {
        let raw = std::mem::replace(&mut self.0, std::ptr::null_mut());
        if raw.is_null() {
            return;
        }
        // Back to the pool; freed when the thread ends (the pool is gone then).
        let kept = POOL
            .try_with(|p| match p.try_borrow_mut() {
                Ok(mut p) => {
                    p.push(Generators(raw));
                    true
                }
                Err(_) => false,
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: `raw` came from `sg_generators_new`, and no other value refers to it.
            unsafe { sg_generators_free(raw) }
        }
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

/// Unit tests that draw from the default CPU generator hold this: a test that restores it and
/// compares would see another test's draws otherwise.
#[cfg(test)]
pub(crate) fn drawing() -> std::sync::MutexGuard<'static, ()> {
    static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DRAWS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
