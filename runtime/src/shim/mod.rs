//! The Rust side of the ATen shim (`csrc/shim.cpp`): every `extern "C"` and every `unsafe` of
//! it. The shim calls the multi-tensor operators tch does not bind (`_foreach_norm`,
//! `_foreach_mul_`), so the guard's cost on a device does not grow with the number of tensors,
//! and counts the ATen operators a closure dispatches.
//!
//! # Preconditions the `unsafe` code relies on
//! - A `tch::Tensor` wraps a valid `at::Tensor*` (`C_tensor`) for as long as it lives; the shim
//!   only reads through the pointers it is given, for the duration of the call.
//! - A tensor the shim returns is `new at::Tensor(...)`: `Tensor::from_ptr` takes ownership
//!   and tch's `Drop` deletes it.
//! - A shim function returning `*mut c_char` returns null on success and a NUL-terminated C
//!   string on failure, never null: the exception's text (`malloc`'d) or a static text when
//!   that copy could not be allocated. `sg_free_error` frees either (it leaves the static one).
//! - The shim catches every C++ exception; none crosses the boundary.
//! - A list crosses as a pointer and a length and the shim reads that many elements: every
//!   length the C++ side assumes (lists of one fused step as long as each other, at least one
//!   tensor where it reads the first) is checked here before the call.

use crate::error::TorchError;
use std::borrow::Borrow;
use std::ffi::{c_char, c_double, c_void, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

mod amp;
mod fused;
mod grads;
mod host_copy;
mod rng;
#[cfg(test)]
mod tests;

pub(crate) use amp::{amp_unscale_, amp_update_scale_, autocast_enter, autocast_exit, ScaleUpdate};
pub(crate) use fused::{fused_adam_, fused_sgd_, sgd_sparse_, AdamStep, FusedLists, SgdStep};
pub(crate) use grads::Grads;
pub(crate) use host_copy::HostCopy;
#[cfg(test)]
pub(crate) use rng::drawing;
pub(crate) use rng::{check_rng_states, rng_states, set_rng_states, Generators, Unrecorded};

extern "C" {
    fn sg_free_error(e: *mut c_char);
    fn sg_foreach_norms(
        ts: *const *mut C_tensor,
        n: usize,
        ord: c_double,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn sg_foreach_mul_(ts: *const *mut C_tensor, n: usize, coef: *const C_tensor) -> *mut c_char;
    fn sg_host_layout(
        ts: *const *mut C_tensor,
        n: usize,
        mode: u8,
        ptrs: *mut *mut c_void,
        numels: *mut i64,
        flags: *mut u8,
    ) -> bool;
    fn sg_identity(t: *const C_tensor, data: *mut usize) -> usize;
    fn sg_detached(t: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn sg_release(ts: *const *mut C_tensor, n: usize);
    fn sg_versions(ts: *const *mut C_tensor, n: usize, out: *mut i64);
}

#[cfg(feature = "test-hooks")]
extern "C" {
    fn sg_count_ops_begin() -> *mut c_char;
    fn sg_count_ops_end(ops: *mut std::ffi::c_longlong) -> *mut c_char;
}

/// Turns the shim's error (null: none; a failure is never null) into a `Result`.
#[inline]
fn check(e: *mut c_char) -> Result<(), TorchError> {
    if e.is_null() {
        Ok(())
    } else {
        Err(shim_error(e))
    }
}

#[cold]
fn shim_error(e: *mut c_char) -> TorchError {
    // SAFETY: a non-null error is a NUL-terminated string from the shim, handed to us and
    // released once, by `sg_free_error`, after it has been copied.
    unsafe {
        let text = CStr::from_ptr(e).to_string_lossy().into_owned();
        sg_free_error(e);
        TorchError::new(text)
    }
}

thread_local! {
    static MULTI: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the multi-tensor operators off (or back on) on this thread: the guard then dispatches
/// one operator per tensor, as before the shim (for benchmarks and tests that compare).
#[cfg(feature = "test-hooks")]
pub fn set_multi_tensor(enabled: bool) {
    MULTI.with(|m| m.set(enabled));
}

/// Whether the multi-tensor operators take `ts`: defined, dense, floating tensors.
pub(crate) fn takes(ts: &[Tensor]) -> bool {
    MULTI.with(|m| m.get())
        && !ts.is_empty()
        && ts
            .iter()
            .all(|t| t.defined() && !t.is_sparse() && !t.is_mkldnn() && t.is_floating_point())
}

fn pointers(ts: &[Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

/// Per-tensor norms of order `ord` (1, 2 or inf), one `_foreach_norm` per (device, dtype)
/// group, as one f64 vector on the first tensor's device. `ts` must be non-empty, dense and
/// floating.
pub(crate) fn foreach_norms(ts: &[Tensor], ord: f64) -> Result<Tensor, TorchError> {
    if ts.is_empty() {
        return Err(TorchError::new("stepguard: the norms of no tensors"));
    }
    let ptrs = pointers(ts);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: module preconditions; `ptrs` (not empty, as the shim reads its first element)
    // outlives the call, `out` is written on success.
    check(unsafe { sg_foreach_norms(ptrs.as_ptr(), ptrs.len(), ord, &mut out) })?;
    // SAFETY: on success `out` is a new at::Tensor* that we own.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Multiplies every tensor by the 0-dim `coef`, in place (one `_foreach_mul_` per device).
pub(crate) fn foreach_mul_(ts: &[Tensor], coef: &Tensor) -> Result<(), TorchError> {
    let ptrs = pointers(ts);
    // SAFETY: module preconditions; the shim only reads the pointers during the call.
    check(unsafe { sg_foreach_mul_(ptrs.as_ptr(), ptrs.len(), coef.as_ptr()) })
}

/// The identity of the tensor behind `t`: `(tensor, data)`, the address of its `TensorImpl`
/// (shared by every handle of it, unique among live tensors, zero-size ones included; 0 for
/// an undefined tensor) and where its elements live (0 when it has none: zero-size, sparse,
/// no storage).
pub(crate) fn identity(t: &Tensor) -> (usize, usize) {
    let mut data = 0usize;
    // SAFETY: module preconditions; the shim reads the tensor and writes `data` during the
    // call, and throws nothing.
    let tensor = unsafe { sg_identity(t.as_ptr(), &mut data) };
    (tensor, data)
}

/// Calls `each` with the version counter of every tensor of `ts`, in order (what in-place
/// writes bump; -1 for an undefined tensor or one without a counter), one call into the shim
/// per 32 tensors.
pub(crate) fn versions<T: Borrow<Tensor>>(ts: &[T], mut each: impl FnMut(i64)) {
    const CHUNK: usize = 32;
    let mut ptrs = [std::ptr::null_mut::<C_tensor>(); CHUNK];
    let mut out = [0i64; CHUNK];
    for chunk in ts.chunks(CHUNK) {
        for (p, t) in ptrs.iter_mut().zip(chunk) {
            *p = t.borrow().as_ptr() as *mut C_tensor;
        }
        // SAFETY: module preconditions; both lists hold `CHUNK >= n` elements and outlive the
        // call, which reads `n` pointers, writes `n` counters and throws nothing.
        unsafe { sg_versions(ptrs.as_ptr(), chunk.len(), out.as_mut_ptr()) };
        out[..chunk.len()].iter().for_each(|&v| each(v));
    }
}

/// Drops the handles of `ts` with one call into the shim per 32 of them (tch's `Drop` makes one
/// call per handle, and asks libtorch for an error after each).
pub(crate) fn release(ts: Vec<Tensor>) {
    const CHUNK: usize = 32;
    let mut ptrs = [std::ptr::null_mut::<C_tensor>(); CHUNK];
    let mut n = 0;
    for mut t in ts {
        ptrs[n] = t.as_mut_ptr();
        // The shim deletes the handle, instead of tch's `Drop`.
        std::mem::forget(t);
        n += 1;
        if n == CHUNK {
            // SAFETY: module preconditions; the `n` pointers are handles owned here (their
            // `Tensor`s forgotten), each deleted once, by the shim, which throws nothing.
            unsafe { sg_release(ptrs.as_ptr(), n) };
            n = 0;
        }
    }
    if n > 0 {
        // SAFETY: as above.
        unsafe { sg_release(ptrs.as_ptr(), n) };
    }
}

/// `t.detach()` without dispatching an operator (libtorch's `variable_data`: the same data
/// and metadata, no autograd history, a version counter of its own), for a value kept only to
/// be read. `t.detach()` itself if the shim fails. `t` must be defined.
pub(crate) fn detached(t: &Tensor) -> Tensor {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: module preconditions; `out` is written on success.
    match check(unsafe { sg_detached(t.as_ptr(), &mut out) }) {
        // SAFETY: on success `out` is a new at::Tensor* that we own.
        Ok(()) => unsafe { Tensor::from_ptr(out) },
        Err(_) => t.detach(),
    }
}

/// Where a tensor's elements are, for the CPU fast path (`host_view`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostLayout {
    /// The first element.
    pub ptr: *mut c_void,
    /// The number of elements.
    pub numel: usize,
    /// f64 elements (else f32).
    pub f64: bool,
    /// The tensor requires grad (writes must go through ATen).
    pub requires_grad: bool,
    /// The tensor is defined (else it was skipped, and has no elements).
    pub defined: bool,
}

/// The layout of every tensor of `ts` when each is a defined, strided, contiguous CPU tensor of
/// f32 or f64 with storage, handed to `each` in order (one call into the shim per 32 tensors,
/// no allocation); `false` as soon as one is not (`each` may have seen the ones before it).
/// With `read_only` (the memory will only be read), an undefined tensor qualifies too, as a
/// layout with `defined` false, and `requires_grad` is not asked (false).
pub(crate) fn host_layouts<T: Borrow<Tensor>>(
    ts: &[T],
    read_only: bool,
    mut each: impl FnMut(HostLayout),
) -> bool {
    const CHUNK: usize = 32;
    let mut ptrs = [std::ptr::null_mut::<C_tensor>(); CHUNK];
    let mut data = [std::ptr::null_mut::<c_void>(); CHUNK];
    let mut numels = [0i64; CHUNK];
    let mut flags = [0u8; CHUNK];
    for chunk in ts.chunks(CHUNK) {
        let n = chunk.len();
        for (p, t) in ptrs.iter_mut().zip(chunk) {
            *p = t.borrow().as_ptr() as *mut C_tensor;
        }
        // SAFETY: module preconditions; the four lists hold `CHUNK >= n` elements each and
        // outlive the call, which reads `n` pointers, writes at most `n` elements of each
        // other list and throws nothing.
        let ok = unsafe {
            sg_host_layout(
                ptrs.as_ptr(),
                n,
                if read_only { 3 } else { 0 },
                data.as_mut_ptr(),
                numels.as_mut_ptr(),
                flags.as_mut_ptr(),
            )
        };
        if !ok {
            return false;
        }
        for i in 0..n {
            each(HostLayout {
                ptr: data[i],
                numel: numels[i] as usize,
                f64: flags[i] & 1 != 0,
                requires_grad: flags[i] & 2 != 0,
                defined: flags[i] & 4 == 0,
            });
        }
    }
    true
}

fn optional(t: Option<&Tensor>) -> *const C_tensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr())
}

/// Runs `f` and returns its result with the number of ATen operators called on this thread
/// meanwhile, counting only the outermost ones (what the code in `f` dispatched, not what those
/// operators call inside). Counts every operator, stepguard's and the caller's: put only the
/// code to measure in `f`. Uses a thread-local `RecordFunction` callback, on only while
/// counting.
#[cfg(feature = "test-hooks")]
pub fn count_aten_ops<R>(f: impl FnOnce() -> R) -> (R, u64) {
    // SAFETY: no arguments; the shim catches its exceptions.
    let started = check(unsafe { sg_count_ops_begin() }).is_ok();
    let r = f();
    let mut ops: std::ffi::c_longlong = 0;
    // SAFETY: `ops` is a valid out-pointer for the call.
    let ended = check(unsafe { sg_count_ops_end(&mut ops) }).is_ok();
    (r, if started && ended { ops as u64 } else { 0 })
}
