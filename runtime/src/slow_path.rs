//! The slow path: what is read, only after a check failed, to name the bad tensors and build
//! the [`Evidence`] that [`diagnose`](crate::diagnose::diagnose) judges. Every read here is
//! beyond the step's one.

use tch::Tensor;

use crate::diagnose::diagnose;
use crate::diagnose::Evidence;
use crate::error::{Check, GuardError};
use crate::flag::{read_slots, read_slots_deferred};
use crate::report::{find_non_finite, largest_param, report_tensor, Names, Role, TensorReport};
use crate::sources::{dedup, NameSource};
use crate::state::{DeferredVerdict, GuardState, Observed, Pending};

/// The parameters a failed pending check is about that are non-finite now (`None`: none is;
/// the model was replaced or reloaded since, and there is nothing to report).
pub(crate) fn bad_update(p: &Pending) -> Option<Vec<TensorReport>> {
    let names = p.names();
    let bad = find_non_finite(&p.params, Role::Param, Some(&names));
    (!bad.is_empty()).then_some(bad)
}

/// Non-finite parameters: the step's own and every variable of the named `VarStore`s.
pub(crate) fn scan_params(
    params: &[Tensor],
    src: Option<&dyn NameSource>,
    names: Option<&Names>,
) -> Vec<TensorReport> {
    let extra = src.map(|s| s.extra_params()).unwrap_or_default();
    let scan = dedup(params.iter().map(Tensor::shallow_clone).chain(extra));
    find_non_finite(&scan, Role::Param, names)
}

/// The first non-finite binding and loss (named with its line, and its micro-batch when the
/// losses span several calls), and the largest parameter.
pub(crate) fn forward(
    obs: &Observed,
    call: u64,
    params: &[Tensor],
    names: Option<&Names>,
    evidence: &mut Evidence,
) {
    evidence.binding = obs.bindings.iter().find_map(|b| {
        report_tensor(
            &format!("`{}` (line {}, {})", b.name, b.line, b.kind),
            &b.value,
        )
    });
    let first_call = obs.losses.first().map_or(call, |l| l.call);
    let several_calls = obs.losses.iter().any(|l| l.call != first_call);
    evidence.loss = obs.losses.iter().find_map(|l| {
        let mut name = "loss".to_string();
        if !l.expr.is_empty() {
            name = format!("loss `{}`", l.expr);
        }
        let mut at = Vec::new();
        if l.line > 0 {
            at.push(format!("line {}", l.line));
        }
        if several_calls {
            at.push(format!(
                "micro-batch {} of call {}",
                l.call - first_call,
                l.call
            ));
        }
        if !at.is_empty() {
            name = format!("{name} ({})", at.join(", "));
        }
        report_tensor(&name, &l.value)
    });
    if evidence.binding.is_some() || evidence.loss.is_some() {
        evidence.largest_param = largest_param(params, names);
    }
}

/// Reads a pending parameters check on its own (for [`GuardState::flush`]).
pub(crate) fn read_pending(p: Pending) -> Option<GuardError> {
    read_pending_as(p, true)
}

/// [`read_pending`] without counting the read (`sync = "deferred"`).
pub(crate) fn read_pending_deferred(p: Pending) -> Option<GuardError> {
    read_pending_as(p, false)
}

fn read_pending_as(mut p: Pending, counted: bool) -> Option<GuardError> {
    let mut flag = std::mem::take(&mut p.flag);
    let read = match p.early.take() {
        Some(early) => early.finish(),
        None if counted => read_slots(&mut [&mut flag], &[]).map(|(oks, _)| oks),
        None => read_slots_deferred(&mut [&mut flag]),
    };
    match read {
        Ok(oks) if oks[0] => return None,
        Ok(_) => {}
        Err(message) => {
            return Some(GuardError {
                check: Check::Device,
                step: p.update,
                call: p.call,
                function: p.function,
                location: p.location,
                tensors: Vec::new(),
                diagnosis: crate::Diagnosis::Device { message },
                grad_norm: None,
                consecutive_skips: None,
            })
        }
    }
    let bad = bad_update(&p)?;
    Some(GuardError {
        check: Check::Params,
        step: p.update,
        call: p.call,
        function: p.function,
        location: p.location,
        tensors: bad,
        diagnosis: crate::Diagnosis::Update,
        grad_norm: None,
        consecutive_skips: None,
    })
}

impl GuardState {
    /// Reads every pending parameters check now (one host read per pending update, none when
    /// nothing is pending). A step's `Ok` does not cover its own update yet: that check is
    /// read with the next update, or here. Call it before a checkpoint and at the end of
    /// training.
    ///
    /// # Errors
    /// The first update that made parameters non-finite, named.
    pub fn flush(&self) -> Result<(), GuardError> {
        let pending = self.take_pending();
        let mut first = None;
        for (p, d) in pending {
            let e = match d {
                Some(d) => judge_deferred(d, p),
                None => p.and_then(read_pending),
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

/// Reads and explains an update's deferred verdict (`sync = "deferred"`) together with that
/// update's parameters check (`pending`), one read that is not a wait: `None` when all was
/// finite. The step was skipped on the device when the verdict says so; this names why.
/// Grads are named from the per-tensor norms kept on the device (their NaN/Inf counts are then
/// lower bounds: 1 means "at least one"), since the grads themselves have been replaced by the
/// next backward.
pub(crate) fn judge_deferred(d: DeferredVerdict, pending: Option<Pending>) -> Option<GuardError> {
    let DeferredVerdict {
        early,
        obs,
        update,
        call,
        function,
        location,
        params,
        vars,
        grad_norms,
        protected,
        max_norm,
        scale,
        spike,
    } = d;
    let mut pending = pending;
    let error = |check, tensors, diagnosis, step| GuardError {
        check,
        step,
        call,
        function,
        location,
        tensors,
        diagnosis,
        grad_norm: None,
        consecutive_skips: None,
    };
    let read = pending_verdict(pending.as_mut()).and_then(|p| {
        let mut oks = vec![p];
        oks.extend(early.finish()?);
        Ok(oks)
    });
    let oks = match read {
        Ok(oks) if oks.iter().all(|ok| *ok) => return None,
        Ok(oks) => oks,
        Err(message) => {
            let d = crate::Diagnosis::Device { message };
            return Some(error(Check::Device, Vec::new(), d, update));
        }
    };
    let names = || {
        let mut names = Names::default();
        for v in vars.iter().filter_map(std::sync::Weak::upgrade) {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            names.extend(Names::from_pairs(
                v.named_variables
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone())),
            ));
        }
        names
    };
    if let Some((scale, ls)) = scale {
        if !oks[4] && oks[..3] == [true; 3] {
            // Loss scaling: the grads overflowed at the scale (the kernel skipped the update).
            let s = crate::sync::read_f64s_deferred(&scale.reshape([1])).map_or(f64::NAN, |v| v[0]);
            if s > ls.min_scale {
                let next = (s * ls.backoff_factor).max(ls.min_scale);
                let d = crate::Diagnosis::Overflow { scale: s, next };
                return Some(error(Check::Grads, Vec::new(), d, update));
            }
            let tensors = deferred_grads(&params, grad_norms.as_ref(), &names());
            let d = crate::Diagnosis::ScaleExhausted { scale: s };
            return Some(error(Check::Grads, tensors, d, update));
        }
    }
    if let Some((z, sigmas)) = spike {
        if !oks[5] && oks[..5] == [true; 5] {
            // Finite, but a spike: skipped on the device; its z-scores, computed a step ago.
            let z = crate::sync::read_f64s_deferred(&z).unwrap_or_default();
            let z = [
                z.first().copied().unwrap_or(f64::NAN),
                z.get(1).copied().unwrap_or(f64::NAN),
            ];
            let d = crate::guard::spike_diagnosis(z, sigmas);
            return Some(error(Check::Spike, Vec::new(), d, update));
        }
    }
    let names = names();
    let mut evidence = Evidence {
        bad_update: match (&pending, oks[0]) {
            (Some(p), false) => bad_update(p).map(|bad| (p.update, bad)),
            _ => None,
        },
        protected,
        max_norm,
        ..Evidence::default()
    };
    if evidence.bad_update.is_none() {
        evidence.params_before = find_non_finite(&params, Role::Param, Some(&names));
    }
    if !oks[2] {
        forward(&obs, call, &params, Some(&names), &mut evidence);
    }
    if !oks[3] {
        evidence.grads = Some(deferred_grads(&params, grad_norms.as_ref(), &names));
    }
    let f = diagnose(evidence)?;
    Some(error(
        f.check,
        f.tensors,
        f.diagnosis,
        f.earlier_update.unwrap_or(update),
    ))
}

/// The verdict of an update's parameters check, read without waiting (`true` when there is
/// none).
fn pending_verdict(p: Option<&mut Pending>) -> Result<bool, String> {
    let Some(p) = p else { return Ok(true) };
    match p.early.take() {
        Some(early) => Ok(early.finish()?[0]),
        None => Ok(read_slots_deferred(&mut [&mut p.flag])?[0]),
    }
}

/// Bad grads of an earlier step, from its per-tensor norms (the grads are gone).
fn deferred_grads(params: &[Tensor], norms: Option<&Tensor>, names: &Names) -> Vec<TensorReport> {
    let Some(values) = norms.and_then(|n| crate::sync::read_f64s_deferred(n).ok()) else {
        return Vec::new();
    };
    let with_grad: Vec<usize> = (0..params.len())
        .filter(|i| params[*i].grad().defined())
        .collect();
    values
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_finite())
        .filter_map(|(k, n)| {
            let i = *with_grad.get(k)?;
            let p = &params[i];
            Some(TensorReport {
                name: format!("grad of {}", Names::name_or_index(Some(names), p, i)),
                nan: i64::from(n.is_nan()),
                inf: i64::from(n.is_infinite()),
                numel: p.numel() as i64,
                shape: p.size(),
            })
        })
        .collect()
}
