//! The guard's side of the verdicts carried by the last gradient bucket
//! ([`crate::dist::fold`]): consensus without a collective of its own.
//!
//! Under data-parallel training the averaged grads are bitwise the same on every rank, and so
//! are the parameters as long as every rank's updates were finite; what differs is each
//! rank's forward pass and loss, and the check of its last update's result (the pending
//! parameters check, which catches a rank whose own update went wrong). The guard keeps a
//! snapshot of those as they are observed; when
//! [`DataParallel::average_gradients`](crate::dist::DataParallel) runs, its last bucket carries
//! every rank's share, and a judgement uses the reduced matrix if it covers it: every
//! observation it judges went into it (none carried from an earlier call, none made since),
//! the pending check it reads is the one the share carried (with none, the share checked the
//! parameters instead of the update), and every parameter its update changes had its grad
//! averaged by the same collective. Otherwise it reduces its verdicts with a collective of its own
//! ([`consensus::agree`](super::consensus)). Both outcomes depend only on the program, so
//! every rank takes the same one.

use std::cell::RefCell;
use std::sync::Arc;

use tch::{Device, Kind, TchError, Tensor};

use super::slot::{Slot, COLS, HAS_LOSS, LOSS};
use crate::dist::fold::Verdicts;
use crate::flag::{found_inf, FiniteFlag};
use crate::state::{Models, Observed, Pending};

/// What the guard has observed since its last update, for the fold.
#[derive(Debug)]
pub(super) struct Offer {
    seen: RefCell<Seen>,
    /// The configuration checks the parameters.
    check_params: bool,
}

#[derive(Debug, Default)]
struct Seen {
    forward: FiniteFlag,
    losses: Vec<Tensor>,
    /// Observations so far (losses and forward bindings).
    observed: usize,
    /// The pending parameters checks of the guard's state, and which they are.
    pending: FiniteFlag,
    pending_ids: Vec<(u64, u64)>,
    /// The share checked the averaged parameters (there was no pending check to read).
    params_checked: bool,
    folded: Option<Folded>,
}

/// What one gradient averaging carried, for the judgement that comes after it.
#[derive(Debug)]
pub(super) struct Folded {
    /// Every rank's share, reduced: `[world, COLS]`.
    pub matrix: Tensor,
    covered: Arc<[usize]>,
    observed: usize,
    pending_ids: Vec<(u64, u64)>,
    params_checked: bool,
}

/// The number of observations in `obs`.
pub(super) fn count(obs: &Observed) -> usize {
    obs.losses.len() + obs.bindings.len()
}

/// Which pending check `p` is: the call that made its update, and the update.
fn id(p: &Pending) -> (u64, u64) {
    (p.origin.call, p.update)
}

impl Folded {
    /// Whether this covers an update that reads the pending check `pending` and checks the
    /// parameters before it when `check_params` (the share then did, on every rank).
    pub(super) fn covers(&self, pending: Option<&Pending>, check_params: bool) -> bool {
        self.pending_ids == pending.map(id).into_iter().collect::<Vec<_>>()
            && (!check_params || self.params_checked)
    }

    /// Whether this covers a loss read (no update: no parameters check to read or make).
    pub(super) fn covers_loss_read(&self) -> bool {
        self.pending_ids.is_empty() && !self.params_checked
    }
}

impl Offer {
    /// An offer; `check_params`: the configuration checks the parameters.
    pub(super) fn new(check_params: bool) -> Self {
        Offer {
            seen: RefCell::default(),
            check_params,
        }
    }

    /// Notes the guard's observations as they stand (after each one).
    pub(super) fn observe(&self, obs: &Observed) {
        let mut s = self.seen.borrow_mut();
        s.forward = obs.flag.snapshot();
        s.losses = obs.losses.iter().map(|l| l.value.shallow_clone()).collect();
        s.observed = count(obs);
    }

    /// Notes the pending parameters checks of the guard's state (at the start, and after each
    /// judgement took its own).
    pub(super) fn note_pending(&self, models: &Models) {
        let mut s = self.seen.borrow_mut();
        let mut flag = FiniteFlag::new();
        s.pending_ids.clear();
        for p in models.pendings().filter(|p| p.early.is_none()) {
            flag.merge(p.flag.snapshot());
            s.pending_ids.push(id(p));
        }
        s.pending = flag;
    }

    /// What was folded for a judgement of `judged` observations (those of this guard and any
    /// carried from earlier calls) about an update of `params` (`None`: a loss read, no
    /// update), when the observations and parameters are covered ([`Folded::covers`] tells
    /// the rest). The offer starts afresh either way.
    pub(super) fn take(&self, judged: usize, params: Option<&[Tensor]>) -> Option<Folded> {
        let folded = {
            let mut s = self.seen.borrow_mut();
            s.forward = FiniteFlag::new();
            s.losses.clear();
            s.observed = 0;
            s.folded.take()?
        };
        let averaged = |p: &Tensor| {
            folded
                .covered
                .binary_search(&(p.data_ptr() as usize))
                .is_ok()
        };
        let covers = folded.observed == judged && params.is_none_or(|ps| ps.iter().all(averaged));
        covers.then_some(folded)
    }
}

impl Verdicts for Offer {
    fn share(
        &self,
        device: Device,
        kind: Kind,
        rank: usize,
        world: usize,
        params: &[Tensor],
    ) -> Tensor {
        let mut s = self.seen.borrow_mut();
        // With no pending check to read, the update checks the parameters before it: the
        // share does instead, so that every rank's verdict travels.
        s.params_checked = self.check_params && s.pending_ids.is_empty();
        let mut checked = FiniteFlag::new();
        if s.params_checked {
            checked.fold_all(params);
        }
        // The slots that can differ between ranks (see `consensus::folded_slots`).
        let flags = [
            (Slot::Pending, &s.pending),
            (Slot::ParamsBefore, &checked),
            (Slot::Forward, &s.forward),
        ];
        let flags: Vec<(usize, &FiniteFlag)> = flags
            .into_iter()
            .filter_map(|(slot, f)| Some((slot.column()?, f)))
            .collect();
        let _guard = tch::no_grad_guard();
        let row = rank * COLS;
        let at = Share {
            device,
            kind,
            row,
            len: world * COLS,
        };
        if let Some(share) = host_share(&flags, &s.losses, at) {
            return share;
        }
        device_share(&flags, &s.losses, at).unwrap_or_else(|_| {
            // libtorch refused (out of memory, say): every verdict of this rank counts as
            // failed, so that every rank skips the update.
            let cols: Vec<usize> = flags.iter().map(|(c, _)| *c).collect();
            failed_share(&cols, at)
        })
    }

    fn agreed(&self, reduced: Tensor, covered: Arc<[usize]>) {
        // Not a matrix of verdicts: nothing folded, the update agrees on its own.
        let Ok(matrix) = reduced.f_view([-1, COLS as i64]) else {
            return;
        };
        let mut s = self.seen.borrow_mut();
        let folded = Folded {
            matrix,
            covered,
            observed: s.observed,
            pending_ids: s.pending_ids.clone(),
            params_checked: s.params_checked,
        };
        s.folded = Some(folded);
    }
}

/// Where this rank's share goes: the bucket's device and dtype, this rank's row (its first
/// column) and the share's length.
#[derive(Debug, Clone, Copy)]
struct Share {
    device: Device,
    kind: Kind,
    row: usize,
    len: usize,
}

/// The share built on the device: a flag that cannot be turned into an indicator counts as
/// failed.
fn device_share(
    flags: &[(usize, &FiniteFlag)],
    losses: &[Tensor],
    at: Share,
) -> Result<Tensor, TchError> {
    let share = Tensor::f_zeros([at.len as i64], (at.kind, at.device))?;
    let cell = |col: usize| share.f_narrow(0, (at.row + col) as i64, 1);
    for (col, flag) in flags {
        let bad = match found_inf(&[flag], at.device) {
            Ok(bad) => bad,
            Err(_) => Tensor::f_ones([], (Kind::Float, at.device))?,
        };
        cell(*col)?.f_copy_(&bad.f_reshape([1])?)?;
    }
    let losses: Vec<&Tensor> = losses.iter().collect();
    if let Some(mean) = crate::values::mean_of(&losses) {
        cell(LOSS)?.f_copy_(&mean.f_to_device(at.device)?.f_reshape([1])?)?;
        let _ = cell(HAS_LOSS)?.f_fill_(1.0)?;
    }
    Ok(share)
}

/// A share whose columns `cols` all say "failed" (made on the host, then moved to `device`;
/// left on the host when even that is refused: the collective then fails, and says why).
fn failed_share(cols: &[usize], at: Share) -> Tensor {
    let mut v = vec![0.0f64; at.len];
    for col in cols {
        v[at.row + col] = 1.0;
    }
    let t = Tensor::from_slice(&v);
    t.f_to_kind(at.kind)
        .and_then(|t| t.f_to_device(at.device))
        .unwrap_or(t)
}

/// The share built on the host, when everything in it is: a CPU bucket, the verdicts known on
/// the host and every loss a CPU scalar (one tensor made, no device work).
fn host_share(flags: &[(usize, &FiniteFlag)], losses: &[Tensor], at: Share) -> Option<Tensor> {
    if at.device != Device::Cpu {
        return None;
    }
    let mut v = vec![0.0f64; at.len];
    for (col, flag) in flags {
        v[at.row + col] = if flag.host_verdict()? { 0.0 } else { 1.0 };
    }
    if !losses.is_empty() {
        let mut sum = 0.0;
        for l in losses {
            if l.device() != Device::Cpu || l.dim() != 0 {
                return None;
            }
            sum += l.f_double_value(&[]).ok()?;
        }
        v[at.row + LOSS] = sum / losses.len() as f64;
        v[at.row + HAS_LOSS] = 1.0;
    }
    match at.kind {
        Kind::Float => Some(Tensor::from_slice(
            &v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        )),
        _ => Tensor::from_slice(&v).f_to_kind(at.kind).ok(),
    }
}
