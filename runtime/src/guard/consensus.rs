//! Consensus across the ranks of a [`ProcessGroup`]: every rank makes the same decision.
//!
//! Before the step's one read, each rank packs its verdicts (0/1 indicators, never raw values)
//! and its mean loss into its own row of a `[world_size x COLS]` tensor, zeros elsewhere, and
//! the tensor is summed over the ranks with one all-reduce on the device. Every rank then holds
//! every rank's row, bitwise the same: the verdicts become "failed on some rank", the loss of
//! the statistics the mean over the ranks, and the matrix joins the read, so that an error
//! names the rank(s) where the bad tensor was seen. Summing rows that are zero but on one rank
//! is exact, and carries a NaN loss (Gloo's `Max` would drop it).

use crate::error::TorchError;
use tch::{Device, Kind, TchError, Tensor};

use super::results::{Flags, StepResults};
use super::slot::{Slot, COLS, HAS_LOSS, LOSS};
use super::StepGuard;
use crate::dist::{ProcessGroup, ReduceOp};
use crate::error::Check;
use crate::flag::{found_inf, FiniteFlag};
use crate::state::Observed;

impl<'a> StepGuard<'a> {
    /// Makes every decision of this step the same on every rank of `group` (data-parallel
    /// training, the grads averaged before the update): before the one read, the verdicts of
    /// every rank and their losses are summed across the ranks on the device, so that a NaN or
    /// a spike seen on one rank skips (or fails) the update on all of them, and spike
    /// statistics, the loss scale, rollback and escalation stay identical everywhere. An error
    /// names the rank(s) where the bad tensor was seen ([`GuardError::ranks`](crate::GuardError::ranks)); the tensor
    /// itself is named only by those ranks' errors. Every rank must call
    /// [`StepGuard::before_update`] (or [`StepGuard::decide`]) for the same updates. A world of
    /// one without c10d changes nothing.
    ///
    /// The verdicts ride on the all-reduce of the last f32/f64 bucket of
    /// [`DataParallel::average_gradients`](crate::dist::DataParallel::average_gradients) on the
    /// same group, called after the losses were given to the guard: no collective of their
    /// own. Where they cannot (a loss carried from an earlier call or given after the
    /// averaging, a parameter the averaging does not cover, the grads averaged another way),
    /// the update reduces them with one small all-reduce of its own; every rank takes the same
    /// way. Under `sync = "deferred"` the reduced verdict is what the fused kernel skips on, on
    /// every rank; a loss read at once (a function with no update) is reduced the same way
    /// before its read.
    pub fn with_group(mut self, group: &'a crate::dist::ProcessGroup) -> Self {
        self.set_group(group);
        self
    }

    /// [`StepGuard::with_group`] in place.
    pub(crate) fn set_group(&mut self, group: &'a crate::dist::ProcessGroup) {
        // A world of one without c10d has nothing to agree on.
        if group.id().is_none() {
            self.ranks = None;
            return;
        }
        // What the gradients' last bucket carries (`DataParallel` on the same group); an
        // earlier offer is withdrawn first.
        self.ranks = Some(Agreement { group, offer: None });
        let offer = std::rc::Rc::new(super::offer::Offer::new(self.config.checks.params));
        offer.observe(&self.obs);
        offer.note_pending(&self.state.lock());
        let verdicts: std::rc::Rc<dyn crate::dist::fold::Verdicts> = offer.clone();
        let offered = crate::dist::fold::offer(group, verdicts).map(|o| (offer, o));
        self.ranks = Some(Agreement {
            group,
            offer: offered,
        });
    }

    /// The process group whose ranks take the same decisions (more than one rank).
    pub(super) fn group(&self) -> Option<&'a ProcessGroup> {
        self.ranks.as_ref().map(|r| r.group)
    }

    /// Every rank's verdicts folded so far into `results` (see [`agree`]): the matrix the
    /// gradients' last bucket carried (`folded`), or one all-reduce now on `device` (else the
    /// loss's, else the CPU), which also makes `found_inf` (loss scaling's overflow) "on some
    /// rank". `Ok(None)` without a group; else the mean of the ranks' losses.
    pub(super) fn agree_ranks(
        &self,
        results: &mut StepResults,
        folded: Option<Tensor>,
        obs: &Observed,
        device: Option<Device>,
        found_inf: Option<&mut Tensor>,
    ) -> Result<Option<Agreed>, TorchError> {
        let Some(group) = self.group() else {
            return Ok(None);
        };
        if let Some(matrix) = folded {
            // The grads are the same on every rank: so is their overflow.
            let loss = adopt_folded(results, matrix, !obs.losses.is_empty())?;
            return Ok(Some(Agreed { loss, folded: true }));
        }
        let local = obs.mean_loss();
        let device = device
            .or(local.as_ref().map(Tensor::device))
            .unwrap_or(Device::Cpu);
        let loss = agree(group, results, local.as_ref(), device)?;
        if let (Some(f), Some(m)) = (found_inf, results.values.ranks.as_ref()) {
            // The scale backs off on every rank when the grads overflowed on one.
            *f = overflow_any(m)?;
        }
        Ok(Some(Agreed {
            loss,
            folded: false,
        }))
    }

    /// The verdicts folded into the gradients' last bucket for a judgement of `judged`
    /// observations about an update of `params` (`None`: a loss read), when they cover them.
    ///
    /// The offer notes the state's pending checks again: an update does so while it takes its
    /// state ([`StepGuard::start_update`]); a loss read (`params`: `None`) here.
    pub(super) fn take_folded(
        &self,
        judged: usize,
        params: Option<&[Tensor]>,
    ) -> Option<super::offer::Folded> {
        let offer = self.offer()?;
        let folded = offer.take(judged, params);
        if params.is_none() {
            offer.note_pending(&self.state.lock());
        }
        folded
    }

    /// The offer to the gradients' last bucket, while it is offered.
    pub(super) fn offer(&self) -> Option<&super::offer::Offer> {
        self.ranks.as_ref()?.offer.as_ref().map(|o| &*o.0)
    }

    /// Keeps the offer to the gradients' last bucket up to date (after each observation).
    pub(super) fn offer_observed(&self) {
        if let Some((offer, _)) = self.ranks.as_ref().and_then(|r| r.offer.as_ref()) {
            offer.observe(&self.obs);
        }
    }
}

/// The ranks of a process group taking the same decisions, and what this guard offers the
/// gradients' last bucket of that group while it is offered.
pub(super) struct Agreement<'a> {
    group: &'a ProcessGroup,
    offer: Option<(std::rc::Rc<super::offer::Offer>, crate::dist::fold::Offered)>,
}

/// What the ranks agreed for one judgement ([`StepGuard::agree_ranks`]).
pub(super) struct Agreed {
    /// The mean of the ranks' losses, when this rank has one.
    pub loss: Option<Tensor>,
    /// The verdicts came folded into the gradients' last bucket.
    pub folded: bool,
}

/// Packs this rank's verdicts and `loss` (0-dim, the mean of its losses) into its row, reduces
/// the matrix, and replaces the first five flags of `results` by "failed on some rank". The
/// matrix joins the read (`results.values.ranks`). Returns the mean of the ranks' losses (when
/// this rank has one). No host read; one collective.
fn agree(
    group: &ProcessGroup,
    results: &mut StepResults,
    loss: Option<&Tensor>,
    device: Device,
) -> Result<Option<Tensor>, TorchError> {
    let _guard = tch::no_grad_guard();
    let (w, rank) = (group.world_size() as i64, group.rank() as i64);
    let row = (|| -> Result<Tensor, TchError> {
        let mut row = Vec::with_capacity(COLS);
        for slot in Slot::SHARED {
            // A flag that cannot be turned into an indicator counts as failed: the collective
            // must happen on every rank whatever this one met.
            let bad = found_inf(&[&results.flags[slot]], device)
                .or_else(|_| Tensor::f_ones([], (Kind::Float, device)))?;
            row.push(bad.f_to_kind(Kind::Double)?.f_reshape([1])?);
        }
        let (value, has) = match loss {
            // A loss that cannot be converted counts as NaN, for the same reason.
            Some(l) => (
                l.f_to_kind(Kind::Double)
                    .and_then(|l| l.f_to_device(device))
                    .and_then(|l| l.f_reshape([1]))
                    .or_else(|_| Tensor::f_from_slice(&[f64::NAN])?.f_to_device(device))?,
                1.0,
            ),
            None => (Tensor::f_zeros([1], (Kind::Double, device))?, 0.0),
        };
        row.push(value);
        row.push(Tensor::f_from_slice(&[has])?.f_to_device(device)?);
        Tensor::f_cat(&row, 0)
    })()?;
    let matrix = Tensor::f_zeros([w, COLS as i64], (Kind::Double, device))?;
    matrix.f_get(rank)?.f_copy_(&row)?;
    group
        .all_reduce(&matrix, ReduceOp::Sum)
        .map_err(|e| TorchError::new(e.to_string()))?;
    Ok(adopt(results, matrix, &Slot::SHARED, loss.is_some())?)
}

/// The reduced `matrix` (every rank's row) adopted by `results`: the flags of `slots` become
/// "failed on some rank", the matrix joins the read. Returns the mean of the ranks' losses
/// when this rank `has_loss`.
fn adopt(
    results: &mut StepResults,
    matrix: Tensor,
    slots: &[Slot],
    has_loss: bool,
) -> Result<Option<Tensor>, TchError> {
    let columns = slots.iter().filter_map(|s| Some((*s, s.column()?)));
    // On the CPU fast path: read in place, no operator.
    let view = crate::host_view::HostView::of(std::slice::from_ref(&matrix));
    if let Some(values) = view.map(|v| v.values()) {
        let rows: Vec<&[f64]> = values.chunks(COLS).collect();
        for (slot, col) in columns {
            let flag = &mut results.flags[slot];
            *flag = FiniteFlag::new();
            flag.fold_host(rows.iter().all(|r| r[col] == 0.0));
        }
        let mean = has_loss.then(|| {
            let sum: f64 = rows.iter().map(|r| r[LOSS]).sum();
            let n: f64 = rows.iter().map(|r| r[HAS_LOSS]).sum();
            Tensor::from(sum / n.max(1.0))
        });
        results.values.ranks = Some(matrix);
        return Ok(mean);
    }
    let _guard = tch::no_grad_guard();
    let any = matrix.f_amax([0i64].as_slice(), false)?;
    for (slot, col) in columns {
        results.flags[slot] = FiniteFlag::of_indicator(&any.f_get(col as i64)?);
    }
    let mean = if has_loss {
        let sum = matrix.f_select(1, LOSS as i64)?.f_sum(Kind::Double)?;
        let n = matrix.f_select(1, HAS_LOSS as i64)?.f_sum(Kind::Double)?;
        Some(sum.f_div(&n.f_clamp_min(1.0)?)?)
    } else {
        None
    };
    results.values.ranks = Some(matrix);
    Ok(mean)
}

/// The slots whose verdicts the gradients' last bucket carries: those that can differ between
/// ranks (the averaged grads, and so their overflow, are the same on every rank).
fn folded_slots() -> Vec<Slot> {
    Slot::SHARED
        .into_iter()
        .filter(|s| !s.replicated())
        .collect()
}

/// [`adopt`] for the matrix folded into the gradients' last bucket (see [`folded_slots`]).
fn adopt_folded(
    results: &mut StepResults,
    matrix: Tensor,
    has_loss: bool,
) -> Result<Option<Tensor>, TchError> {
    adopt(results, matrix, &folded_slots(), has_loss)
}

/// `found_inf` (0-dim f32) of the reduced matrix: 1 when the grads overflowed on some rank.
fn overflow_any(matrix: &Tensor) -> Result<Tensor, TchError> {
    let _guard = tch::no_grad_guard();
    let col = Slot::Overflow.column().unwrap_or(0) as i64;
    matrix
        .f_select(1, col)?
        .f_amax([0i64].as_slice(), false)?
        .f_to_kind(Kind::Float)
}

/// The matrix as read: every rank's verdicts and loss.
#[derive(Debug, Clone)]
pub(super) struct Ranks {
    rows: Vec<[f64; COLS]>,
    /// This process's rank.
    pub me: usize,
}

impl Ranks {
    /// The matrix read back (`values`: its elements, row by row). `replicated`: this rank's
    /// verdicts (`true`: finite) when the matrix was folded into the gradients' last bucket;
    /// the checks it left out, the same on every rank, are then filled in from them.
    pub(super) fn new(
        values: &[f64],
        me: usize,
        replicated: Option<&Flags<bool>>,
    ) -> Option<Ranks> {
        if values.is_empty() || values.len() % COLS != 0 {
            return None;
        }
        let mut rows: Vec<[f64; COLS]> = values
            .chunks(COLS)
            .map(|c| {
                let mut r = [0.0; COLS];
                r.copy_from_slice(c);
                r
            })
            .collect();
        if let Some(ok) = replicated {
            for r in &mut rows {
                for slot in Slot::SHARED.into_iter().filter(|s| s.replicated()) {
                    if let Some(col) = slot.column() {
                        r[col] = if ok[slot] { 0.0 } else { 1.0 };
                    }
                }
            }
        }
        Some(Ranks { rows, me })
    }

    /// This rank's own verdicts (`true`: finite), with `spike` as judged for all.
    pub(super) fn own(&self, spike: bool) -> Flags<bool> {
        let mut ok = Flags::PASS;
        for (col, slot) in Slot::SHARED.into_iter().enumerate() {
            ok[slot] = self.ok(self.me, col);
        }
        ok[Slot::Spike] = spike;
        ok
    }

    fn ok(&self, rank: usize, col: usize) -> bool {
        self.rows[rank][col] == 0.0
    }

    /// The first check in step order that failed on some rank, with the ranks it failed on.
    pub(super) fn first_failure(&self) -> Option<(Slot, Vec<usize>)> {
        Slot::SHARED
            .into_iter()
            .enumerate()
            .find_map(|(col, slot)| {
                let ranks: Vec<usize> =
                    (0..self.rows.len()).filter(|r| !self.ok(*r, col)).collect();
                (!ranks.is_empty()).then_some((slot, ranks))
            })
    }

    /// The failure to report when the first check that failed did so only on other ranks:
    /// the check, and the diagnosis naming them; `None` when it failed here too (this rank's
    /// own error then names the tensor) or nowhere.
    pub(super) fn elsewhere(&self) -> Option<(Check, crate::Diagnosis, Vec<usize>)> {
        let (slot, on) = self.first_failure()?;
        if on.contains(&self.me) {
            return None;
        }
        let row = &self.rows[on[0]];
        let loss = (row[HAS_LOSS] > 0.0).then_some(row[LOSS]);
        let (check, what) = slot.failure(loss);
        let ranks = on.clone();
        Some((check, crate::Diagnosis::OtherRank { ranks, what }, on))
    }
}
