//! Named tensors as a `.safetensors` file, the format PyTorch reads with
//! `safetensors.torch.load_file`.

use std::collections::HashSet;
use std::io::{Read, Write};

use ::safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};
use tch::{Device, Tensor};

use super::error::CheckpointError;
use super::store::Contents;

/// The bytes of a `.safetensors` file holding `tensors` under their names (the safetensors
/// crate's layout: by dtype, the widest first, then by name).
///
/// Tensors on a GPU are copied to the host first; the values are stored bit for bit in their
/// own dtype (bool, u8, i8, i16, i32, i64, f16, bf16, f32, f64). A name given twice, a sparse
/// tensor or another dtype is an error.
pub fn encode_safetensors<S: AsRef<str>, T: AsRef<Tensor>>(
    tensors: &[(S, T)],
) -> Result<Vec<u8>, CheckpointError> {
    let owned = tensors
        .iter()
        .map(|(n, t)| (n.as_ref().to_string(), t.as_ref().shallow_clone()))
        .collect();
    let mut bytes = Vec::new();
    // Writing into memory fails only where a tensor's copy to the host does.
    Encoder::new(owned)?.write_to(&mut bytes).map_err(|e| {
        match e.into_inner().map(|e| e.downcast::<CheckpointError>()) {
            Some(Ok(e)) => *e,
            Some(Err(e)) => CheckpointError::Safetensors(e.to_string()),
            None => CheckpointError::Safetensors("write failed".into()),
        }
    })?;
    Ok(bytes)
}

/// [`encode_safetensors`]'s file, written one tensor at a time when the checkpoint is saved:
/// only one tensor is on the host at a time (a large model's save does not hold a copy of the
/// whole model, nor of the file, in memory). Names and dtypes are checked now; a tensor's copy
/// to the host fails the save.
pub(crate) fn safetensors_writer(
    tensors: Vec<(String, Tensor)>,
) -> Result<Contents, CheckpointError> {
    let encoder = Encoder::new(tensors)?;
    Ok(Contents::writer(move |out| encoder.write_to(out)))
}

/// Named tensors checked for a `.safetensors` file, in the file's order, and its header.
struct Encoder {
    header: String,
    tensors: Vec<Tensor>,
}

impl Encoder {
    fn new(tensors: Vec<(String, Tensor)>) -> Result<Self, CheckpointError> {
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
        let tensors = entries.into_iter().map(|(_, _, _, t)| t).collect();
        Ok(Encoder { header, tensors })
    }

    /// The header, then each tensor's bytes, copied to the host one at a time (a failed copy:
    /// an `io::Error` holding the [`CheckpointError`]).
    fn write_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&(self.header.len() as u64).to_le_bytes())?;
        out.write_all(self.header.as_bytes())?;
        for tensor in &self.tensors {
            out.write_all(&host_bytes(tensor).map_err(std::io::Error::other)?)?;
        }
        Ok(())
    }
}

/// The tensors of a `.safetensors` file, on the CPU, sorted by name.
pub fn decode_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    decode_safetensors_from(&mut &bytes[..], bytes.len() as u64)
}

/// [`decode_safetensors`] of the `len` bytes `input` reads, one tensor at a time: besides the
/// tensors made, only one tensor's bytes are held (a large model's resume does not hold its
/// file in memory too). The header is checked as the safetensors crate checks it (tensors end
/// to end from offset 0, each as long as its dtype and shape say, filling the file) before any
/// tensor is read.
pub(crate) fn decode_safetensors_from(
    input: &mut dyn Read,
    len: u64,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    /// The largest header the safetensors crate reads.
    const MAX_HEADER: u64 = 100_000_000;
    let bad = |what: String| CheckpointError::Safetensors(what);
    let io = |e: std::io::Error| bad(format!("reading the file: {e}"));
    let mut n = [0u8; 8];
    input.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(bad(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    input.read_exact(&mut header).map_err(io)?;
    let text = std::str::from_utf8(&header).map_err(|e| bad(format!("header: {e}")))?;
    if !text.starts_with('{') {
        return Err(bad("the header is not a JSON object".into()));
    }
    let meta: Metadata = serde_json::from_str(text).map_err(|e| bad(format!("header: {e}")))?;
    let mut entries: Vec<(String, TensorInfo)> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let mut end = 0usize;
    for (name, info) in &entries {
        let (start, stop) = info.data_offsets;
        let size = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(info.dtype.size()));
        if start != end || stop < start || size != Some(stop - start) {
            return Err(bad(format!("tensor `{name}`: invalid offsets")));
        }
        end = stop;
    }
    if (end as u64).checked_add(8 + n) != Some(len) {
        return Err(bad(format!(
            "the tensors take {end} bytes, the file has {} after its header",
            len - 8 - n
        )));
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut bytes = Vec::new();
    for (name, info) in entries {
        bytes.resize(info.data_offsets.1 - info.data_offsets.0, 0);
        input.read_exact(&mut bytes).map_err(io)?;
        let view = TensorView::new(info.dtype, info.shape, &bytes)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.push((name, Tensor::try_from(view)?));
    }
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

/// The bytes of `tensor` (of a layout [`layout`] accepts), copied to the host.
fn host_bytes(tensor: &Tensor) -> Result<Vec<u8>, CheckpointError> {
    let host = tch::no_grad(|| tensor.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous())?;
    let numel = host.numel();
    let mut data = vec![0u8; numel * host.kind().elt_size_in_bytes()];
    host.f_copy_data_u8(&mut data, numel)?;
    Ok(data)
}
