//! CPU fast path: one pass over each tensor's memory instead of one ATen call per tensor.
//!
//! On CPU the cost of guarding is per-tensor dispatch, not arithmetic: a `norm()` per grad
//! costs several times a plain loop over the same bytes. For contiguous f32/f64 CPU tensors
//! these loops compute the partial norms, the finiteness and the scaling directly; CPU
//! operations are synchronous, so the memory is settled when they run and reading it is not a
//! device sync. Any other tensor (CUDA, bf16/f16, non-contiguous) takes the ATen path.

use std::borrow::Borrow;

use tch::{Device, Kind, Tensor};

use crate::clip::NormType;

/// A CPU tensor's memory.
enum Slice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

fn slice(t: &Tensor) -> Option<Slice<'_>> {
    // `is_contiguous` throws for sparse and mkldnn tensors: ask about the layout first.
    if !t.defined()
        || t.device() != Device::Cpu
        || t.is_sparse()
        || t.is_mkldnn()
        || !t.is_contiguous()
    {
        return None;
    }
    let n = t.numel();
    let ptr = t.data_ptr();
    // SAFETY: a defined, contiguous CPU tensor of this kind holds `n` elements at `data_ptr`,
    // valid while `t` lives (the slice borrows `t`). CPU ops have completed when they return,
    // and nothing writes to this memory while the slice is alive (same thread, no op runs).
    unsafe {
        match t.kind() {
            Kind::Float if n == 0 => Some(Slice::F32(&[])),
            Kind::Double if n == 0 => Some(Slice::F64(&[])),
            Kind::Float => Some(Slice::F32(std::slice::from_raw_parts(ptr as *const f32, n))),
            Kind::Double => Some(Slice::F64(std::slice::from_raw_parts(ptr as *const f64, n))),
            _ => None,
        }
    }
}

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the CPU fast path off (or back on) on this thread, so tests and benchmarks can run
/// the ATen path on CPU tensors too.
pub fn set_cpu_fast_path(enabled: bool) {
    ENABLED.with(|e| e.set(enabled));
}

/// Every tensor's memory, or `None` when one of them cannot take the fast path.
fn slices<T: Borrow<Tensor>>(ts: &[T]) -> Option<Vec<Slice<'_>>> {
    if !ENABLED.with(|e| e.get()) || ts.is_empty() {
        return None;
    }
    ts.iter().map(|t| slice(t.borrow())).collect()
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

/// `Σ f(x)` over f32 data: 16 f32 lanes within blocks of 1024 elements (so the loop runs at
/// SIMD width without widening), the block sums added in f64. The rounding error stays at the
/// level of PyTorch's own f32 reductions. Non-finite values propagate as in any sum.
fn blocked_f32(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
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
    total
}

fn partial<T: Copy + Into<f64>>(xs: &[T], p: NormType) -> f64 {
    match p {
        NormType::L1 => lane_sum(xs, f64::abs),
        NormType::L2 => lane_sum(xs, |x| x * x),
        NormType::Inf => lane_max(xs),
        NormType::P(p) => lane_sum(xs, |x| x.abs().powf(p)),
    }
}

/// The total norm of `grads`, as PyTorch's `clip_grad_norm_` defines it, or `None` when one
/// of them cannot take the fast path.
pub(crate) fn total_norm(grads: &[Tensor], p: NormType) -> Option<f64> {
    let parts = slices(grads)?.into_iter().map(|s| match (s, p) {
        (Slice::F32(s), NormType::L2) => blocked_f32(s, |x| x * x),
        (Slice::F32(s), NormType::L1) => blocked_f32(s, f32::abs),
        (Slice::F32(s), p) => partial(s, p),
        (Slice::F64(s), p) => partial(s, p),
    });
    Some(match p {
        NormType::L1 => parts.sum(),
        NormType::L2 => parts.sum::<f64>().sqrt(),
        NormType::Inf => parts.fold(0.0, |a: f64, b| {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                a.max(b)
            }
        }),
        NormType::P(q) => parts.sum::<f64>().powf(1.0 / q),
    })
}

/// Multiplies every element of `grads` by `coef`, in place. Only called after `total_norm`
/// succeeded on the same grads, so they are all f32/f64 CPU tensors.
pub(crate) fn scale(grads: &[Tensor], coef: f64) {
    for g in grads {
        let n = g.numel();
        if n == 0 {
            continue;
        }
        // SAFETY: as in `slice`; the tensor is ours to modify (a grad being clipped in place),
        // and no other reference to its memory is alive during the loop.
        unsafe {
            match g.kind() {
                Kind::Float => {
                    let c = coef as f32;
                    std::slice::from_raw_parts_mut(g.data_ptr() as *mut f32, n)
                        .iter_mut()
                        .for_each(|x| *x *= c)
                }
                Kind::Double => std::slice::from_raw_parts_mut(g.data_ptr() as *mut f64, n)
                    .iter_mut()
                    .for_each(|x| *x *= coef),
                _ => unreachable!("total_norm accepted only f32/f64"),
            }
        }
    }
}

/// Whether every element of every tensor is finite (`Σ x·0` is 0 exactly then, and NaN as
/// soon as one element is NaN or ±Inf), or `None` when one cannot take the fast path.
pub(crate) fn all_finite<T: Borrow<Tensor>>(ts: &[T]) -> Option<bool> {
    Some(slices(ts)?.into_iter().all(|s| match s {
        Slice::F32(s) => zero_sum_f32(s) == 0.0,
        Slice::F64(s) => lane_sum(s, |x| x * 0.0) == 0.0,
    }))
}

/// `Σ x·0` in f32 lanes: exact (every term is 0 or NaN), and twice as wide as f64.
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
