//! Named tensors as a `.safetensors` file, the format PyTorch reads with
//! `safetensors.torch.load_file`.

use std::borrow::Cow;
use std::collections::HashSet;

use ::safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Tensor};

use super::error::CheckpointError;

/// A tensor's bytes on the host, as the safetensors writer takes them.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The bytes of a `.safetensors` file holding `tensors` under their names, sorted by name.
///
/// Tensors on a GPU are copied to the host first; the values are stored bit for bit in their
/// own dtype (bool, u8, i8, i16, i32, i64, f16, bf16, f32, f64). A name given twice, a sparse
/// tensor or another dtype is an error.
pub fn encode_safetensors<S: AsRef<str>, T: AsRef<Tensor>>(
    tensors: &[(S, T)],
) -> Result<Vec<u8>, CheckpointError> {
    let mut seen = HashSet::new();
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let name = name.as_ref();
        if !seen.insert(name) {
            return Err(CheckpointError::InvalidName {
                name: name.to_string(),
                reason: "given twice",
            });
        }
        host.push((name, to_host(tensor.as_ref())?));
    }
    host.sort_by(|a, b| a.0.cmp(b.0));
    ::safetensors::tensor::serialize(host.iter().map(|(n, t)| (*n, t)), &None)
        .map_err(|e| CheckpointError::Safetensors(e.to_string()))
}

/// The tensors of a `.safetensors` file, on the CPU, sorted by name.
pub fn decode_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let file =
        SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Safetensors(e.to_string()))?;
    let mut out = file
        .tensors()
        .into_iter()
        .map(|(name, view)| Ok((name, Tensor::try_from(view)?)))
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The dtype, shape and bytes of `tensor`, copied to the host.
fn to_host(tensor: &Tensor) -> Result<HostTensor, CheckpointError> {
    if tensor.is_sparse() {
        return Err(tch::TchError::Convert("a sparse tensor cannot be stored".to_string()).into());
    }
    let dtype = Dtype::try_from(tensor.f_kind()?)?;
    let host = tch::no_grad(|| tensor.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous())?;
    let numel = host.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    host.f_copy_data_u8(&mut data, numel)?;
    let shape = host
        .size()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| tch::TchError::Shape(format!("negative size in {:?}", host.size())))?;
    Ok(HostTensor { dtype, shape, data })
}
