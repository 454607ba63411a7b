//! From evidence to a diagnosis: a pure function, run only on the slow path.

use crate::error::{Check, Diagnosis};
use crate::report::TensorReport;

/// Above this magnitude finite parameters count as diverged when the loss is non-finite.
pub(crate) const DIVERGED_ABS: f64 = 1e10;

/// What the slow path found, in the order the checks happened.
#[derive(Debug, Default)]
pub(crate) struct Evidence {
    /// The previous update's parameters check failed, and these parameters are non-finite
    /// now: that update (its index) made them so.
    pub bad_update: Option<(u64, Vec<TensorReport>)>,
    /// Parameters already non-finite before this update (corrupted between calls).
    pub params_before: Vec<TensorReport>,
    /// The first non-finite tensor bound by `let` (the `forward` check).
    pub binding: Option<TensorReport>,
    /// The first non-finite loss.
    pub loss: Option<TensorReport>,
    /// The largest parameter, looked up only when the loss or a binding failed.
    pub largest_param: Option<(String, f64)>,
    /// Whether protection of `/` and log was on (`None`: the body has no such operation).
    pub protected: Option<bool>,
    /// Non-finite grads, when the grads check failed.
    pub grads: Option<Vec<TensorReport>>,
    /// The total grad norm read back, if any.
    pub grad_norm: Option<f64>,
    /// The `max_norm` of this update, if it clipped.
    pub max_norm: Option<f64>,
}

/// The verdict of the slow path.
#[derive(Debug)]
pub(crate) struct Finding {
    pub check: Check,
    pub tensors: Vec<TensorReport>,
    pub diagnosis: Diagnosis,
    /// The update it concerns, when it is an earlier one than the current.
    pub earlier_update: Option<u64>,
}

/// The likely cause, following the order in which things happen in a step: a bad earlier
/// update, parameters corrupted between calls, the forward pass, the backward pass. `None`
/// when every element is finite after all (a sum overflowed): a false alarm.
pub(crate) fn diagnose(e: Evidence) -> Option<Finding> {
    let found = |check, tensors, diagnosis| Finding {
        check,
        tensors,
        diagnosis,
        earlier_update: None,
    };
    if let Some((update, tensors)) = e.bad_update {
        return Some(Finding {
            check: Check::Params,
            tensors,
            diagnosis: Diagnosis::Update,
            earlier_update: Some(update),
        });
    }
    if !e.params_before.is_empty() {
        return Some(found(
            Check::Params,
            e.params_before,
            Diagnosis::CorruptedBefore,
        ));
    }
    let forward = match (e.binding, e.loss) {
        (Some(b), _) => Some((Check::Forward, b)),
        (None, Some(l)) => Some((Check::Loss, l)),
        (None, None) => None,
    };
    if let Some((check, report)) = forward {
        let diagnosis = match e.largest_param {
            Some((param, max_abs)) if max_abs > DIVERGED_ABS => {
                Diagnosis::Diverged { param, max_abs }
            }
            _ => Diagnosis::Forward {
                protected: e.protected,
            },
        };
        return Some(found(check, vec![report], diagnosis));
    }
    let grads = e.grads?;
    let overflow = grads.is_empty();
    if !overflow || e.grad_norm.is_some_and(|n| !n.is_finite()) {
        let d = Diagnosis::ExplodingGradients {
            max_norm: e.max_norm,
            norm_overflow: overflow,
        };
        return Some(found(Check::Grads, grads, d));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str) -> TensorReport {
        TensorReport {
            name: name.into(),
            nan: 1,
            inf: 0,
            numel: 4,
            shape: vec![4],
        }
    }

    #[test]
    fn an_earlier_bad_update_comes_before_everything_else() {
        let f = diagnose(Evidence {
            bad_update: Some((7, vec![report("w")])),
            loss: Some(report("loss")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (f.check, f.diagnosis, f.earlier_update),
            (Check::Params, Diagnosis::Update, Some(7))
        );
    }

    #[test]
    fn corruption_between_calls_is_not_blamed_on_an_update() {
        let f = diagnose(Evidence {
            params_before: vec![report("w")],
            loss: Some(report("loss")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(f.diagnosis, Diagnosis::CorruptedBefore);
        assert_eq!(f.earlier_update, None);
    }

    #[test]
    fn a_loss_with_huge_parameters_is_divergence_else_the_forward_pass() {
        let diverged = diagnose(Evidence {
            loss: Some(report("loss")),
            largest_param: Some(("w".into(), 1e12)),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(diverged.diagnosis, Diagnosis::Diverged { .. }));
        let forward = diagnose(Evidence {
            loss: Some(report("loss")),
            largest_param: Some(("w".into(), 3.0)),
            protected: None,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(forward.diagnosis, Diagnosis::Forward { protected: None });
    }

    #[test]
    fn finite_grads_with_a_finite_norm_are_a_false_alarm() {
        assert!(diagnose(Evidence {
            grads: Some(vec![]),
            grad_norm: Some(3.0),
            ..Default::default()
        })
        .is_none());
        let overflow = diagnose(Evidence {
            grads: Some(vec![]),
            grad_norm: Some(f64::INFINITY),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(
            overflow.diagnosis,
            Diagnosis::ExplodingGradients {
                norm_overflow: true,
                ..
            }
        ));
    }
}
