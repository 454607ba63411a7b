//! Named tensors as a `.safetensors` file, the format PyTorch reads with
//! `safetensors.torch.load_file`.

use std::borrow::Cow;
use std::collections::HashSet;

use ::safetensors::tensor::{Dtype, SafeTensors, TensorInfo, View};
use tch::{Device, Tensor};

use super::error::CheckpointError;
use super::store::Contents;

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

/// [`encode_safetensors`]'s file, written one tensor at a time when the checkpoint is saved:
/// the same bytes, with only one tensor on the host at a time (a large model's save does not
/// hold a copy of the whole model, nor of the file, in memory). Names and dtypes are checked
/// now; a tensor's copy to the host fails the save.
pub(crate) fn safetensors_writer(
    tensors: Vec<(String, Tensor)>,
) -> Result<Contents, CheckpointError> {
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !seen.insert(name.clone()) {
            return Err(CheckpointError::InvalidName {
                name,
                reason: "given twice",
            });
        }
        let (dtype, shape) = layout(&tensor)?;
        entries.push((name, dtype, shape, tensor));
    }
    // In the order the safetensors crate writes: by dtype, the widest first, then by name;
    // the header is its JSON map, padded with spaces to 8 bytes.
    entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut header = String::from("{");
    let mut offset = 0;
    for (i, (name, dtype, shape, _)) in entries.iter().enumerate() {
        let len = shape.iter().product::<usize>() * dtype.size();
        let info = TensorInfo {
            dtype: *dtype,
            shape: shape.clone(),
            data_offsets: (offset, offset + len),
        };
        offset += len;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&serde_json::to_string(name)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info)?);
    }
    header.push('}');
    header.extend(std::iter::repeat_n(' ', (8 - header.len() % 8) % 8));
    Ok(Contents::writer(move |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        for (name, _, _, tensor) in entries {
            let host = to_host(&tensor)
                .map_err(|e| std::io::Error::other(format!("tensor `{name}`: {e}")))?;
            out.write_all(&host.data)?;
        }
        Ok(())
    }))
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

/// The dtype and shape `tensor` is stored with (a sparse tensor or another dtype: an error).
fn layout(tensor: &Tensor) -> Result<(Dtype, Vec<usize>), CheckpointError> {
    if tensor.is_sparse() {
        return Err(tch::TchError::Convert("a sparse tensor cannot be stored".to_string()).into());
    }
    let dtype = Dtype::try_from(tensor.f_kind()?)?;
    let shape = tensor
        .size()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| tch::TchError::Shape(format!("negative size in {:?}", tensor.size())))?;
    Ok((dtype, shape))
}

/// The dtype, shape and bytes of `tensor`, copied to the host.
fn to_host(tensor: &Tensor) -> Result<HostTensor, CheckpointError> {
    let (dtype, shape) = layout(tensor)?;
    let host = tch::no_grad(|| tensor.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous())?;
    let numel = host.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    host.f_copy_data_u8(&mut data, numel)?;
    Ok(HostTensor { dtype, shape, data })
}
