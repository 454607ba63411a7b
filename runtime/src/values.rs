//! What a tensor's layout means for reading its values (no dependency on the rest of the
//! crate: the fast path, the ATen path and the slow path all use it).

use tch::{Kind, Tensor};

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

/// The mean of `losses` (each the mean of its elements), 0-dim f64 on the first one's device;
/// a loss that cannot be converted is left out.
pub(crate) fn mean_of(losses: &[&Tensor]) -> Option<Tensor> {
    let device = losses.first()?.device();
    let values: Vec<Tensor> = losses
        .iter()
        .filter_map(|l| {
            let v = l.f_to_kind(Kind::Double).ok()?;
            let v = if v.dim() == 0 {
                v
            } else {
                v.f_mean(Kind::Double).ok()?
            };
            v.f_to_device(device).ok()
        })
        .collect();
    if values.is_empty() {
        return None;
    }
    Tensor::f_stack(&values, 0).ok()?.f_mean(Kind::Double).ok()
}
