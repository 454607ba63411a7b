//! The slow path: what is read, only after a check failed, to name the bad tensors and build
//! the [`Evidence`] that [`diagnose`](crate::diagnose::diagnose) judges. Every read here is
//! beyond the step's one.

use tch::Tensor;

use crate::diagnose::Evidence;
use crate::error::{Check, GuardError};
use crate::flag::read_slots;
use crate::report::{find_non_finite, largest_param, report_tensor, Names, Role, TensorReport};
use crate::sources::{dedup, NameSource};
use crate::state::{GuardState, Observed, Pending};

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
pub(crate) fn read_pending(mut p: Pending) -> Option<GuardError> {
    let mut flag = std::mem::take(&mut p.flag);
    match read_slots(&mut [&mut flag], None) {
        Ok((oks, _)) if oks[0] => return None,
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
        for p in pending {
            if let Some(e) = read_pending(p) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}
