//! A device-side "everything finite so far" flag, read with one host sync.

use std::borrow::Borrow;
use tch::{Kind, Tensor};

use crate::sync;

/// Accumulates the finiteness of many tensors on the device and answers with one host read.
///
/// Each folded value contributes `x * 0`, which is `0` for a finite `x` and NaN for NaN or
/// ±Inf; the accumulator is therefore finite exactly when everything folded was. Folding a
/// reduction that is computed anyway (the total gradient norm of clipping) costs one multiply
/// and one add.
#[derive(Debug, Default)]
pub struct FiniteFlag {
    acc: Option<Tensor>,
}

impl FiniteFlag {
    /// An empty flag (finite).
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds a tensor (any shape: a non-scalar is summed first) into the flag. No host read.
    pub fn fold(&mut self, value: &Tensor) {
        let _guard = tch::no_grad_guard();
        let v = value.detach();
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
        let _guard = tch::no_grad_guard();
        let mut device = None;
        let sums: Vec<Tensor> = tensors
            .into_iter()
            .filter(|t| t.borrow().defined())
            .map(|t| {
                let t = t.borrow();
                let d = *device.get_or_insert(t.device());
                let s = t.sum(Kind::Float);
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
    }

    /// Whether anything has been folded since the last read.
    pub fn is_empty(&self) -> bool {
        self.acc.is_none()
    }

    /// The flag as a device tensor (0-dim bool), or `None` if nothing was folded.
    pub fn device_flag(&self) -> Option<Tensor> {
        self.acc.as_ref().map(Tensor::isfinite)
    }

    /// Reads the flag together with `value` (one host read for both). The flag is emptied.
    /// Returns whether everything was finite, and `value`.
    pub fn read_with(&mut self, value: &Tensor) -> (bool, f64) {
        let v = value.detach().to_kind(Kind::Double);
        match self.acc.take() {
            None => {
                let v = sync::read_f64(&v);
                (true, v)
            }
            Some(acc) => {
                let v = if v.device() == acc.device() {
                    v
                } else {
                    v.to_device(acc.device())
                };
                let both = sync::read_f64s(&Tensor::stack(&[acc.to_kind(Kind::Double), v], 0));
                (both[0].is_finite(), both[1])
            }
        }
    }

    /// Reads the flag: one host read when something was folded, none otherwise. The flag is
    /// emptied.
    pub fn read(&mut self) -> bool {
        match self.acc.take() {
            None => true,
            Some(acc) => sync::read_f64(&acc).is_finite(),
        }
    }
}
