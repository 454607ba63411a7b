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

/// [`values_of`] as real numbers: a complex tensor viewed as its real and imaginary parts (a
/// trailing dimension of 2), so that a sum, a finiteness test or a count sees both parts.
/// Casting a complex tensor to a real dtype would drop the imaginary part.
pub(crate) fn real_values_of(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let v = values_of(t);
    if v.is_complex() {
        v.f_resolve_conj()?.f_view_as_real()
    } else {
        Ok(v)
    }
}

/// Whether `t` holds numbers that can be NaN or infinite: a floating or complex dtype.
pub(crate) fn can_be_non_finite(t: &Tensor) -> bool {
    t.is_floating_point() || t.is_complex()
}
