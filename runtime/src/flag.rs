//! A device-side "everything finite so far" flag, read with one host sync.

use std::borrow::Borrow;
use tch::{Kind, Tensor};

use crate::{fused, sync};

/// Accumulates the finiteness of many tensors on the device and answers with one host read.
///
/// Each folded value contributes `x * 0`, which is `0` for a finite `x` and NaN for NaN or
/// ±Inf; the accumulator is therefore finite exactly when everything folded was. Folding a
/// reduction that is computed anyway (the total gradient norm of clipping) costs one multiply
/// and one add.
///
/// Contiguous f32/f64 CPU tensors are checked in place by a loop over their memory (see the
/// `fused` module): their part of the flag lives on the host and costs no read.
#[derive(Debug)]
pub struct FiniteFlag {
    acc: Option<Tensor>,
    host_ok: bool,
    host_folded: bool,
}

impl Default for FiniteFlag {
    fn default() -> Self {
        FiniteFlag {
            acc: None,
            host_ok: true,
            host_folded: false,
        }
    }
}

impl FiniteFlag {
    /// An empty flag (finite).
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds a finiteness already known on the host.
    pub fn fold_host(&mut self, finite: bool) {
        self.host_ok &= finite;
        self.host_folded = true;
    }

    /// Folds a tensor (any shape: a non-scalar is summed first) into the flag. No host read.
    pub fn fold(&mut self, value: &Tensor) {
        if let Some(ok) = fused::all_finite(std::slice::from_ref(value)) {
            return self.fold_host(ok);
        }
        let _guard = tch::no_grad_guard();
        let v = crate::clip::values_of(&value.detach());
        let v = if v.dim() == 0 { v } else { v.sum(v.kind()) };
        let term = v.to_kind(Kind::Float) * 0.0;
        self.acc = Some(match self.acc.take() {
            None => term,
            Some(acc) => {
                let term = if term.device() == acc.device() {
                    term
                } else {
                    term.to_device(acc.device())
                };
                acc + term
            }
        });
    }

    /// Folds the finiteness of every tensor of `tensors` (one sum per tensor on its device,
    /// then one fold). Undefined tensors are skipped. No host read.
    pub fn fold_all<T: Borrow<Tensor>>(&mut self, tensors: impl IntoIterator<Item = T>) {
        let tensors: Vec<T> = tensors
            .into_iter()
            .filter(|t| t.borrow().defined())
            .collect();
        if let Some(ok) = fused::all_finite(&tensors) {
            return self.fold_host(ok);
        }
        let _guard = tch::no_grad_guard();
        let mut device = None;
        let sums: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                let t = t.borrow();
                let d = *device.get_or_insert(t.device());
                let s = crate::clip::values_of(t).sum(Kind::Float);
                if s.device() == d {
                    s
                } else {
                    s.to_device(d)
                }
            })
            .collect();
        if !sums.is_empty() {
            self.fold(&Tensor::stack(&sums, 0).sum(Kind::Float));
        }
    }

    /// Folds another flag into this one.
    pub fn merge(&mut self, other: FiniteFlag) {
        if let Some(t) = other.acc {
            self.fold(&t);
        }
        if other.host_folded {
            self.fold_host(other.host_ok);
        }
    }

    /// Whether nothing has been folded since the last read.
    pub fn is_empty(&self) -> bool {
        self.acc.is_none() && !self.host_folded
    }

    /// Whether part of the flag is on a device (reading it costs a host read).
    pub fn has_device_part(&self) -> bool {
        self.acc.is_some()
    }

    /// Reads the flag together with `value` (one host read for both). The flag is emptied.
    /// Returns whether everything was finite, and `value`.
    pub fn read_with(&mut self, value: &Tensor) -> (bool, f64) {
        let FiniteFlag { acc, host_ok, .. } = std::mem::take(self);
        let v = value.detach().to_kind(Kind::Double);
        match acc {
            None => (host_ok, sync::read_f64(&v)),
            Some(acc) => {
                let v = if v.device() == acc.device() {
                    v
                } else {
                    v.to_device(acc.device())
                };
                let both = sync::read_f64s(&Tensor::stack(&[acc.to_kind(Kind::Double), v], 0));
                (host_ok && both[0].is_finite(), both[1])
            }
        }
    }

    /// Reads the flag: one host read when something was folded, none otherwise. The flag is
    /// emptied.
    pub fn read(&mut self) -> bool {
        let FiniteFlag { acc, host_ok, .. } = std::mem::take(self);
        match acc {
            None => host_ok,
            Some(acc) => host_ok && sync::read_f64(&acc).is_finite(),
        }
    }
}

/// Reads several flags and, optionally, a value with one host read (none when every flag is
/// on the host and there is no value). The flags are emptied. Returns each flag's verdict
/// (`true`: finite) and the value.
pub(crate) fn read_slots(
    flags: &mut [&mut FiniteFlag],
    value: Option<&Tensor>,
) -> (Vec<bool>, Option<f64>) {
    let taken: Vec<FiniteFlag> = flags.iter_mut().map(|f| std::mem::take(&mut **f)).collect();
    let mut oks: Vec<bool> = taken.iter().map(|f| f.host_ok).collect();
    let mut device_parts: Vec<(usize, Tensor)> = Vec::new();
    for (i, f) in taken.into_iter().enumerate() {
        if let Some(acc) = f.acc {
            device_parts.push((i, acc));
        }
    }
    if device_parts.is_empty() && value.is_none() {
        return (oks, None);
    }
    let _guard = tch::no_grad_guard();
    let device = device_parts
        .first()
        .map(|(_, t)| t.device())
        .or(value.map(Tensor::device))
        .unwrap_or(tch::Device::Cpu);
    let mut parts: Vec<Tensor> = device_parts
        .iter()
        .map(|(_, t)| t.to_kind(Kind::Double).to_device(device).reshape([1]))
        .collect();
    if let Some(v) = value {
        parts.push(
            v.detach()
                .to_kind(Kind::Double)
                .to_device(device)
                .reshape([1]),
        );
    }
    let read = if parts.len() == 1 {
        vec![sync::read_f64(&parts[0])]
    } else {
        sync::read_f64s(&Tensor::cat(&parts, 0))
    };
    for (k, (i, _)) in device_parts.iter().enumerate() {
        oks[*i] &= read[k].is_finite();
    }
    (oks, value.map(|_| read[read.len() - 1]))
}
