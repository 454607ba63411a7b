//! The step's device-side results, by name: every check folded into a flag, and the values
//! read with them (the norm, the loss scale, the adaptive threshold, the z-scores). They are
//! packed into one small tensor and read with one host read; what comes back has the same
//! names. A new kind of evidence is one field here and one branch in [`super::judge`].

use tch::Tensor;

use tch::Kind;

use crate::flag::{read_slots, EarlyRead, FiniteFlag};

/// One verdict per check, in the order things happen in a step (`T`: a [`FiniteFlag`] on the
/// device, `bool` once read: `true` when finite).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Flags<T> {
    /// The previous update's parameters check, read with this update.
    pub pending: T,
    /// This update's parameters before it.
    pub params_before: T,
    /// The losses and the tensors bound in the forward pass.
    pub forward: T,
    /// The grads (their total norm).
    pub grads: T,
    /// Loss scaling: the grads did not overflow at the scale.
    pub overflow: T,
    /// Spike detection: the loss and the grad norm are within their running statistics.
    pub spike: T,
}

impl<T> Flags<T> {
    /// Every flag, in step order.
    pub(crate) fn each_mut(&mut self) -> [&mut T; 6] {
        [
            &mut self.pending,
            &mut self.params_before,
            &mut self.forward,
            &mut self.grads,
            &mut self.overflow,
            &mut self.spike,
        ]
    }

    fn from_array([pending, params_before, forward, grads, overflow, spike]: [T; 6]) -> Self {
        Flags {
            pending,
            params_before,
            forward,
            grads,
            overflow,
            spike,
        }
    }

    /// The flags of this update (without the previous update's), in step order.
    pub(crate) fn own(self) -> [T; 5] {
        [
            self.params_before,
            self.forward,
            self.grads,
            self.overflow,
            self.spike,
        ]
    }
}

impl<T> Flags<T> {
    /// [`Flags::own`], borrowed.
    pub(crate) fn own_refs(&self) -> [&T; 5] {
        [
            &self.params_before,
            &self.forward,
            &self.grads,
            &self.overflow,
            &self.spike,
        ]
    }
}

impl Flags<bool> {
    /// Everything upstream of the grads is finite: the parameters (after the previous update
    /// and before this one) and the forward pass.
    pub(crate) fn inputs(&self) -> bool {
        self.pending && self.params_before && self.forward
    }

    /// Every check passed.
    pub(crate) fn all(&self) -> bool {
        self.inputs() && self.grads && self.overflow && self.spike
    }

    /// Verdicts of [`Flags::own`] read early, with the previous update's `pending`.
    pub(crate) fn with_pending(pending: bool, own: &[bool]) -> Self {
        let mut f = Flags::from_array([pending, true, true, true, true, true]);
        for (slot, ok) in f.each_mut().into_iter().skip(1).zip(own) {
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
    pub(crate) fn read(mut self) -> Result<Read, String> {
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
        let (oks, read) = read_slots(&mut self.flags.each_mut(), &values.to_read())?;
        let value = |id| values.get(id, &read);
        let first = |id: Option<_>| id.and_then(value).and_then(|v| v.first().copied());
        let mut ok = [true; 6];
        ok.copy_from_slice(&oks);
        Ok(Read {
            ok: Flags::from_array(ok),
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
        EarlyRead::start(self.flags.own().into())
    }
}

/// Values that join a step's read ([`read_slots`]): appended to it, or, for a CPU tensor on
/// the CPU fast path, read in place (not a device sync, not counted).
#[derive(Debug, Default)]
struct StepValues {
    tensors: Vec<Tensor>,
    slots: Vec<Slot>,
    read_len: usize,
}

#[derive(Debug)]
enum Slot {
    InPlace(Vec<f64>),
    Read { start: usize, len: usize },
}

/// A value's place in [`StepValues`].
#[derive(Debug, Clone, Copy)]
struct ValueId(usize);

impl StepValues {
    /// Adds `t` (any shape); its elements come back from [`StepValues::get`].
    fn add(&mut self, t: &Tensor) -> ValueId {
        let id = ValueId(self.slots.len());
        if let Some(view) = crate::host_view::HostView::of(std::slice::from_ref(t)) {
            self.slots.push(Slot::InPlace(view.values()));
            return id;
        }
        if t.device() == tch::Device::Cpu && crate::host_view::fast_path_enabled() {
            if let Ok(v) = t
                .f_to_kind(Kind::Double)
                .and_then(|t| Vec::<f64>::try_from(t.f_reshape([-1])?))
            {
                self.slots.push(Slot::InPlace(v));
                return id;
            }
        }
        let len = t.numel();
        self.slots.push(Slot::Read {
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
        match self.slots.get(id.0)? {
            Slot::InPlace(v) => Some(v.clone()),
            Slot::Read { start, len } => read.get(*start..start + len).map(<[f64]>::to_vec),
        }
    }
}
