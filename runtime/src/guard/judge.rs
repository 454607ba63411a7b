//! The one judge of an update's verdicts, shared by the blocking read (`sync = "every_step"`),
//! the deferred verdict read one update late (`sync = "deferred"`) and
//! [`GuardState::flush`]; and the last two of those readers.

use crate::error::TorchError;
use crate::error::{Check, GuardError};
use crate::flag::{read_slots_as, FiniteFlag};
use crate::report::Names;
use crate::state::{names_of, DeferredVerdict, GuardState, Observed, Pending};

use super::explain::{deferred_grads, Subject};
use super::results::Flags;
use super::slot::Slot;

/// What the verdicts of an update say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judgement {
    /// Every check passed.
    Pass,
    /// Loss scaling: the grads overflowed at the scale while everything upstream of them was
    /// finite: an expected skip (or, at `min_scale`, a failure).
    Overflow,
    /// Everything finite, but the loss or the grad norm spiked: skipped like a non-finite step.
    Spike,
    /// Something is non-finite: the slow path names it ([`Subject::explain`]).
    Explain,
}

/// Judges the verdicts read (`true`: finite), in the order things happen in a step.
pub(super) fn judge(ok: &Flags<bool>) -> Judgement {
    if ok.all() {
        Judgement::Pass
    } else if !ok[Slot::Overflow] && ok.inputs() {
        Judgement::Overflow
    } else if !ok[Slot::Spike] && ok.inputs() && ok[Slot::Grads] && ok[Slot::Overflow] {
        Judgement::Spike
    } else {
        Judgement::Explain
    }
}

/// Whether a read counts as a blocking host read (`false`: values computed an update ago,
/// `sync = "deferred"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    Counted,
    Deferred,
}

/// Reads a pending parameters check on its own and explains it: `None` when it passed (or
/// the parameters it is about are finite again).
pub(crate) fn read_pending(p: &mut Pending, wait: Wait) -> Option<GuardError> {
    let read = match p.early.take() {
        Some(early) => early.finish().map(|oks| oks[0]),
        None => read_slots_as(&mut [&mut p.flag], &[], wait == Wait::Counted).map(|r| r.0[0]),
    };
    let ok = match read {
        Ok(ok) => Flags::with_pending(ok, &[]),
        Err(message) => return Some(p.origin.device_error(message, p.update)),
    };
    match judge(&ok) {
        Judgement::Pass => None,
        _ => pending_subject(p, &Observed::default()).explain(&ok, Vec::new, Vec::new),
    }
}

fn pending_subject<'a>(p: &'a Pending, obs: &'a Observed) -> Subject<'a> {
    Subject {
        origin: p.origin,
        update: p.update,
        pending: Some(p),
        params: &[],
        obs,
        names: None,
        protected: None,
        max_norm: None,
        grad_norm: None,
    }
}

/// The verdict of an update's parameters check, read without waiting (`true` when there is
/// none).
fn pending_verdict(p: Option<&mut Pending>) -> Result<bool, TorchError> {
    let Some(p) = p else { return Ok(true) };
    match p.early.take() {
        Some(early) => Ok(early.finish()?[0]),
        None => Ok(read_slots_as(&mut [&mut p.flag], &[], false)?.0[0]),
    }
}

/// Reads and explains an update's deferred verdict (`sync = "deferred"`) together with that
/// update's parameters check (`pending`), one read that is not a wait: `None` when all was
/// finite. The step was skipped on the device when the verdict says so; this names why.
/// Grads are named from the per-tensor norms kept on the device (their NaN/Inf counts are then
/// lower bounds: 1 means "at least one"), since the grads themselves have been replaced by the
/// next backward.
pub(crate) fn judge_deferred(d: DeferredVerdict, pending: Option<Pending>) -> Option<GuardError> {
    let mut pending = pending;
    let read = pending_verdict(pending.as_mut())
        .and_then(|p| Ok(Flags::with_pending(p, &d.early.finish()?)));
    let ok = match read {
        Ok(ok) => ok,
        Err(message) => return Some(d.origin.device_error(message, d.update)),
    };
    let names = || names_of(&d.vars);
    let error = |check, tensors, diagnosis| d.origin.error(check, tensors, diagnosis, d.update);
    match judge(&ok) {
        Judgement::Pass => None,
        Judgement::Overflow if d.scale.is_some() => {
            let (scale, ls) = d.scale.as_ref()?;
            let s = scale
                .f_reshape([1])
                .and_then(|s| crate::sync::read_f64s_deferred(&s))
                .map_or(f64::NAN, |v| v[0]);
            let diagnosis = ls.after_overflow(s);
            let tensors = match diagnosis {
                crate::Diagnosis::Overflow { .. } => Vec::new(),
                _ => deferred_grads(&d.params, d.grad_norms.as_ref(), &names()),
            };
            Some(error(Check::Grads, tensors, diagnosis))
        }
        Judgement::Spike if d.spike.is_some() => {
            // Finite, but a spike: skipped on the device; its z-scores, computed a step ago.
            let (z, sigmas) = d.spike.as_ref()?;
            let z = crate::sync::read_f64s_deferred(z).unwrap_or_default();
            let z = [
                z.first().copied().unwrap_or(f64::NAN),
                z.get(1).copied().unwrap_or(f64::NAN),
            ];
            Some(error(
                Check::Spike,
                Vec::new(),
                crate::spike::diagnosis(z, *sigmas),
            ))
        }
        _ => {
            // With a process group: a failure seen only on other ranks is named so; one seen
            // here too is explained from this rank's tensors, naming every rank it was seen on.
            let ranks = d.ranks.as_ref().and_then(|(m, me, folded)| {
                let values = crate::sync::read_f64s_deferred(&m.f_reshape([-1]).ok()?).ok()?;
                super::consensus::Ranks::new(&values, *me, folded.then_some(&ok))
            });
            if let Some((check, diagnosis, on)) = ranks.as_ref().and_then(|r| r.elsewhere()) {
                let mut e = error(check, Vec::new(), diagnosis);
                e.ranks = on;
                return Some(e);
            }
            let seen = ranks.and_then(|r| r.first_failure()).map(|(_, on)| on);
            let names: Names = names();
            let subject = Subject {
                origin: d.origin,
                update: d.update,
                pending: pending.as_ref(),
                params: &d.params,
                obs: &d.obs,
                names: Some(&names),
                protected: d.protected,
                max_norm: d.max_norm,
                grad_norm: None,
            };
            subject
                .explain(
                    &ok,
                    || {
                        crate::report::find_non_finite(
                            &d.params,
                            crate::report::Role::Param,
                            Some(&names),
                        )
                    },
                    || deferred_grads(&d.params, d.grad_norms.as_ref(), &names),
                )
                .map(|mut e| {
                    e.ranks = seen.unwrap_or_default();
                    e
                })
        }
    }
}

impl GuardState {
    /// Reads every pending parameters check now (one host read per pending update, none when
    /// nothing is pending). A step's `Ok` does not cover its own update yet: that check is
    /// read with the next update, or here. Call it before a checkpoint and at the end of
    /// training.
    ///
    /// A failed check stays for the next call of its parameters, which acts on it (skip,
    /// rollback, error) as it would have without the flush, naming the same update.
    ///
    /// # Errors
    /// The first update that made parameters non-finite, named.
    pub fn flush(&self) -> Result<(), GuardError> {
        let pending = self.take_pending();
        let mut first = None;
        for (key, p, d) in pending {
            let e = match (d, p) {
                (Some(d), p) => judge_deferred(d, p),
                (None, Some(mut p)) => {
                    let e = read_pending(&mut p, Wait::Counted);
                    if e.as_ref().is_some_and(|e| !e.is_overflow()) {
                        // Read: its verdict is known on the host now.
                        let mut failed = FiniteFlag::new();
                        failed.fold_host(false);
                        p.flag = failed;
                        p.early = None;
                        self.lock().put_back_pending(key, p);
                    }
                    e
                }
                (None, None) => None,
            };
            match e {
                // An overflow under loss scaling: skipped on the device, as expected.
                Some(e) if e.is_overflow() => {
                    if let Some(s) = self.lock().scaler.as_mut() {
                        s.overflows += 1;
                    }
                }
                Some(e) => {
                    first.get_or_insert(e);
                }
                None => {}
            }
        }
        first.map_or(Ok(()), Err)
    }
}
