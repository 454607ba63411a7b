//! The CPU fast path: a host view of a step's tensors, and the one home of every `unsafe`
//! read or write of tensor memory in stepguard.
//!
//! On CPU the cost of guarding is per-tensor dispatch, not arithmetic: a `norm()` per grad
//! costs several times a plain loop over the same bytes. [`HostView::of`] decides once, for a
//! whole set of tensors, whether they can be read directly; if so the norms, the finiteness and
//! the scaling are loops over their memory. Any other set (CUDA, sparse, mkldnn, f16/bf16,
//! non-contiguous, or the fast path turned off) takes the ATen path.
//!
//! # Preconditions the `unsafe` code relies on
//! - A defined, strided, contiguous CPU tensor of kind f32/f64 with storage (and no negative
//!   or conjugate view bit) holds `numel` elements of that type at `data_ptr`, valid while the
//!   tensor (which the view borrows) is alive. Checked by [`HostView::of`] for every tensor, in
//!   one call into the shim for the whole list (`shim::host_layout`).
//! - CPU operations have completed when they return, so the memory is settled: reading it is
//!   not a device sync.
//! - No other thread mutates these tensors during the step. This is the contract of libtorch's
//!   own CPU kernels too (two threads writing one tensor race in any op); stepguard adds no
//!   synchronisation of its own.
//! - The loops run compiled for AVX2 when the CPU has it (checked at run time, [`avx2`]): the
//!   same lanes in the same order, so the results are bitwise those of the baseline build.
//! - Writes ([`HostView::scale`]) go only to tensors that do not require grad: a write through
//!   the pointer does not bump autograd's version counter, so a grad that is part of a graph
//!   (`create_graph`) is scaled by ATen's `mul_`, which does, and errors as PyTorch would.

use std::borrow::Borrow;

use tch::{Device, Tensor};

use crate::norm::NormType;

/// A CPU tensor's memory: a pointer and a length, turned into a slice only for the duration
/// of one read or one write (so a shared and an exclusive slice never coexist).
#[derive(Debug, Clone, Copy)]
enum Raw {
    F32(*mut f32, usize),
    F64(*mut f64, usize),
}

/// A borrowed view of one tensor's memory.
enum Slice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the CPU fast path off (or back on) on this thread, so tests and benchmarks can run
/// the ATen path on CPU tensors too.
#[cfg(feature = "test-hooks")]
pub fn set_cpu_fast_path(enabled: bool) {
    ENABLED.with(|e| e.set(enabled));
}

/// Whether the CPU fast path is on for this thread.
pub(crate) fn fast_path_enabled() -> bool {
    ENABLED.with(std::cell::Cell::get)
}

/// Host views of a set of tensors, all of which qualified for the fast path.
#[derive(Debug)]
pub(crate) struct HostView<'a> {
    parts: Vec<Part<'a>>,
}

/// One tensor of a [`HostView`].
#[derive(Debug, Clone, Copy)]
struct Part<'a> {
    tensor: &'a Tensor,
    raw: Raw,
    /// The tensor requires grad (written through ATen).
    requires_grad: bool,
}

impl Raw {
    fn of(l: &crate::shim::HostLayout) -> Raw {
        match l.f64 {
            true => Raw::F64(l.ptr.cast(), l.numel),
            false => Raw::F32(l.ptr.cast(), l.numel),
        }
    }
}

impl<'a> HostView<'a> {
    /// The view, or `None` when the fast path is off or one tensor does not qualify. One
    /// allocation (the view's list) and one call into the shim per 32 tensors.
    pub(crate) fn of<T: Borrow<Tensor>>(ts: &'a [T]) -> Option<Self> {
        if !ENABLED.with(|e| e.get()) || ts.is_empty() {
            return None;
        }
        let mut parts = Vec::with_capacity(ts.len());
        let mut tensors = ts.iter();
        let ok = crate::shim::host_layouts(ts, false, |l| {
            if let Some(t) = tensors.next() {
                parts.push(Part {
                    tensor: t.borrow(),
                    raw: Raw::of(&l),
                    requires_grad: l.requires_grad,
                });
            }
        });
        ok.then_some(HostView { parts })
    }

    /// Whether every element of the defined tensors of `ts` is finite, read in place with no
    /// view built (no allocation); `None` when the fast path is off, no tensor is defined, or
    /// one does not qualify (as for [`HostView::of`]).
    pub(crate) fn all_finite_of<T: Borrow<Tensor>>(ts: &[T]) -> Option<bool> {
        if !ENABLED.with(|e| e.get()) || ts.is_empty() {
            return None;
        }
        let (mut finite, mut defined) = (true, false);
        let ok = crate::shim::host_layouts(ts, true, |l| {
            if l.defined {
                defined = true;
                finite = finite && raw_all_finite(Raw::of(&l));
            }
        });
        (ok && defined).then_some(finite)
    }

    /// The tensors' device (the CPU).
    pub(crate) fn device(&self) -> Device {
        Device::Cpu
    }

    /// One tensor's memory, read-only.
    #[inline(always)]
    fn slice(r: Raw) -> Slice<'a> {
        // SAFETY: every tensor passed `HostView::of` (module preconditions): `n` elements of its
        // kind at the pointer, alive while the view borrows the tensors, settled, not mutated by
        // anyone while this shared slice lives (`scale` takes `&self` but does not overlap a
        // read: each slice is used and dropped within one call here). `from_raw_parts` needs a
        // non-null aligned pointer even for 0 elements.
        unsafe {
            match r {
                Raw::F32(_, 0) => Slice::F32(&[]),
                Raw::F64(_, 0) => Slice::F64(&[]),
                Raw::F32(p, n) => Slice::F32(std::slice::from_raw_parts(p, n)),
                Raw::F64(p, n) => Slice::F64(std::slice::from_raw_parts(p, n)),
            }
        }
    }

    /// The total norm, as PyTorch's `clip_grad_norm_` defines it, accumulated so that it does
    /// not overflow while the true value is representable in f64.
    pub(crate) fn total_norm(&self, p: NormType) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.total_norm_avx2(p) };
        }
        self.total_norm_here(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn total_norm_avx2(&self, p: NormType) -> f64 {
        self.total_norm_here(p)
    }

    // The loops are written without closures around them, so that they are compiled into the
    // AVX2 copy (a closure is a function of its own, built for the baseline CPU).
    #[inline(always)]
    fn total_norm_here(&self, p: NormType) -> f64 {
        let p = p.canonical();
        match p {
            // The same additions, in the same order, as `Iterator::sum` of the parts.
            NormType::L1 | NormType::L2 => {
                let mut sum = -0.0;
                for x in &self.parts {
                    sum += Self::part(x.raw, p);
                }
                match p {
                    NormType::L2 => sum.sqrt(),
                    _ => sum,
                }
            }
            NormType::Inf => {
                let mut max = 0.0;
                for x in &self.parts {
                    max = nan_max(max, Self::part(x.raw, p));
                }
                max
            }
            NormType::P(q) => {
                let mut parts = Vec::with_capacity(self.parts.len());
                for x in &self.parts {
                    parts.push(Self::part(x.raw, p));
                }
                scaled_p_norm(&parts, q)
            }
        }
    }

    /// One tensor's part of the total norm.
    #[inline(always)]
    fn part(r: Raw, p: NormType) -> f64 {
        match (Self::slice(r), p) {
            (Slice::F32(s), NormType::L2) => f32_then_f64(s, |x| x * x, |x| x * x),
            (Slice::F32(s), NormType::L1) => f32_then_f64(s, f32::abs, f64::abs),
            (Slice::F32(s), p) => partial(s, p),
            (Slice::F64(s), p) => partial(s, p),
        }
    }

    /// Multiplies every element by `coef`, in place.
    pub(crate) fn scale(&self, coef: f64) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.scale_avx2(coef) };
        }
        self.scale_here(coef)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn scale_avx2(&self, coef: f64) {
        self.scale_here(coef)
    }

    #[inline(always)]
    fn scale_here(&self, coef: f64) {
        for x in &self.parts {
            if x.requires_grad {
                // Part of a graph: ATen bumps the version counter (module preconditions).
                let _guard = tch::no_grad_guard();
                let _ = x.tensor.shallow_clone().f_mul_scalar_(coef);
                continue;
            }
            // SAFETY: module preconditions; the tensor does not require grad, and no other
            // slice of its memory is alive while this exclusive one is.
            match x.raw {
                Raw::F32(_, 0) | Raw::F64(_, 0) => {}
                Raw::F32(p, n) => {
                    let c = coef as f32;
                    for v in unsafe { std::slice::from_raw_parts_mut(p, n) } {
                        *v *= c;
                    }
                }
                Raw::F64(p, n) => {
                    for v in unsafe { std::slice::from_raw_parts_mut(p, n) } {
                        *v *= coef;
                    }
                }
            }
        }
    }

    /// Every element, tensor after tensor, as f64 (exact for both kinds).
    pub(crate) fn values(&self) -> Vec<f64> {
        let mut v = Vec::new();
        for x in &self.parts {
            match Self::slice(x.raw) {
                Slice::F32(s) => v.extend(s.iter().map(|&x| f64::from(x))),
                Slice::F64(s) => v.extend_from_slice(s),
            }
        }
        v
    }
}

/// Whether every element of one tensor's memory is finite (`Σ x·0` is 0 exactly then, NaN as
/// soon as one element is NaN or ±Inf).
fn raw_all_finite(r: Raw) -> bool {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { raw_all_finite_avx2(r) };
    }
    raw_all_finite_here(r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn raw_all_finite_avx2(r: Raw) -> bool {
    raw_all_finite_here(r)
}

#[inline(always)]
fn raw_all_finite_here(r: Raw) -> bool {
    match HostView::slice(r) {
        Slice::F32(s) => zero_sum_f32(s) == 0.0,
        Slice::F64(s) => lane_sum(s, |x| x * 0.0) == 0.0,
    }
}

/// Whether the CPU has AVX2 (cached by std). The `*_avx2` copies of the loops keep their lanes
/// and their order of additions (Rust never contracts or reorders float operations), so their
/// results are bitwise those of the baseline copies; only the number of instructions changes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// `(Σ nᵢ^q)^(1/q)` of per-tensor norms, scaled by their maximum so that it does not overflow
/// (or underflow) when the norms are large (or small) and `q` is.
fn scaled_p_norm(norms: &[f64], q: f64) -> f64 {
    let m = norms.iter().copied().fold(0.0, nan_max);
    if m == 0.0 || !m.is_finite() {
        return m;
    }
    m * norms
        .iter()
        .map(|n| (n / m).powf(q))
        .sum::<f64>()
        .powf(1.0 / q)
}

const LANES: usize = 8;

/// `Σ f(x)` with `LANES` independent f64 accumulators, so the loop vectorises.
#[inline(always)]
fn lane_sum<T: Copy + Into<f64>>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i].into());
        }
    }
    let mut s: f64 = chunks.remainder().iter().map(|x| f((*x).into())).sum();
    for a in acc {
        s += a;
    }
    s
}

/// Largest |x|: NaN if an element is NaN, +Inf if one is infinite (like ATen's norm).
#[inline(always)]
fn lane_max<T: Copy + Into<f64>>(xs: &[T]) -> f64 {
    let mut m = [0.0f64; LANES];
    let mut bad = [0.0f64; LANES]; // x * 0: NaN exactly for NaN and ±Inf
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let x: f64 = c[i].into();
            m[i] = m[i].max(x.abs());
            bad[i] += x * 0.0;
        }
    }
    let mut mx = m.iter().copied().fold(0.0, f64::max);
    let mut b: f64 = bad.iter().sum();
    for x in chunks.remainder() {
        let x: f64 = (*x).into();
        mx = mx.max(x.abs());
        b += x * 0.0;
    }
    if b.is_nan() {
        // NaN anywhere makes the norm NaN; otherwise only infinities were there.
        if xs.iter().any(|x| (*x).into().is_nan()) {
            f64::NAN
        } else {
            f64::INFINITY
        }
    } else {
        mx
    }
}

/// `Σ f(x)` over f32 data in 16 f32 lanes within blocks of 1024 elements (SIMD width, block
/// sums added in f64); when that overflows f32 (elements above ~1.8e19 squared), the same sum
/// again in f64, so the result is what f64 arithmetic gives. NaN and ±Inf elements give
/// NaN/Inf either way.
#[inline(always)]
fn f32_then_f64(xs: &[f32], f: impl Fn(f32) -> f32, g: impl Fn(f64) -> f64) -> f64 {
    const W: usize = 16;
    let mut total = 0.0f64;
    for block in xs.chunks(1024) {
        let mut acc = [0.0f32; W];
        let mut chunks = block.chunks_exact(W);
        for c in &mut chunks {
            for i in 0..W {
                acc[i] += f(c[i]);
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|x| f(*x)).sum();
        total += acc.iter().map(|a| *a as f64).sum::<f64>() + rest as f64;
    }
    if total.is_finite() {
        total
    } else {
        lane_sum(xs, g)
    }
}

/// One tensor's part of the total: `Σ|x|`, `Σx²`, `max|x|`, or (general p) its own p-norm,
/// computed scaled by its largest element.
#[inline(always)]
fn partial<T: Copy + Into<f64>>(xs: &[T], p: NormType) -> f64 {
    match p {
        NormType::L1 => lane_sum(xs, f64::abs),
        NormType::L2 => lane_sum(xs, |x| x * x),
        NormType::Inf => lane_max(xs),
        NormType::P(q) => {
            let m = lane_max(xs);
            if m == 0.0 || !m.is_finite() {
                return m;
            }
            m * lane_sum(xs, |x| (x.abs() / m).powf(q)).powf(1.0 / q)
        }
    }
}

/// `Σ x·0` in f32 lanes: exact (every term is 0 or NaN), and twice as wide as f64.
#[inline(always)]
fn zero_sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 2 * LANES];
    let mut chunks = xs.chunks_exact(2 * LANES);
    for c in &mut chunks {
        for i in 0..2 * LANES {
            acc[i] += c[i] * 0.0;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|x| x * 0.0).sum::<f32>()
}

#[cfg(test)]
mod tests;
