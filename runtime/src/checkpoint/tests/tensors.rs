//! The tensor format and the VarStore loader.

use serde_json::json;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::*;

/// The raw bytes of a tensor (NaN and -0.0 compare as themselves).
fn raw(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn sample_tensors() -> Vec<(String, Tensor)> {
    let f = Tensor::from_slice(&[1.5f32, -0.0, f32::NAN, f32::INFINITY, -3.25, 1e-40]);
    let mut v = vec![
        ("f32".to_string(), f.reshape([2, 3])),
        ("f16".to_string(), f.to_kind(Kind::Half)),
        ("bf16".to_string(), f.to_kind(Kind::BFloat16)),
        (
            "f64".to_string(),
            Tensor::from_slice(&[0.1f64, -2.0, f64::NAN]),
        ),
        (
            "i64".to_string(),
            Tensor::from_slice(&[i64::MIN, -1, i64::MAX]),
        ),
        (
            "i32".to_string(),
            Tensor::from_slice(&[i32::MIN, 7, i32::MAX]),
        ),
        ("i16".to_string(), Tensor::from_slice(&[-300i16, 300])),
        ("i8".to_string(), Tensor::from_slice(&[-128i8, 127])),
        ("u8".to_string(), Tensor::from_slice(&[0u8, 200, 255])),
        ("bool".to_string(), Tensor::from_slice(&[true, false, true])),
        ("scalar".to_string(), Tensor::from(2.5f64)),
        (
            "empty".to_string(),
            Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
        ),
    ];
    // Not contiguous: stored as the transposed values.
    v.push((
        "transposed".to_string(),
        Tensor::arange(6, (Kind::Float, Device::Cpu))
            .reshape([2, 3])
            .tr(),
    ));
    v
}

#[test]
fn safetensors_round_trip_is_bitwise() {
    let tensors = sample_tensors();
    let bytes = encode_safetensors(&tensors).unwrap();
    let back = decode_safetensors(&bytes).unwrap();
    let mut want: Vec<&(String, Tensor)> = tensors.iter().collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(back.len(), want.len());
    for ((name, got), (want_name, want)) in back.iter().zip(want) {
        assert_eq!(name, want_name);
        assert_eq!(got.kind(), want.kind(), "{name}");
        assert_eq!(got.size(), want.size(), "{name}");
        assert_eq!(got.device(), Device::Cpu);
        assert_eq!(raw(got), raw(want), "{name}");
    }
}

#[test]
fn safetensors_layout() {
    let bytes = encode_safetensors(&[
        ("b", Tensor::from_slice(&[1.0f32, 2.0])),
        ("a", Tensor::from_slice(&[3i64])),
    ])
    .unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(
        header["a"],
        json!({"dtype": "I64", "shape": [1], "data_offsets": [0, 8]})
    );
    assert_eq!(
        header["b"],
        json!({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})
    );
    assert_eq!(bytes.len(), 8 + n + 16);
    assert_eq!(
        &bytes[8 + n + 8..],
        [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()
    );
}

#[test]
fn safetensors_refuses_bad_input() {
    let t = Tensor::from_slice(&[1.0f32]);
    let err = encode_safetensors(&[("x", &t), ("x", &t)]).unwrap_err();
    assert!(matches!(err, CheckpointError::InvalidName { .. }), "{err}");
    let complex = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
    assert!(matches!(
        encode_safetensors(&[("c", complex)]),
        Err(CheckpointError::Torch(_))
    ));
    let mut bytes = encode_safetensors(&[("x", &t)]).unwrap();
    bytes.truncate(bytes.len() - 1);
    assert!(matches!(
        decode_safetensors(&bytes),
        Err(CheckpointError::Safetensors(_))
    ));
    assert!(matches!(
        decode_safetensors(b"nope"),
        Err(CheckpointError::Safetensors(_))
    ));
}

#[test]
fn safetensors_from_a_gpu() {
    let _draws = crate::shim::drawing();
    if !tch::Cuda::is_available() {
        eprintln!("safetensors_from_a_gpu: no CUDA device, skipped");
        return;
    }
    let t = Tensor::randn([3, 5], (Kind::Float, Device::Cuda(0)));
    let back = decode_safetensors(&encode_safetensors(&[("t", &t)]).unwrap()).unwrap();
    assert_eq!(raw(&back[0].1), raw(&t.to_device(Device::Cpu)));
}

/// A VarStore with `fc.weight` [2, 4], `fc.bias` [2] and a buffer `scale.s` [3] (f64), all random.
fn model() -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let _fc = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    let s = Tensor::randn([3], (Kind::Double, Device::Cpu));
    let _s = (vs.root() / "scale").add("s", s, false);
    vs
}

fn snapshot(vs: &VarStore) -> Vec<(String, Vec<u8>)> {
    var_store_tensors(vs)
        .iter()
        .map(|(n, t)| (n.clone(), raw(t)))
        .collect()
}

#[test]
fn load_into_accepts_matching_tensors() {
    let _draws = crate::shim::drawing();
    let (from, to) = (model(), model());
    let want = snapshot(&from);
    assert_ne!(snapshot(&to), want);
    let bytes = encode_safetensors(&var_store_tensors(&from)).unwrap();
    load_into(&to, decode_safetensors(&bytes).unwrap()).unwrap();
    assert_eq!(snapshot(&to), want);
    assert!(to.variables()["fc.weight"].requires_grad());
}

#[test]
fn load_into_refuses_any_mismatch_and_changes_nothing() {
    let _draws = crate::shim::drawing();
    let vs = model();
    let before = snapshot(&vs);
    let good = || var_store_tensors(&model());
    let without = |name: &str| {
        good()
            .into_iter()
            .filter(|(n, _)| n != name)
            .collect::<Vec<_>>()
    };
    let replaced = |name: &str, t: Tensor| {
        good()
            .into_iter()
            .map(|(n, x)| {
                if n == name {
                    (n, t.shallow_clone())
                } else {
                    (n, x)
                }
            })
            .collect::<Vec<_>>()
    };
    let mut extra = good();
    extra.push((
        "fc.extra".to_string(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let cases = [
        (
            replaced(
                "fc.weight",
                Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)),
            ),
            vec!["fc.weight: shape [4, 2] in the checkpoint, [2, 4] in the VarStore"],
        ),
        (
            replaced("fc.bias", Tensor::zeros([2], (Kind::Double, Device::Cpu))),
            vec!["fc.bias: dtype Double in the checkpoint, Float in the VarStore"],
        ),
        (
            without("fc.bias"),
            vec!["missing: fc.bias (shape [2], dtype Float)"],
        ),
        (extra, vec!["unexpected: fc.extra"]),
    ];
    for (tensors, want) in cases {
        match load_into(&vs, tensors) {
            Err(CheckpointError::Mismatch(got)) => assert_eq!(got, want),
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert_eq!(snapshot(&vs), before, "the VarStore changed");
    }
    // Several differences at once: all reported, the good tensors not copied either.
    let mut many = without("fc.bias");
    many.retain(|(n, _)| n != "scale.s");
    many.push((
        "other".to_string(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    match load_into(&vs, many) {
        Err(CheckpointError::Mismatch(got)) => assert_eq!(got.len(), 3, "{got:?}"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(snapshot(&vs), before);
}

/// What `safetensors_writer` writes, collected.
fn streamed(tensors: Vec<(String, Tensor)>) -> Result<Vec<u8>, CheckpointError> {
    let Contents::Writer(write) = super::super::safetensors::safetensors_writer(tensors)? else {
        panic!("a writer");
    };
    let mut out = Vec::new();
    write(&mut out).map_err(|e| CheckpointError::Safetensors(e.to_string()))?;
    Ok(out)
}

/// A tensor's bytes, as the safetensors crate's own writer takes them.
struct CrateView(::safetensors::Dtype, Vec<usize>, Vec<u8>);

impl ::safetensors::View for &CrateView {
    fn dtype(&self) -> ::safetensors::Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

/// What the safetensors crate writes for `tensors`.
fn crates_file(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let views: Vec<(&str, CrateView)> = tensors
        .iter()
        .map(|(n, t)| {
            let dtype = ::safetensors::Dtype::try_from(t.kind()).unwrap();
            let shape = t.size().iter().map(|&d| d as usize).collect();
            (n.as_str(), CrateView(dtype, shape, raw(t)))
        })
        .collect();
    ::safetensors::serialize(views.iter().map(|(n, v)| (*n, v)), &None).unwrap()
}

#[test]
fn the_written_file_is_the_safetensors_crates_byte_for_byte() {
    let tensors = sample_tensors();
    let want = crates_file(&tensors);
    assert_eq!(encode_safetensors(&tensors).unwrap(), want);
    let copies = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    assert_eq!(streamed(copies).unwrap(), want);
    assert_eq!(streamed(Vec::new()).unwrap(), crates_file(&[]));
    // The same refusals.
    let t = Tensor::from_slice(&[1.0f32]);
    let twice = vec![("x".to_string(), t.shallow_clone()), ("x".to_string(), t)];
    assert!(matches!(
        streamed(twice),
        Err(CheckpointError::InvalidName { .. })
    ));
    let complex = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
    assert!(matches!(
        streamed(vec![("c".to_string(), complex)]),
        Err(CheckpointError::Torch(_))
    ));
}

/// Yields at most 3 bytes per read: a stream that arrives in pieces.
struct Trickle<'a>(&'a [u8]);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(3).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// A file made of `header` (JSON) and `data`.
fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The streamed decoder gives what the safetensors crate's own reader gives, however the bytes
/// arrive, and refuses a header the crate refuses before reading any tensor.
#[test]
fn the_streamed_decoder_reads_what_the_crate_reads_and_refuses_what_it_refuses() {
    let tensors = sample_tensors();
    let bytes = encode_safetensors(&tensors).unwrap();
    let streamed = super::super::safetensors::decode_safetensors_from(
        &mut Trickle(&bytes),
        bytes.len() as u64,
    )
    .unwrap();
    let file = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut crates: Vec<(String, Vec<u8>, Vec<usize>)> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec()))
        .collect();
    crates.sort();
    let ours: Vec<(String, Vec<u8>, Vec<usize>)> = streamed
        .iter()
        .map(|(n, t)| {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            (n.clone(), raw(t), shape)
        })
        .collect();
    assert_eq!(ours, crates);

    let refused = |bytes: &[u8]| {
        let ours = decode_safetensors(bytes);
        let theirs = ::safetensors::SafeTensors::deserialize(bytes);
        assert!(theirs.is_err(), "the crate accepts it");
        assert!(
            matches!(ours, Err(CheckpointError::Safetensors(_))),
            "{:?}",
            ours.map(|t| t.len())
        );
    };
    let f32x2 = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert_eq!(
        decode_safetensors(&with_header(f32x2, &[0; 8]))
            .unwrap()
            .len(),
        1
    );
    refused(&with_header(f32x2, &[0; 7])); // short
    refused(&with_header(f32x2, &[0; 9])); // a byte too many
    refused(&with_header(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
        &[0; 4],
    )); // shorter than its shape
    refused(&with_header(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    )); // a gap before it
    refused(&with_header(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    )); // overlapping
    refused(&with_header("[]", &[])); // not an object
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    refused(&huge); // a header longer than the file
}
