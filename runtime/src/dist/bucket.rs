//! Buckets: many tensors of one (device, dtype) flattened into one contiguous buffer, so that one
//! collective moves them all (as DDP's ~25 MB gradient buckets).

use tch::{Device, Kind, TchError, Tensor};

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The tensors (by index into the planned list) of one bucket, all of one device and dtype.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bucket {
    pub(crate) indices: Vec<usize>,
    pub(crate) device: Device,
    pub(crate) kind: Kind,
}

/// Splits `tensors` into buckets of one (device, dtype) each, in order, a bucket closed when the
/// next tensor would take it past `cap_bytes` (a tensor larger than that is a bucket of its own).
/// Empty tensors are left out. The plan depends only on the tensors' order, shapes, dtypes and
/// devices, so every rank with the same model plans the same buckets.
pub(crate) fn plan(tensors: &[Tensor], cap_bytes: usize) -> Vec<Bucket> {
    let mut done = Vec::new();
    // Open buckets, one per (device, kind), with their size in bytes.
    let mut open: Vec<(Bucket, usize)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let numel = t.numel();
        if numel == 0 {
            continue;
        }
        let (device, kind) = (t.device(), t.kind());
        let bytes = numel * kind.elt_size_in_bytes();
        let slot = match open
            .iter()
            .position(|(b, _)| b.device == device && b.kind == kind)
        {
            Some(s) if open[s].1 + bytes > cap_bytes => {
                done.push(open.remove(s).0);
                None
            }
            s => s,
        };
        match slot {
            Some(s) => {
                open[s].0.indices.push(i);
                open[s].1 += bytes;
            }
            None => open.push((
                Bucket {
                    indices: vec![i],
                    device,
                    kind,
                },
                bytes,
            )),
        }
    }
    done.extend(open.into_iter().map(|(b, _)| b));
    done
}

/// The tensors of `bucket` as one contiguous 1-D buffer (a copy; for a bucket of one contiguous
/// tensor, a flat view of it, which the collective then updates in place). The tensors must be
/// dense (strided): the callers check.
pub(crate) fn flatten(tensors: &[Tensor], bucket: &Bucket) -> Result<Tensor, TchError> {
    if let [i] = bucket.indices[..] {
        if tensors[i].is_contiguous() {
            return tensors[i].f_view([-1]);
        }
    }
    Tensor::f_cat(&pieces(tensors, bucket)?, 0)
}

/// The tensors of `bucket` and then `extra` (1-D, of the bucket's dtype and device) as one
/// contiguous 1-D buffer (a copy).
pub(crate) fn flatten_with(
    tensors: &[Tensor],
    bucket: &Bucket,
    extra: &Tensor,
) -> Result<Tensor, TchError> {
    let mut flat = pieces(tensors, bucket)?;
    flat.push(extra.shallow_clone());
    Tensor::f_cat(&flat, 0)
}

/// The tensors of `bucket`, each flattened.
fn pieces(tensors: &[Tensor], bucket: &Bucket) -> Result<Vec<Tensor>, TchError> {
    bucket
        .indices
        .iter()
        .map(|&i| tensors[i].f_reshape([-1]))
        .collect()
}

/// Copies the buffer `flat` of `bucket` back into its tensors (nothing to do where `flat` is a
/// view of the one tensor).
pub(crate) fn unflatten(
    tensors: &[Tensor],
    bucket: &Bucket,
    flat: &Tensor,
) -> Result<(), TchError> {
    if let [i] = bucket.indices[..] {
        if tensors[i].is_contiguous() && flat.data_ptr() == tensors[i].data_ptr() {
            return Ok(());
        }
    }
    let mut offset = 0;
    for &i in &bucket.indices {
        let t = &tensors[i];
        let n = t.numel() as i64;
        let mut t = t.shallow_clone();
        t.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(&t)?)?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(n: &[i64]) -> Vec<Tensor> {
        n.iter()
            .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)))
            .collect()
    }

    #[test]
    fn buckets_by_size_and_kind() {
        // 4 bytes per element; cap 40 bytes = 10 elements.
        let mut ts = f32s(&[4, 4, 4, 20, 0, 1]);
        ts.insert(2, Tensor::zeros([3], (Kind::Double, Device::Cpu)));
        let b = plan(&ts, 40);
        let idx: Vec<Vec<usize>> = b.iter().map(|b| b.indices.clone()).collect();
        // [0,1] fill 32 bytes; 3 would make 48: closed. 4 (80 bytes) closes [3] and is alone;
        // the empty 5 is left out; the doubles have their own bucket.
        assert_eq!(idx, vec![vec![0, 1], vec![3], vec![4], vec![2], vec![6]]);
        assert_eq!(b[3].kind, Kind::Double);
    }

    #[test]
    fn flatten_and_back() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::arange(4, (Kind::Float, Device::Cpu))
            .view([2, 2])
            .transpose(0, 1); // not contiguous
        let ts = vec![a, b];
        let bucket = plan(&ts, 1 << 20).remove(0);
        let flat = flatten(&ts, &bucket).unwrap();
        assert_eq!(flat.size(), [10]);
        let flat = flat * 2.0;
        unflatten(&ts, &bucket, &flat).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(ts[0].reshape([-1])).unwrap(),
            [0., 2., 4., 6., 8., 10.]
        );
        assert_eq!(
            Vec::<f32>::try_from(ts[1].reshape([-1])).unwrap(),
            [0., 4., 2., 6.]
        );
    }
}
