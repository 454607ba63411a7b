//! The calls into the ATen observer (`csrc/opwatch.cpp`): every `extern "C"` and every `unsafe`
//! of the replay.
//!
//! # Preconditions the `unsafe` code relies on
//! - A `tch::Tensor` wraps a valid `at::Tensor*` (`C_tensor`) for as long as it lives; the
//!   observer only reads through the pointers it is given, for the duration of the call (it
//!   keeps the storages' addresses, not the tensors).
//! - A function returning `*mut c_char` returns null on success and a NUL-terminated C string
//!   on failure, never null: the exception's text (`malloc`'d) or a static text when that copy
//!   could not be allocated. `sg_watch_free` frees either (it leaves the static one), and the
//!   trace text too.
//! - `sg_watch_finish` writes null or a `malloc`'d NUL-terminated text to `trace` and null or a
//!   `new at::Tensor(...)` to `stats`, whether it fails or not (null first): each is owned by
//!   the caller once written.
//! - The observer catches every C++ exception; none crosses the boundary. Its state is behind
//!   a mutex: any thread may call in.

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::TorchError;

extern "C" {
    fn sg_watch_free(text: *mut c_char);
    fn sg_watch_arm(named: *const *mut C_tensor, n: usize) -> *mut c_char;
    fn sg_watch_disarm();
    fn sg_watch_armed() -> bool;
    fn sg_watch_finish(trace: *mut *mut c_char, stats: *mut *mut C_tensor) -> *mut c_char;
    #[cfg(test)]
    fn sg_watch_global_callbacks() -> bool;
}

/// The text of a non-null string from the observer, which is then freed.
fn take_text(p: *mut c_char) -> String {
    // SAFETY: `p` is a non-null, NUL-terminated string the observer handed over (module
    // preconditions), copied here and released once, by `sg_watch_free`.
    unsafe {
        let text = CStr::from_ptr(p).to_string_lossy().into_owned();
        sg_watch_free(p);
        text
    }
}

/// The observer's error (null: none; a failure is never null) as a `Result`.
fn check(e: *mut c_char) -> Result<(), TorchError> {
    if e.is_null() {
        Ok(())
    } else {
        Err(TorchError::new(take_text(e)))
    }
}

/// Registers the observer's global callback, with `named` known by their storage (index `i`
/// in the record is `named[i]`). Fails when a watch is already armed in the process.
pub(super) fn arm(named: &[&Tensor]) -> Result<(), TorchError> {
    let ptrs: Vec<*mut C_tensor> = named.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    // SAFETY: module preconditions; the `n` pointers of `ptrs` outlive the call, which only
    // reads them.
    check(unsafe { sg_watch_arm(ptrs.as_ptr(), ptrs.len()) })
}

/// Removes the callback, if registered, and forgets the record. Idempotent.
pub(super) fn disarm() {
    // SAFETY: no arguments; the observer catches its exceptions.
    unsafe { sg_watch_disarm() }
}

/// Whether the observer's callback is registered.
pub(super) fn armed() -> bool {
    // SAFETY: no arguments; the observer catches its exceptions.
    unsafe { sg_watch_armed() }
}

/// Whether libtorch has any global `RecordFunction` callback registered, the observer's or
/// another's.
#[cfg(test)]
pub(super) fn global_callbacks() -> bool {
    // SAFETY: no arguments; the observer catches its exceptions.
    unsafe { sg_watch_global_callbacks() }
}

/// Disarms, and hands over the record (text) and the statistics (a flat f64 tensor of 3 per
/// row on the first row's device, not read yet; none when no floating tensor was recorded).
/// The callback is removed even when this fails.
pub(super) fn finish() -> Result<(String, Option<Tensor>), TorchError> {
    let mut trace: *mut c_char = std::ptr::null_mut();
    let mut stats: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: module preconditions; both out-pointers are valid for the call.
    let e = unsafe { sg_watch_finish(&mut trace, &mut stats) };
    let text = (!trace.is_null()).then(|| take_text(trace));
    // SAFETY: a non-null `stats` is a new at::Tensor* that we own (module preconditions).
    let stats = (!stats.is_null()).then(|| unsafe { Tensor::from_ptr(stats) });
    check(e)?;
    let text =
        text.ok_or_else(|| TorchError::new("stepguard: the ATen observer gave no record"))?;
    Ok((text, stats))
}
