//! The Rust side of the c10d bridge (`csrc/dist.cpp`): every `extern "C"` and every `unsafe`
//! of `stepguard::dist`.
//!
//! # Preconditions the `unsafe` code relies on
//! - A `tch::Tensor` wraps a valid `at::Tensor*` (`C_tensor`) for as long as it lives; the
//!   bridge uses the pointer only for the duration of the call (the collectives are waited for
//!   before they return).
//! - A group handle is the `SgGroup*` `sg_dist_new` returned, used by one thread at a time
//!   (`Group` is `Send`, not `Sync`; `ProcessGroup` keeps it behind a mutex) and freed once,
//!   by `Drop`.
//! - An error is a `malloc`'d C string, freed by `sg_dist_free_error`; the bridge catches every
//!   C++ exception, none crosses the boundary.

use std::ffi::{c_char, c_int, CStr, CString};

use tch::Tensor;
use torch_sys::C_tensor;

#[repr(C)]
struct SgGroup {
    _opaque: [u8; 0],
}

extern "C" {
    fn sg_dist_free_error(e: *mut c_char);
    fn sg_dist_has_nccl() -> bool;
    fn sg_dist_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        size: c_int,
        serve: bool,
        attempt: u32,
        timeout_ms: i64,
        out: *mut *mut SgGroup,
        kind: *mut c_int,
    ) -> *mut c_char;
    fn sg_dist_free(g: *mut SgGroup);
    fn sg_dist_all_reduce(
        g: *mut SgGroup,
        t: *mut C_tensor,
        op: c_int,
        kind: *mut c_int,
    ) -> *mut c_char;
    fn sg_dist_broadcast(
        g: *mut SgGroup,
        t: *mut C_tensor,
        root: c_int,
        kind: *mut c_int,
    ) -> *mut c_char;
    fn sg_dist_barrier(g: *mut SgGroup, kind: *mut c_int) -> *mut c_char;
    fn sg_dist_ensure_grad(t: *mut C_tensor, kind: *mut c_int) -> *mut c_char;
}

/// What kind of error the bridge met (csrc/dist.cpp's `Kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Other,
    /// c10d's `TimeoutError`, or a Gloo "Timed out" message.
    Timeout,
    /// c10's `DistNetworkError`: a peer closed its connection, refused, reset.
    Network,
    /// c10's `DistStoreError`: the rendezvous store.
    Store,
    /// c10's `DistBackendError`.
    Backend,
}

impl Kind {
    fn of_code(code: c_int) -> Kind {
        match code {
            1 => Kind::Timeout,
            2 => Kind::Network,
            3 => Kind::Store,
            4 => Kind::Backend,
            _ => Kind::Other,
        }
    }
}

/// An error of the bridge: its kind and c10d's text.
#[derive(Debug)]
pub(crate) struct Error {
    pub kind: Kind,
    pub text: String,
}

impl Error {
    /// An error met on the Rust side of the bridge, before any call.
    fn other(text: &str) -> Self {
        Error {
            kind: Kind::Other,
            text: text.to_owned(),
        }
    }
}

/// Turns the bridge's error (null: none) into a `Result`.
fn check(e: *mut c_char, kind: c_int) -> Result<(), Error> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a NUL-terminated string malloc'd by the bridge, ours to free.
    unsafe {
        let text = CStr::from_ptr(e).to_string_lossy().into_owned();
        sg_dist_free_error(e);
        Err(Error {
            kind: Kind::of_code(kind),
            text,
        })
    }
}

/// Whether this build has the NCCL backend (nccl.h was found at build time).
pub(crate) fn has_nccl() -> bool {
    // SAFETY: no preconditions.
    unsafe { sg_dist_has_nccl() }
}

/// A c10d process group: the TCPStore connection (rank 0 serves it), Gloo for CPU tensors and
/// NCCL (created on first use) for CUDA tensors.
pub(crate) struct Group(*mut SgGroup);

// SAFETY: the group is c10d's, whose backends may be driven from any thread; `Group` is not
// `Sync`, so one thread at a time issues its collectives (which must come in the same order on
// every rank anyway).
unsafe impl Send for Group {}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Group")
    }
}

impl Group {
    /// Rendezvous at `host:port` (served by this process if `serve`) and the Gloo process
    /// group, under the store's keys of start `attempt` (torchrun's restart count); blocks until every rank arrived or `timeout_ms` ran out, except where c10d's
    /// TCPStore client overshoots it (see `rendezvous.rs`, which bounds the whole, calling this
    /// on a thread of its own and handing the group over to the caller's).
    pub(crate) fn new(
        host: &str,
        port: u16,
        rank: usize,
        size: usize,
        serve: bool,
        attempt: u32,
        timeout_ms: i64,
    ) -> Result<Self, Error> {
        let host =
            CString::new(host).map_err(|_| Error::other("MASTER_ADDR contains a NUL byte"))?;
        let (rank, size) = match (c_int::try_from(rank), c_int::try_from(size)) {
            (Ok(r), Ok(s)) => (r, s),
            _ => return Err(Error::other("rank or world size out of range")),
        };
        let mut out: *mut SgGroup = std::ptr::null_mut();
        let mut kind: c_int = 0;
        // SAFETY: `host` is a NUL-terminated string alive for the call; `out` and `kind` are
        // written by the bridge; `out` is set exactly when no error is returned.
        let e = unsafe {
            sg_dist_new(
                host.as_ptr(),
                c_int::from(port),
                rank,
                size,
                serve,
                attempt,
                timeout_ms,
                &mut out,
                &mut kind,
            )
        };
        check(e, kind)?;
        Ok(Group(out))
    }

    /// In-place all-reduce of `t` (0 sum, 1 max, 2 min) over every rank.
    pub(crate) fn all_reduce(&self, t: &Tensor, op: i32) -> Result<(), Error> {
        let mut kind: c_int = 0;
        // SAFETY: module preconditions; `self.0` is a live group used by this thread only.
        let e = unsafe { sg_dist_all_reduce(self.0, t.as_ptr() as *mut C_tensor, op, &mut kind) };
        check(e, kind)
    }

    /// In-place broadcast of `t` from rank `root`.
    pub(crate) fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), Error> {
        let root = c_int::try_from(root).map_err(|_| Error::other("root rank out of range"))?;
        let mut kind: c_int = 0;
        // SAFETY: as in `all_reduce`.
        let e = unsafe { sg_dist_broadcast(self.0, t.as_ptr() as *mut C_tensor, root, &mut kind) };
        check(e, kind)
    }

    /// Waits until every rank called it.
    pub(crate) fn barrier(&self) -> Result<(), Error> {
        let mut kind: c_int = 0;
        // SAFETY: `self.0` is a live group used by this thread only.
        let e = unsafe { sg_dist_barrier(self.0, &mut kind) };
        check(e, kind)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `sg_dist_new` and is freed only here.
        unsafe { sg_dist_free(self.0) }
    }
}

/// Gives `var` a zero gradient if its gradient is undefined (a parameter the step did not use).
pub(crate) fn ensure_grad(var: &Tensor) -> Result<(), Error> {
    let mut kind: c_int = 0;
    // SAFETY: module preconditions: `var` is a live tensor; the bridge sets its `grad` field.
    let e = unsafe { sg_dist_ensure_grad(var.as_ptr() as *mut C_tensor, &mut kind) };
    check(e, kind)
}
