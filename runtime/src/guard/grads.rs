//! The grads on the slow path: naming the bad ones, and rescuing a total that overflowed the
//! multi-tensor path's f32 accumulation.

use tch::Tensor;

use super::StepGuard;
use crate::clip::Measured;
use crate::report::{find_non_finite, find_non_finite_at, Names, Role, TensorReport};

impl StepGuard<'_> {
    /// The non-finite grads: named from the per-tensor norms the multi-tensor path kept (only
    /// the suspects are counted), else by a pass over every grad.
    pub(super) fn bad_grads(
        &self,
        measured: Option<&Measured<'_>>,
        params: &[Tensor],
        names: Option<&Names>,
    ) -> Vec<TensorReport> {
        if let Some(suspects) = measured.and_then(Measured::suspects) {
            // The grads were measured in the order of `params` with a defined grad.
            let with_grad: Vec<usize> = (0..params.len())
                .filter(|i| params[*i].grad().defined())
                .collect();
            let at = suspects
                .into_iter()
                .filter_map(|k| with_grad.get(k).copied());
            return find_non_finite_at(params, at, Role::Grad, names);
        }
        find_non_finite(params, Role::Grad, names)
    }

    /// The grads check failed, but every grad is finite and the total came from the
    /// multi-tensor operators (f32 accumulation): recompute it in f64 and, when that is
    /// finite, clip with it and pass the check. Slow path only (two more reads).
    pub(super) fn rescue_overflow(
        &self,
        measured: Option<&Measured<'_>>,
        params: &[Tensor],
        max_norm: Option<f64>,
    ) -> Option<(f64, Tensor)> {
        let exact = measured?.exact(self.config.norm_type)?;
        if !find_non_finite(params, Role::Grad, None).is_empty() {
            return None;
        }
        let n = crate::sync::read_f64s(&exact.reshape([1])).ok()?[0];
        if !n.is_finite() {
            return None;
        }
        if let (Some(m), Some(mx)) = (measured, max_norm) {
            m.clip_with(exact.shallow_clone(), mx);
        }
        Some((n, exact))
    }
}
