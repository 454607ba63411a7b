//! The slow path: what is read, only after a check failed, to name the bad tensors and build
//! the [`Evidence`] that [`diagnose`] judges. Every read here is beyond the step's one.

use tch::Tensor;

use crate::clip::Measured;
use crate::diagnose::{diagnose, Evidence};
use crate::error::{GuardError, Origin};
use crate::norm::NormType;
use crate::report::{
    find_non_finite, find_non_finite_at, largest_param, report_tensor, Names, Role, TensorReport,
};
use crate::sources::{dedup, NameSource};
use crate::state::{Observed, Pending};

use super::results::Flags;
use super::slot::Slot;

/// What the slow path may look at for one update.
pub(super) struct Subject<'a> {
    pub origin: Origin,
    /// The update's index.
    pub update: u64,
    /// The previous update's parameters check.
    pub pending: Option<&'a Pending>,
    pub params: &'a [Tensor],
    pub obs: &'a Observed,
    pub names: Option<&'a Names>,
    pub protected: Option<bool>,
    pub max_norm: Option<f64>,
    pub grad_norm: Option<f64>,
}

impl Subject<'_> {
    /// Names what failed (`ok`: the verdicts read) and diagnoses it; `None` when every element
    /// is finite after all (a false alarm). `params_before`: the parameters found non-finite
    /// before the update; `bad_grads`: the non-finite grads.
    pub(super) fn explain(
        &self,
        ok: &Flags<bool>,
        params_before: impl FnOnce() -> Vec<TensorReport>,
        bad_grads: impl FnOnce() -> Vec<TensorReport>,
    ) -> Option<GuardError> {
        let bad_update = match (self.pending, ok[Slot::Pending]) {
            (Some(p), false) => bad_update(p).map(|bad| (p.update, bad)),
            _ => None,
        };
        let mut evidence = Evidence {
            bad_update,
            protected: self.protected,
            grad_norm: self.grad_norm,
            max_norm: self.max_norm,
            ..Evidence::default()
        };
        // Corrupted parameters (of this update, or of any model the step names) explain
        // whatever failed downstream of them.
        if evidence.bad_update.is_none() {
            evidence.params_before = params_before();
        }
        if !ok[Slot::Forward] {
            forward(
                self.obs,
                self.origin.call,
                self.params,
                self.names,
                &mut evidence,
            );
        }
        if !ok[Slot::Grads] {
            evidence.grads = Some(bad_grads());
        }
        let f = diagnose(evidence)?;
        let mut e = self.origin.error(
            f.check,
            f.tensors,
            f.diagnosis,
            f.earlier_update.unwrap_or(self.update),
        );
        e.grad_norm = self.grad_norm;
        Some(e)
    }
}

/// The parameters a failed pending check is about that are non-finite now (`None`: none is;
/// the model was replaced or reloaded since, and there is nothing to report).
pub(super) fn bad_update(p: &Pending) -> Option<Vec<TensorReport>> {
    let names = p.names();
    let bad = find_non_finite(&p.params, Role::Param, Some(&names));
    (!bad.is_empty()).then_some(bad)
}

/// Non-finite parameters: the step's own and every variable of the named `VarStore`s.
pub(super) fn scan_params(
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
pub(super) fn forward(
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

/// The indices of `params` with a defined grad, in order (the grads were measured so).
fn with_grad(params: &[Tensor]) -> Vec<usize> {
    (0..params.len())
        .filter(|i| params[*i].grad().defined())
        .collect()
}

/// The non-finite grads: named from the per-tensor norms the multi-tensor path kept (only the
/// suspects are counted), else by a pass over every grad.
pub(super) fn bad_grads(
    measured: Option<&Measured<'_>>,
    params: &[Tensor],
    names: Option<&Names>,
) -> Vec<TensorReport> {
    if let Some(suspects) = measured.and_then(Measured::suspects) {
        let with_grad = with_grad(params);
        let at = suspects
            .into_iter()
            .filter_map(|k| with_grad.get(k).copied());
        return find_non_finite_at(params, at, Role::Grad, names);
    }
    find_non_finite(params, Role::Grad, names)
}

/// Bad grads of an earlier update, from its per-tensor norms (the grads are gone); their
/// NaN/Inf counts are lower bounds (1 means "at least one").
pub(super) fn deferred_grads(
    params: &[Tensor],
    norms: Option<&Tensor>,
    names: &Names,
) -> Vec<TensorReport> {
    let Some(values) = norms.and_then(|n| crate::sync::read_f64s_deferred(n).ok()) else {
        return Vec::new();
    };
    let with_grad = with_grad(params);
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

/// The grads check failed, but every grad is finite and the total came from the multi-tensor
/// operators (f32 accumulation): recompute it in f64 and, when that is finite, clip with it
/// and pass the check. Slow path only (two more reads).
pub(super) fn rescue_overflow(
    measured: Option<&Measured<'_>>,
    params: &[Tensor],
    norm_type: NormType,
    max_norm: Option<f64>,
) -> Option<(f64, Tensor)> {
    let exact = measured?.exact(norm_type)?;
    if !find_non_finite(params, Role::Grad, None).is_empty() {
        return None;
    }
    let n = crate::sync::read_f64s(&exact.f_reshape([1]).ok()?).ok()?[0];
    if !n.is_finite() {
        return None;
    }
    if let (Some(m), Some(mx)) = (measured, max_norm) {
        m.clip_with(exact.shallow_clone(), mx).ok()?;
    }
    Some((n, exact))
}
