//! The step's device-side results, by name: every check folded into a flag, and the values
//! read with them (the norm, the loss scale, the adaptive threshold, the z-scores). They are
//! packed into one small tensor and read with one host read; what comes back has the same
//! names. The flags are indexed by [`Slot`], the one list of the step's verdicts.

use crate::error::TorchError;
use std::ops::{Index, IndexMut};

use tch::{Kind, Tensor};

use super::slot::Slot;
use crate::flag::{host_verdicts, read_slots, EarlyRead, FiniteFlag};

/// One verdict per [`Slot`] (`T`: a [`FiniteFlag`] on the device, `bool` once read: `true`
/// when finite), indexed by slot.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Flags<T>([T; Slot::ALL.len()]);

impl<T> Index<Slot> for Flags<T> {
    type Output = T;
    fn index(&self, slot: Slot) -> &T {
        &self.0[slot.index()]
    }
}

impl<T> IndexMut<Slot> for Flags<T> {
    fn index_mut(&mut self, slot: Slot) -> &mut T {
        &mut self.0[slot.index()]
    }
}

impl<T> Flags<T> {
    /// Every flag, in step order.
    pub(crate) fn each_mut(&mut self) -> [&mut T; Slot::ALL.len()] {
        self.0.each_mut()
    }

    /// The flags of this update (all but the previous update's), in step order.
    pub(crate) fn own(self) -> Vec<T> {
        self.0.into_iter().skip(1).collect()
    }

    /// [`Flags::own`], borrowed.
    pub(crate) fn own_refs(&self) -> Vec<&T> {
        self.0.iter().skip(1).collect()
    }
}

impl Flags<bool> {
    /// Every verdict finite.
    pub(crate) const PASS: Flags<bool> = Flags([true; Slot::ALL.len()]);

    /// Everything upstream of the grads is finite: the parameters (after the previous update
    /// and before this one) and the forward pass.
    pub(crate) fn inputs(&self) -> bool {
        self[Slot::Pending] && self[Slot::ParamsBefore] && self[Slot::Forward]
    }

    /// Every check passed.
    pub(crate) fn all(&self) -> bool {
        self.0.iter().all(|ok| *ok)
    }

    /// Verdicts of [`Flags::own`] read early, with the previous update's `pending`.
    pub(crate) fn with_pending(pending: bool, own: &[bool]) -> Self {
        let mut f = Flags::PASS;
        f[Slot::Pending] = pending;
        for (slot, ok) in f.0.iter_mut().skip(1).zip(own) {
            *slot = *ok;
        }
        f
    }
}

/// The values read with the flags (device tensors, or read in place on the CPU fast path).
#[derive(Debug, Default)]
pub(crate) struct Values<T> {
    /// The total grad norm (before clipping).
    pub norm: Option<T>,
    /// The loss scale the grads were unscaled by.
    pub scale: Option<T>,
    /// The adaptive clipping threshold.
    pub threshold: Option<T>,
    /// The z-scores `[loss, norm]` of spike detection.
    pub z: Option<T>,
    /// With a process group: every rank's verdicts and loss (see [`super::consensus`]).
    pub ranks: Option<T>,
}

/// Everything the step computed on the device for its one read.
#[derive(Debug, Default)]
pub(crate) struct StepResults {
    pub flags: Flags<FiniteFlag>,
    pub values: Values<Tensor>,
}

/// What the read brought back, by name.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub ok: Flags<bool>,
    pub norm: Option<f64>,
    pub scale: Option<f64>,
    pub threshold: Option<f64>,
    /// `[loss z, norm z]`, NaN where not measured.
    pub z: [f64; 2],
    /// The elements of [`Values::ranks`], row by row (empty without a process group).
    pub ranks: Vec<f64>,
}

impl StepResults {
    /// Reads every flag and value with one host read (none when all of it is on the host).
    /// The norm joins only a read that happens anyway.
    pub(crate) fn read(mut self) -> Result<Read, TorchError> {
        let empty = self.flags.each_mut().iter().all(|f| f.is_empty());
        let mut values = StepValues::default();
        let Values {
            norm,
            scale,
            threshold,
            z,
            ranks,
        } = &self.values;
        let norm = norm.as_ref().filter(|_| !empty).map(|n| values.add(n));
        let scale = scale.as_ref().map(|s| values.add(s));
        let threshold = threshold.as_ref().map(|t| values.add(t));
        let z = z.as_ref().map(|z| values.add(z));
        let ranks = ranks.as_ref().map(|r| values.add(r));
        let to_read = values.to_read();
        let host = match to_read.is_empty() {
            true => host_verdicts(&mut self.flags.each_mut()),
            false => None,
        };
        let (oks, read) = match host {
            Some(oks) => (oks, Vec::new()),
            None => {
                let (v, read) = read_slots(&mut self.flags.each_mut(), &to_read)?;
                let mut oks = [true; Slot::ALL.len()];
                oks.iter_mut().zip(v).for_each(|(o, v)| *o = v);
                (oks, read)
            }
        };
        let value = |id| values.get(id, &read);
        let first = |id: Option<_>| id.and_then(value).and_then(|v| v.first().copied());
        let mut ok = Flags::PASS;
        for (slot, v) in ok.0.iter_mut().zip(oks) {
            *slot = v;
        }
        Ok(Read {
            ok,
            norm: first(norm),
            scale: first(scale),
            threshold: first(threshold),
            z: match z.and_then(value) {
                Some(v) if v.len() == 2 => [v[0], v[1]],
                _ => [f64::NAN; 2],
            },
            ranks: ranks.and_then(value).unwrap_or_default(),
        })
    }

    /// Starts reading this update's own flags without waiting (`sync = "deferred"`).
    pub(crate) fn start_early(self) -> EarlyRead {
        EarlyRead::start(self.flags.own())
    }
}

/// Values that join a step's read ([`read_slots`]): appended to it, or, for a CPU tensor on
/// the CPU fast path, read in place (not a device sync, not counted).
#[derive(Debug, Default)]
struct StepValues {
    tensors: Vec<Tensor>,
    places: Vec<Place>,
    read_len: usize,
}

#[derive(Debug)]
enum Place {
    InPlace(Vec<f64>),
    Read { start: usize, len: usize },
}

/// A value's place in [`StepValues`].
#[derive(Debug, Clone, Copy)]
struct ValueId(usize);

impl StepValues {
    /// Adds `t` (any shape); its elements come back from [`StepValues::get`].
    fn add(&mut self, t: &Tensor) -> ValueId {
        let id = ValueId(self.places.len());
        if let Some(view) = crate::host_view::HostView::of(std::slice::from_ref(t)) {
            self.places.push(Place::InPlace(view.values()));
            return id;
        }
        if t.device() == tch::Device::Cpu && crate::host_view::fast_path_enabled() {
            if let Ok(v) = t
                .f_to_kind(Kind::Double)
                .and_then(|t| Vec::<f64>::try_from(t.f_reshape([-1])?))
            {
                self.places.push(Place::InPlace(v));
                return id;
            }
        }
        let len = t.numel();
        self.places.push(Place::Read {
            start: self.read_len,
            len,
        });
        self.read_len += len;
        self.tensors.push(t.shallow_clone());
        id
    }

    /// The tensors to append to the read.
    fn to_read(&self) -> Vec<&Tensor> {
        self.tensors.iter().collect()
    }

    /// The elements of a value, from `read` (what [`read_slots`] returned for these values).
    fn get(&self, id: ValueId, read: &[f64]) -> Option<Vec<f64>> {
        match self.places.get(id.0)? {
            Place::InPlace(v) => Some(v.clone()),
            Place::Read { start, len } => read.get(*start..start + len).map(<[f64]>::to_vec),
        }
    }
}
