//! A device-side "everything finite so far" flag, read with one host sync.

use crate::error::TorchError;
use std::borrow::Borrow;
use tch::{Kind, TchError, Tensor};

use crate::host_view::HostView;
use crate::sync;
use crate::values::real_values_of;

/// Accumulates the finiteness of many tensors on the device and answers with one host read.
///
/// Each folded value contributes `x * 0`, which is `0` for a finite `x` and NaN for NaN or
/// ±Inf; the accumulator is therefore finite exactly when everything folded was. Folding a
/// reduction that is computed anyway (the total gradient norm of clipping) costs one multiply
/// and one add.
///
/// Contiguous f32/f64 CPU tensors are checked in place by a loop over their memory (see the
/// `host_view` module): their part of the flag lives on the host and costs no read. An error
/// libtorch raises while folding is kept and reported by the read, never a panic.
#[doc(hidden)]
#[derive(Debug)]
pub struct FiniteFlag {
    acc: Option<Tensor>,
    host_ok: bool,
    host_folded: bool,
    error: Option<TorchError>,
}

impl Default for FiniteFlag {
    fn default() -> Self {
        FiniteFlag {
            acc: None,
            host_ok: true,
            host_folded: false,
            error: None,
        }
    }
}

impl FiniteFlag {
    /// An empty flag (finite).
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag that fails when the 0-dim `indicator` (a `found_inf`, a spike) is > 0, folded on
    /// the device: `1 / (1 - min(indicator, 1))` is 1 or +inf.
    pub(crate) fn of_indicator(indicator: &Tensor) -> FiniteFlag {
        let mut flag = FiniteFlag::new();
        let term = (|| {
            let _guard = tch::no_grad_guard();
            indicator
                .f_to_kind(Kind::Float)?
                .f_clamp_max(1.0)?
                .f_neg()?
                .f_add_scalar(1.0)?
                .f_reciprocal()
        })();
        match term {
            Ok(t) => flag.fold(&t),
            Err(e) => flag.fold_error(e),
        }
        flag
    }

    /// Folds a finiteness already known on the host.
    pub fn fold_host(&mut self, finite: bool) {
        self.host_ok &= finite;
        self.host_folded = true;
    }

    /// Keeps an error met while computing what to fold; the read reports it.
    fn fold_error(&mut self, e: TchError) {
        self.host_folded = true;
        self.error.get_or_insert_with(|| e.into());
    }

    /// Folds a tensor (any shape: a non-scalar is summed first) into the flag. No host read.
    pub fn fold(&mut self, value: &Tensor) {
        if let Some(finite) = HostView::all_finite_of(std::slice::from_ref(value)) {
            return self.fold_host(finite);
        }
        if let Err(e) = self.try_fold(value) {
            self.fold_error(e);
        }
    }

    fn try_fold(&mut self, value: &Tensor) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let v = real_values_of(&value.f_detach()?)?;
        let v = if v.dim() == 0 { v } else { v.f_sum(v.kind())? };
        let term = v.f_to_kind(Kind::Float)?.f_mul_scalar(0.0)?;
        self.acc = Some(match self.acc.take() {
            None => term,
            Some(acc) => acc.f_add(&term.f_to_device(acc.device())?)?,
        });
        Ok(())
    }

    /// Folds the finiteness of every tensor of `tensors` (one sum per tensor on its device,
    /// then one fold). Undefined tensors are skipped. No host read.
    pub fn fold_all<T: Borrow<Tensor>>(&mut self, tensors: &[T]) {
        // The CPU fast path skips the undefined ones itself (one call into the shim).
        if let Some(finite) = HostView::all_finite_of(tensors) {
            return self.fold_host(finite);
        }
        let tensors: Vec<&Tensor> = tensors
            .iter()
            .map(Borrow::borrow)
            .filter(|t| t.defined())
            .collect();
        let owned: Vec<Tensor> = tensors.iter().map(|t| t.shallow_clone()).collect();
        if crate::shim::takes(&owned) {
            // The L2 norm per tensor with the multi-tensor operator: NaN or Inf when a tensor
            // holds one (or, for finite values past ~1e19, an overflow that the slow path then
            // finds to be a false alarm). Not max |x|: ATen's CPU inf-norm is ~30x slower.
            if let Ok(norms) = crate::shim::foreach_norms(&owned, 2.0) {
                return self.fold(&norms);
            }
        }
        let sums = (|| -> Result<Option<Tensor>, TchError> {
            let _guard = tch::no_grad_guard();
            let mut device = None;
            let mut sums = Vec::with_capacity(tensors.len());
            for t in &tensors {
                let d = *device.get_or_insert(t.device());
                sums.push(real_values_of(t)?.f_sum(Kind::Float)?.f_to_device(d)?);
            }
            if sums.is_empty() {
                return Ok(None);
            }
            Ok(Some(Tensor::f_stack(&sums, 0)?.f_sum(Kind::Float)?))
        })();
        match sums {
            Ok(Some(s)) => self.fold(&s),
            Ok(None) => {}
            Err(e) => self.fold_error(e),
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
        if let Some(e) = other.error {
            self.error.get_or_insert(e);
        }
    }

    /// Whether nothing has been folded since the last read.
    pub fn is_empty(&self) -> bool {
        self.acc.is_none() && !self.host_folded
    }

    /// A copy of the flag as it stands (its device part shared, not copied).
    pub(crate) fn snapshot(&self) -> FiniteFlag {
        FiniteFlag {
            acc: self.acc.as_ref().map(Tensor::shallow_clone),
            host_ok: self.host_ok,
            host_folded: self.host_folded,
            error: self.error.clone(),
        }
    }

    /// The verdict when it is known on the host (nothing on a device, no error).
    pub(crate) fn host_verdict(&self) -> Option<bool> {
        (self.acc.is_none() && self.error.is_none()).then_some(self.host_ok)
    }

    /// Whether part of the flag is on a device (reading it costs a host read).
    pub fn has_device_part(&self) -> bool {
        self.acc.is_some()
    }

    /// Reads the flag: one host read when something was folded on a device, none otherwise.
    /// The flag is emptied.
    ///
    /// # Errors
    /// What libtorch reported while folding or reading (a device error surfacing here).
    pub fn read(&mut self) -> Result<bool, TorchError> {
        read_slots(&mut [self], &[]).map(|(oks, _)| oks[0])
    }
}

/// Reads several flags and values (their elements, in order) with one host read (none when every flag is
/// on the host and there is no value). The flags are emptied. Returns each flag's verdict
/// (`true`: finite) and the values.
///
/// # Errors
/// The first error libtorch raised while folding, or at the read (an asynchronous device error
/// surfaces at the first sync).
pub(crate) fn read_slots(
    flags: &mut [&mut FiniteFlag],
    values: &[&Tensor],
) -> Result<(Vec<bool>, Vec<f64>), TorchError> {
    read_slots_as(flags, values, true)
}

/// The verdict of several flags as a 0-dim f32 tensor on `device`: 1 when one of them saw a
/// non-finite value, else 0; computed on the device, no host read (`found_inf` of the fused
/// optimizers).
pub(crate) fn found_inf(flags: &[&FiniteFlag], device: tch::Device) -> Result<Tensor, TorchError> {
    if let Some(e) = flags.iter().find_map(|f| f.error.clone()) {
        return Err(e);
    }
    let host_bad = flags.iter().any(|f| !f.host_ok);
    let r = (|| -> Result<Tensor, TchError> {
        let _guard = tch::no_grad_guard();
        let mut acc = Tensor::zeros([], (Kind::Float, device));
        for f in flags {
            if let Some(a) = &f.acc {
                acc = acc.f_add(&a.f_to_kind(Kind::Float)?.f_to_device(device)?)?;
            }
        }
        let bad = acc.f_isfinite()?.f_logical_not()?.f_to_kind(Kind::Float)?;
        if host_bad {
            return bad.f_clamp_min(1.0);
        }
        Ok(bad)
    })();
    r.map_err(TorchError::from)
}

/// Every flag's verdict (`true`: finite) when all of them were folded on the host, with no
/// error: nothing to read. The flags are emptied then; `None` (nothing taken) otherwise.
pub(crate) fn host_verdicts<const N: usize>(flags: &mut [&mut FiniteFlag; N]) -> Option<[bool; N]> {
    all_on_host(flags).then(|| flags.each_mut().map(|f| take_host_verdict(f)))
}

/// Every flag folded on the host, with no error: nothing to read.
fn all_on_host(flags: &[&mut FiniteFlag]) -> bool {
    flags.iter().all(|f| f.acc.is_none() && f.error.is_none())
}

/// A host-folded flag's verdict; the flag is emptied.
fn take_host_verdict(f: &mut FiniteFlag) -> bool {
    std::mem::take(f).host_ok
}

/// [`read_slots`]; `counted: false` for a verdict of an earlier step (`sync = "deferred"`),
/// not counted as a blocking host read, since the values were computed a step ago.
pub(crate) fn read_slots_as(
    flags: &mut [&mut FiniteFlag],
    values: &[&Tensor],
    counted: bool,
) -> Result<(Vec<bool>, Vec<f64>), TorchError> {
    // Everything on the host (the CPU fast path): the verdicts as they are, nothing to read.
    if values.is_empty() && all_on_host(flags) {
        let oks = flags.iter_mut().map(|f| take_host_verdict(f)).collect();
        return Ok((oks, Vec::new()));
    }
    let taken: Vec<FiniteFlag> = flags.iter_mut().map(|f| std::mem::take(&mut **f)).collect();
    if let Some(e) = taken.iter().find_map(|f| f.error.clone()) {
        return Err(e);
    }
    let mut oks: Vec<bool> = taken.iter().map(|f| f.host_ok).collect();
    let device_parts: Vec<(usize, Tensor)> = taken
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| f.acc.map(|a| (i, a)))
        .collect();
    if device_parts.is_empty() && values.is_empty() {
        return Ok((oks, Vec::new()));
    }
    let read = (|| -> Result<Vec<f64>, TchError> {
        let _guard = tch::no_grad_guard();
        let device = device_parts
            .first()
            .map(|(_, t)| t.device())
            .or(values.first().map(|v| v.device()))
            .unwrap_or(tch::Device::Cpu);
        let mut parts = Vec::with_capacity(device_parts.len() + values.len());
        for (_, t) in &device_parts {
            parts.push(
                t.f_to_kind(Kind::Double)?
                    .f_to_device(device)?
                    .f_reshape([1])?,
            );
        }
        for v in values {
            parts.push(
                v.detach()
                    .f_to_kind(Kind::Double)?
                    .f_to_device(device)?
                    .f_reshape([-1])?,
            );
        }
        let all = Tensor::f_cat(&parts, 0)?;
        if counted {
            sync::read_f64s(&all)
        } else {
            sync::read_f64s_deferred(&all)
        }
    })()
    .map_err(TorchError::from)?;
    for (k, (i, _)) in device_parts.iter().enumerate() {
        oks[*i] &= read[k].is_finite();
    }
    let tail = read[device_parts.len()..].to_vec();
    Ok((oks, tail))
}

/// Flags on their way to the host (`sync = "deferred"`): their device parts copied without
/// blocking (to pinned memory, with an event, on a GPU), read later by [`EarlyRead::finish`].
#[derive(Debug)]
pub(crate) struct EarlyRead {
    host_oks: Vec<bool>,
    /// For each flag, the index of its value in the copy, if it has a device part.
    slots: Vec<Option<usize>>,
    copy: Option<crate::shim::HostCopy>,
    error: Option<TorchError>,
}

impl EarlyRead {
    /// Starts reading `flags` (no host read now).
    pub(crate) fn start(flags: Vec<FiniteFlag>) -> EarlyRead {
        let mut error = flags.iter().find_map(|f| f.error.clone());
        let host_oks = flags.iter().map(|f| f.host_ok).collect();
        let mut slots = Vec::with_capacity(flags.len());
        let mut parts = Vec::new();
        for f in flags {
            match f.acc {
                Some(a) => {
                    slots.push(Some(parts.len()));
                    parts.push(a);
                }
                None => slots.push(None),
            }
        }
        let mut copy = None;
        if error.is_none() && !parts.is_empty() {
            let start = (|| -> Result<crate::shim::HostCopy, TorchError> {
                let _guard = tch::no_grad_guard();
                let device = parts[0].device();
                let mut all = Vec::with_capacity(parts.len());
                for p in &parts {
                    let p = p
                        .f_to_kind(Kind::Double)
                        .and_then(|p| p.f_to_device(device));
                    all.push(p.and_then(|p| p.f_reshape([1])).map_err(TorchError::from)?);
                }
                let all = Tensor::f_cat(&all, 0).map_err(TorchError::from)?;
                crate::shim::HostCopy::start(&all)
            })();
            match start {
                Ok(c) => copy = Some(c),
                Err(e) => error = Some(e),
            }
        }
        EarlyRead {
            host_oks,
            slots,
            copy,
            error,
        }
    }

    /// The verdict of each flag (`true`: finite).
    ///
    /// # Errors
    /// An error libtorch raised while folding, or while copying.
    pub(crate) fn finish(self) -> Result<Vec<bool>, TorchError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let values = match self.copy {
            Some(c) => c.finish()?,
            None => Vec::new(),
        };
        Ok(self
            .host_oks
            .iter()
            .zip(&self.slots)
            .map(|(ok, slot)| *ok && slot.is_none_or(|i| values[i].is_finite()))
            .collect())
    }
}
