//! What a step will do, decided and checked before anything changes: its launches, the state
//! it creates or casts, the grads it converts. Whatever the step would refuse is refused here.

use std::collections::BTreeMap;

use tch::{Kind, TchError, Tensor};

use super::{follow, sparse, FusedOptimizer, State};

/// The parameters of one launch: one fused kernel, or one sparse SGD step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Bucket {
    pub(super) group: usize,
    pub(super) device: String,
    pub(super) kind: String,
    /// Their grads are sparse (SGD's per-parameter step, no state).
    pub(super) sparse: bool,
}

/// A step, planned.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The launches, each with its parameters' indices.
    pub(super) buckets: BTreeMap<Bucket, Vec<usize>>,
    /// The state the step creates (a parameter's first step) or casts (its dtype or device
    /// changed), kept once the step has run.
    pub(super) pending: BTreeMap<usize, State>,
    /// Parameters whose grads are first converted to their dtype and device.
    pub(super) stray_grads: Vec<usize>,
}

impl Plan {
    /// Whether a launch is a sparse SGD step.
    pub(super) fn has_sparse(&self) -> bool {
        self.buckets.keys().any(|b| b.sparse)
    }
}

impl FusedOptimizer {
    /// The plan of a step over `trainable` (parameters without a grad are left alone).
    ///
    /// # Errors
    /// A parameter of a dtype the kernels do not take, a sparse grad this optimizer does not
    /// take, a grad or a state of other sizes than its parameter's.
    pub(super) fn plan(&self, trainable: &[(Tensor, usize)]) -> Result<Plan, TchError> {
        let mut plan = Plan::default();
        for (i, (p, group)) in trainable.iter().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let kind = p.kind();
            if !matches!(
                kind,
                Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
            ) {
                return Err(TchError::Kind(format!(
                    "stepguard::optim: parameter {} is {kind:?}; the fused kernels take f16, \
                     bf16, f32 and f64 parameters",
                    self.name_of(p, i)
                )));
            }
            let sparse = g.is_sparse();
            if sparse {
                sparse::check(self.algo, &self.name_of(p, i))?;
            }
            if g.size() != p.size() {
                return Err(TchError::Shape(format!(
                    "stepguard::optim: the grad of parameter {} is {:?}, the parameter {:?}",
                    self.name_of(p, i),
                    g.size(),
                    p.size()
                )));
            }
            match self.state.get(i).and_then(Option::as_ref) {
                // The sparse step keeps no state; a state of earlier dense steps stays as it is.
                _ if sparse => {}
                Some(s) => {
                    follow::check_sizes(s, p, &self.name_of(p, i))?;
                    if let Some(cast) = follow::follow(s, p)? {
                        plan.pending.insert(i, cast);
                    }
                }
                None => {
                    plan.pending.insert(i, self.new_state(p)?);
                }
            }
            if follow::grad_strays(p) {
                plan.stray_grads.push(i);
            }
            let bucket = Bucket {
                group: *group,
                device: format!("{:?}", p.device()),
                kind: format!("{kind:?}"),
                sparse,
            };
            plan.buckets.entry(bucket).or_default().push(i);
        }
        Ok(plan)
    }

    /// `p`'s name in the `VarStore` (quoted), else its index.
    pub(super) fn name_of(&self, p: &Tensor, index: usize) -> String {
        let v = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = p.data_ptr();
        v.named_variables
            .iter()
            .find(|(_, t)| t.data_ptr() == ptr && t.size() == p.size())
            .map_or_else(|| index.to_string(), |(n, _)| format!("`{n}`"))
    }
}
