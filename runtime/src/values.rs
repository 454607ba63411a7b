//! What a tensor's layout means for reading its values (no dependency on the rest of the
//! crate: the fast path, the ATen path and the slow path all use it).

use tch::Tensor;

/// The stored values of `t`: itself when dense, the (coalesced) values when sparse, so norms,
/// sums and counts see each element once; dense values of an mkldnn tensor.
pub(crate) fn values_of(t: &Tensor) -> Tensor {
    if t.is_sparse() {
        t.coalesce().values()
    } else if t.is_mkldnn() {
        t.to_dense(None, false)
    } else {
        t.shallow_clone()
    }
}
