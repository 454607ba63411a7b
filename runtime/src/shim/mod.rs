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

use std::ffi::{c_char, c_double, c_void, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

mod amp;
pub(crate) use amp::{amp_unscale_, amp_update_scale_, autocast_enter, autocast_exit, ScaleUpdate};

extern "C" {
    fn sg_free_error(e: *mut c_char);
    fn sg_foreach_norms(
        ts: *const *mut C_tensor,
        n: usize,
        ord: c_double,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn sg_foreach_mul_(ts: *const *mut C_tensor, n: usize, coef: *const C_tensor) -> *mut c_char;
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
    fn sg_copy_to_host_async(
        src: *const C_tensor,
        dst: *mut *mut C_tensor,
        event: *mut *mut c_void,
    ) -> *mut c_char;
    fn sg_event_synchronize(event: *mut c_void) -> *mut c_char;
    fn sg_event_free(event: *mut c_void);
}

#[cfg(feature = "test-hooks")]
extern "C" {
    fn sg_count_ops_begin() -> *mut c_char;
    fn sg_count_ops_end(ops: *mut std::ffi::c_longlong) -> *mut c_char;
}

/// Turns the shim's error (null: none; a failure is never null) into a `Result`.
fn check(e: *mut c_char) -> Result<(), String> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a NUL-terminated string from the shim, handed to us and
    // released once, by `sg_free_error`, after it has been copied.
    unsafe {
        let text = CStr::from_ptr(e).to_string_lossy().into_owned();
        sg_free_error(e);
        Err(text)
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
pub(crate) fn foreach_norms(ts: &[Tensor], ord: f64) -> Result<Tensor, String> {
    if ts.is_empty() {
        return Err("stepguard: the norms of no tensors".into());
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
pub(crate) fn foreach_mul_(ts: &[Tensor], coef: &Tensor) -> Result<(), String> {
    let ptrs = pointers(ts);
    // SAFETY: module preconditions; the shim only reads the pointers during the call.
    check(unsafe { sg_foreach_mul_(ptrs.as_ptr(), ptrs.len(), coef.as_ptr()) })
}

fn optional(t: Option<&Tensor>) -> *const C_tensor {
    t.map_or(std::ptr::null(), |t| t.as_ptr())
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
) -> Result<(), String> {
    let (n, k) = (l.params.len(), list.len());
    if k == n || (may_be_empty && k == 0) {
        Ok(())
    } else {
        Err(format!("stepguard: {k} {what} for {n} parameters"))
    }
}

/// `_fused_adam_` / `_fused_adamw_`, with the step counters moved as torch.optim moves them,
/// once the kernel has succeeded: on an error, nothing has changed.
pub(crate) fn fused_adam_(
    l: &FusedLists<'_>,
    h: AdamStep,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<(), String> {
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
) -> Result<(), String> {
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
    pub(crate) fn start(src: &Tensor) -> Result<HostCopy, String> {
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
                .map_err(|e| e.to_string())?;
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
    pub(crate) fn finish(mut self) -> Result<Vec<f64>, String> {
        if !self.event.is_null() {
            // SAFETY: `event` is the live c10::Event this value owns.
            check(unsafe { sg_event_synchronize(self.event) })?;
        }
        let host = std::mem::replace(&mut self.host, Tensor::new());
        Vec::<f64>::try_from(host.to_kind(tch::Kind::Double)).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn resident_kib() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        pages * 4
    }

    #[test]
    fn a_cpp_exception_comes_back_as_an_error() {
        let ints = [Tensor::ones([3], (Kind::Int64, Device::Cpu))];
        let e = foreach_norms(&ints, 2.0).expect_err("_foreach_norm refuses integer tensors");
        assert!(!e.is_empty());
        let coef = Tensor::from(0.5f64);
        let e = foreach_mul_(&[Tensor::ones([2], (Kind::Bool, Device::Cpu))], &coef);
        assert!(e.is_err(), "a bool tensor cannot be scaled in place by 0.5");
    }

    extern "C" {
        fn sg_test_fail_next_error_alloc();
    }

    #[test]
    fn an_error_whose_text_cannot_be_allocated_is_still_an_error() {
        let ints = [Tensor::ones([3], (Kind::Int64, Device::Cpu))];
        // SAFETY: no arguments; sets a thread-local flag of the shim.
        unsafe { sg_test_fail_next_error_alloc() };
        let r = foreach_norms(&ints, 2.0);
        assert!(r.is_err(), "a failure read as success: {r:?}");
    }

    #[test]
    fn empty_or_unequal_lists_are_errors_not_reads_past_the_end() {
        assert!(foreach_norms(&[], 2.0).is_err());
        let t = || Tensor::ones([2], (Kind::Float, Device::Cpu));
        let (p, g1, g0) = ([t(), t()], [t()], [t(), t()]);
        let (m, v, st) = (
            [t(), t()],
            [t(), t()],
            [Tensor::from(0f32), Tensor::from(0f32)],
        );
        let adam = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            eps: 1e-8,
            amsgrad: false,
            adamw: false,
        };
        let short = FusedLists {
            params: &p,
            grads: &g1,
            first: &m,
            second: &v,
            max: &[],
            steps: &st,
        };
        let e = fused_adam_(&short, adam, None, None).expect_err("one grad for two params");
        assert!(e.contains("grads"), "{e}");
        let amsgrad = AdamStep {
            amsgrad: true,
            ..adam
        };
        let no_max = FusedLists {
            grads: &g0,
            ..short
        };
        assert!(fused_adam_(&no_max, amsgrad, None, None).is_err());
        let sgd = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            is_first_step: true,
        };
        let one_buffer = FusedLists {
            first: &m[..1],
            ..no_max
        };
        assert!(fused_sgd_(&one_buffer, sgd, None, None).is_err());
        // Nothing moved.
        assert!(p.iter().all(|x| x.equal(&t())));
        assert!(m.iter().all(|x| x.equal(&t())));
        assert!(st.iter().all(|s| s.double_value(&[]) == 0.0));
    }

    /// Params, grads, moments and step counters of a fused Adam step over `kinds`.
    fn adam_lists(kinds: [Kind; 2], moment: Kind) -> [Vec<Tensor>; 5] {
        let t = |k: Kind, v: f64| Tensor::full([3], v, (k, Device::Cpu));
        [
            kinds.iter().map(|&k| t(k, 1.0)).collect(),
            kinds.iter().map(|&k| t(k, 0.5)).collect(),
            [kinds[0], moment].iter().map(|&k| t(k, 0.0)).collect(),
            kinds.iter().map(|&k| t(k, 0.0)).collect(),
            (0..2).map(|_| Tensor::from(3f32)).collect(),
        ]
    }

    #[test]
    fn a_step_the_kernel_rejects_moves_no_counter_and_no_parameter() {
        let adam = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            eps: 1e-8,
            amsgrad: false,
            adamw: true,
        };
        // Integer tensors (no fused kernel for them), then a moment of another dtype than its
        // parameter (the CPU kernel updates the tensors before it, then throws).
        for (kinds, moment) in [
            ([Kind::Int64, Kind::Int64], Kind::Int64),
            ([Kind::Float, Kind::Float], Kind::Double),
        ] {
            let [p, g, m, v, st] = adam_lists(kinds, moment);
            let before: Vec<Tensor> = p
                .iter()
                .chain(&m)
                .chain(&v)
                .chain(&st)
                .map(Tensor::copy)
                .collect();
            let lists = FusedLists {
                params: &p,
                grads: &g,
                first: &m,
                second: &v,
                max: &[],
                steps: &st,
            };
            let found_inf = Tensor::from(0f32);
            for inf in [None, Some(&found_inf)] {
                let r = fused_adam_(&lists, adam, None, inf);
                assert!(r.is_err(), "{kinds:?} {moment:?}");
                let after = p.iter().chain(&m).chain(&v).chain(&st);
                for (i, (a, b)) in before.iter().zip(after).enumerate() {
                    assert!(a.equal(b), "{kinds:?} {moment:?}: tensor {i} moved");
                }
            }
        }
    }

    #[test]
    fn the_shim_leaks_no_tensors() {
        let ts: Vec<Tensor> = (0..4)
            .map(|i| Tensor::ones([8], (Kind::Float, Device::Cpu)) * i)
            .collect();
        let coef = Tensor::from(1.0f64);
        let run = |n: usize| {
            for _ in 0..n {
                let norms = foreach_norms(&ts, 2.0).unwrap();
                assert_eq!(norms.size(), vec![4]);
                foreach_mul_(&ts, &coef).unwrap();
            }
        };
        if resident_kib() == 0 {
            return; // no /proc: nothing to measure
        }
        run(2_000);
        let before = resident_kib();
        run(20_000);
        let grown = resident_kib().saturating_sub(before);
        // A leaked at::Tensor (with its TensorImpl and storage) is several hundred bytes: 20k
        // of them would be well over 4 MiB.
        assert!(
            grown < 4 * 1024,
            "resident memory grew by {grown} KiB over 20k calls"
        );
    }
}
