//! `DataParallel`: a `VarStore` kept identical on every rank, its gradients averaged in buckets.

use std::collections::HashMap;
use std::sync::Arc;

use tch::nn::VarStore;
use tch::Tensor;

use super::bucket::{self, Bucket, DEFAULT_BUCKET_BYTES};
use super::error::{self, DistError};
use super::fold::{self, Verdicts};
use super::{ffi, ProcessGroup, ReduceOp};

/// `(name, tensor)` sorted by name: the same order on every rank, whatever the map's.
pub(crate) fn by_name(vars: HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vars.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Data-parallel training of the variables of one `VarStore`, as PyTorch's
/// `DistributedDataParallel`: at construction every parameter and buffer is replaced by rank
/// 0's; after each backward, [`DataParallel::average_gradients`] replaces every gradient by its
/// mean over the ranks, one all-reduce per bucket (at most [`DEFAULT_BUCKET_BYTES`] of one device
/// and dtype). With a world of one, both are no-ops.
///
/// Inside a step guarded with the same group (`#[guarded_step(group = ..)]`,
/// [`StepGuard::with_group`](crate::StepGuard::with_group)), the last f32 or f64 bucket also
/// carries the guard's verdicts of every rank, so that the ranks' consensus costs no
/// collective of its own.
#[derive(Debug)]
pub struct DataParallel {
    group: ProcessGroup,
    names: Vec<String>,
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
    /// The parameters' data pointers, sorted: what the guard checks its update against.
    covered: Arc<[usize]>,
}

impl DataParallel {
    /// Broadcasts the variables of `vs` from rank 0 and plans the gradient buckets of its
    /// trainable variables.
    pub fn new(group: &ProcessGroup, vs: &VarStore) -> Result<Self, DistError> {
        Self::with_bucket_bytes(group, vs, DEFAULT_BUCKET_BYTES)
    }

    /// As [`DataParallel::new`], with buckets of at most `bucket_bytes`.
    pub fn with_bucket_bytes(
        group: &ProcessGroup,
        vs: &VarStore,
        bucket_bytes: usize,
    ) -> Result<Self, DistError> {
        group.broadcast_from_rank0(vs)?;
        let (names, params): (Vec<String>, Vec<Tensor>) = by_name(vs.variables())
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .unzip();
        let buckets = bucket::plan(&params, bucket_bytes);
        let mut covered: Vec<usize> = params.iter().map(|p| p.data_ptr() as usize).collect();
        covered.sort_unstable();
        Ok(DataParallel {
            group: group.clone(),
            names,
            params,
            buckets,
            covered: covered.into(),
        })
    }

    /// The process group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// The names of the trainable variables, in the order the buckets take them.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The number of collectives one [`DataParallel::average_gradients`] issues.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Replaces every gradient by its mean over the ranks: one all-reduce per bucket, the result
    /// bitwise the same on every rank. A parameter without a gradient (unused by this rank's
    /// step) gets a zero one first, so every rank contributes the same tensors. Inside a step
    /// guarded with the same group, the last f32 or f64 bucket carries the guard's verdicts too.
    ///
    /// Dense gradients only: a sparse one (an embedding built with `sparse: true`) is an error
    /// naming its parameter, found before any collective or any write, so every gradient is left
    /// as it was (and the ranks, which share the model, all stop alike).
    pub fn average_gradients(&self) -> Result<(), DistError> {
        if self.group.id().is_none() {
            return Ok(());
        }
        let _no_grad = tch::no_grad_guard();
        let rank = self.group.rank();
        let failed = |detail: String| DistError::Failed {
            op: "average_gradients",
            rank,
            detail,
        };
        let tch_failed = |e| error::from_tch(e, "average_gradients", rank);
        for (name, p) in self.names.iter().zip(&self.params) {
            let g = p.f_grad().map_err(tch_failed)?;
            if let Some(layout) = not_dense(&g) {
                return Err(failed(format!(
                    "the gradient of `{name}` is {layout}: {layout} gradients are not supported \
                     by bucketed averaging, only dense ones (build the layer with dense \
                     gradients, e.g. an embedding without `sparse: true`); no gradient was \
                     changed"
                )));
            }
        }
        for p in &self.params {
            ffi::ensure_grad(p).map_err(|e| failed(e.text))?;
        }
        let grads = self
            .params
            .iter()
            .map(Tensor::f_grad)
            .collect::<Result<Vec<_>, _>>()
            .map_err(tch_failed)?;
        let world = self.group.world_size() as f64;
        // The guard's verdicts ride on the last bucket that can carry them.
        let guard = fold::taker(&self.group);
        let carrier = guard
            .as_ref()
            .and_then(|_| self.buckets.iter().rposition(|b| fold::carries(b.kind)));
        for (i, b) in self.buckets.iter().enumerate() {
            match guard.as_ref().filter(|_| carrier == Some(i)) {
                Some(v) => self.average_with(&grads, b, v.as_ref())?,
                None => {
                    let mut flat = bucket::flatten(&grads, b).map_err(tch_failed)?;
                    self.group.all_reduce(&flat, ReduceOp::Sum)?;
                    let _ = flat.f_div_scalar_(world).map_err(tch_failed)?;
                    bucket::unflatten(&grads, b, &flat).map_err(tch_failed)?;
                }
            }
        }
        Ok(())
    }

    /// Averages the bucket `b` with the guard's share of the verdicts appended: one all-reduce
    /// for both.
    fn average_with(
        &self,
        grads: &[Tensor],
        b: &Bucket,
        verdicts: &dyn Verdicts,
    ) -> Result<(), DistError> {
        let (rank, world) = (self.group.rank(), self.group.world_size());
        let tch_failed = |e| error::from_tch(e, "average_gradients", rank);
        let share = verdicts.share(b.device, b.kind, rank, world, &self.params);
        let flat = bucket::flatten_with(grads, b, &share).map_err(tch_failed)?;
        self.group.all_reduce(&flat, ReduceOp::Sum)?;
        let n = flat.numel() - share.numel();
        let mut mean = flat.f_narrow(0, 0, n as i64).map_err(tch_failed)?;
        let _ = mean.f_div_scalar_(world as f64).map_err(tch_failed)?;
        bucket::unflatten(grads, b, &mean).map_err(tch_failed)?;
        let reduced = flat
            .f_narrow(0, n as i64, share.numel() as i64)
            .map_err(tch_failed)?;
        verdicts.agreed(reduced, Arc::clone(&self.covered));
        Ok(())
    }
}

/// The layout of a gradient that bucketed averaging cannot flatten (`None`: dense, or not
/// computed yet, which becomes a dense zero).
fn not_dense(g: &Tensor) -> Option<&'static str> {
    if !g.defined() {
        None
    } else if g.is_sparse() {
        Some("sparse")
    } else if g.is_mkldnn() {
        Some("MKL-DNN")
    } else {
        None
    }
}
