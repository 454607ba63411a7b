//! Checkpoints of a model through training: a save whose newest files were damaged is passed
//! over and the run resumes bitwise from the one before; PyTorch reads the tensor files with
//! the values they hold; a checkpoint of another shape is refused without touching the model.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use stepguard::checkpoint::{self, CheckpointError, Checkpoints, Contents};
use stepguard_suite::{mlp, test_device, var_bits};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// An empty folder of this test binary's own under cargo's temporary folder.
fn fresh_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint_store-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The model's variables as a `model.safetensors` file for a checkpoint.
fn model_file(vs: &nn::VarStore) -> (String, Contents) {
    let bytes = checkpoint::encode_safetensors(&checkpoint::var_store_tensors(vs)).unwrap();
    ("model.safetensors".to_string(), bytes.into())
}

#[test]
fn training_resumes_from_the_newest_checkpoint_that_verifies() {
    let store = Checkpoints::new(fresh_dir("resume")).keep(3);
    let vs = nn::VarStore::new(test_device());
    let net = mlp(&vs.root(), 2, 16);
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let x = Tensor::randn([8, 64], (Kind::Float, test_device()));
    let y = Tensor::randn([8, 10], (Kind::Float, test_device()));
    let mut bits = Vec::new();
    for step in 1..=5u64 {
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.backward_step(&loss);
        store
            .save(
                step,
                vec![model_file(&vs)],
                json!({ "step": step, "lr": 0.05 }),
            )
            .unwrap();
        bits.push(var_bits(&vs));
    }
    let mut kept: Vec<_> = std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        ["step-0000000003", "step-0000000004", "step-0000000005"]
    );

    // The newest checkpoint's tensor file loses a bit.
    let newest = store.root().join("step-0000000005");
    let file = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();

    let found = store
        .latest()
        .unwrap()
        .expect("a checkpoint to resume from");
    assert_eq!(found.checkpoint.step(), 4);
    assert_eq!(found.checkpoint.meta()["lr"], json!(0.05));
    assert_eq!(found.rejected.len(), 1);
    assert_eq!(found.rejected[0].path, newest);
    assert_eq!(
        found.rejected[0].reason,
        "file model.safetensors: SHA-256 mismatch"
    );

    let resumed = nn::VarStore::new(test_device());
    let _net = mlp(&resumed.root(), 2, 16);
    let tensors = found.checkpoint.read("model.safetensors").unwrap();
    checkpoint::load_into(&resumed, checkpoint::decode_safetensors(&tensors).unwrap()).unwrap();
    assert_eq!(
        var_bits(&resumed),
        bits[3],
        "the model of step 4, bit for bit"
    );
    assert!(resumed
        .variables()
        .values()
        .all(|t| t.device() == test_device()));
}

#[test]
fn a_checkpoint_of_another_model_is_refused_whole() {
    let store = Checkpoints::new(fresh_dir("refuse"));
    let saved = nn::VarStore::new(Device::Cpu);
    let _a = mlp(&saved.root(), 1, 16);
    store
        .save(1, vec![model_file(&saved)], json!(null))
        .unwrap();

    let other = nn::VarStore::new(test_device());
    let _b = mlp(&other.root(), 2, 32);
    let before = var_bits(&other);
    let found = store.latest().unwrap().unwrap();
    let bytes = found.checkpoint.read("model.safetensors").unwrap();
    let err =
        checkpoint::load_into(&other, checkpoint::decode_safetensors(&bytes).unwrap()).unwrap_err();
    let CheckpointError::Mismatch(problems) = &err else {
        panic!("expected a mismatch, got {err:?}");
    };
    assert!(
        problems.contains(
            &"layer0.weight: shape [16, 64] in the checkpoint, [32, 64] in the VarStore"
                .to_string()
        ),
        "{problems:?}"
    );
    assert!(
        problems.contains(&"missing: layer1.weight (shape [32, 32], dtype Float)".to_string()),
        "{problems:?}"
    );
    assert!(
        problems.contains(
            &"out.weight: shape [10, 16] in the checkpoint, [10, 32] in the VarStore".to_string()
        ),
        "{problems:?}"
    );
    assert_eq!(var_bits(&other), before, "nothing was loaded");
}

/// The Python of the PyTorch this suite links (`VIRTUAL_ENV`, set by scripts/env.sh), else a
/// `python3` on PATH that has torch; `None` when there is neither.
fn python_with_torch() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        candidates.push(Path::new(&venv).join("bin").join("python"));
    }
    candidates.extend(["python3", "python"].map(PathBuf::from));
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Reads the file with `safetensors.torch.load_file` (the venv of `scripts/env.sh` has it),
/// and compares with values built here.
const READ_IN_PYTORCH: &str = r#"
import sys, torch
from safetensors.torch import load_file
got, loader = load_file(sys.argv[1]), "safetensors.torch.load_file"
base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.25 - 1
want = {
    "a.f32": base,
    "b.f16": base.half(),
    "c.bf16": base.bfloat16(),
    "d.f64": torch.arange(5, dtype=torch.float64) / 3,
    "e.i64": torch.arange(-3, 3, dtype=torch.int64) * 1_000_000_000_000,
    "f.i32": torch.arange(4, dtype=torch.int32) - 2,
    "g.u8": torch.arange(250, 256, dtype=torch.uint8),
    "h.bool": torch.arange(5) % 2 == 0,
    "i.special": torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]),
}
assert sorted(got) == sorted(want), (sorted(got), sorted(want))
for name, w in want.items():
    g = got[name]
    assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.dtype, w.shape)
    assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name
print("read by", loader)
"#;

#[test]
fn pytorch_reads_the_tensor_file() {
    let Some(python) = python_with_torch() else {
        assert!(
            std::env::var_os("VIRTUAL_ENV").is_none(),
            "VIRTUAL_ENV is set but its python cannot import torch"
        );
        eprintln!(
            "pytorch_reads_the_tensor_file: no Python with torch (source scripts/env.sh), skipped"
        );
        return;
    };
    let cpu = (Kind::Float, Device::Cpu);
    let base = Tensor::arange(12, cpu).reshape([3, 4]) * 0.25 - 1.0;
    let tensors = vec![
        (
            "i.special",
            Tensor::from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0]),
        ),
        ("a.f32", base.to_device(test_device())),
        ("b.f16", base.to_kind(Kind::Half)),
        ("c.bf16", base.to_kind(Kind::BFloat16)),
        (
            "d.f64",
            Tensor::arange(5, (Kind::Double, Device::Cpu)) / 3.0,
        ),
        (
            "e.i64",
            Tensor::arange_start(-3, 3, (Kind::Int64, Device::Cpu)) * 1_000_000_000_000i64,
        ),
        ("f.i32", Tensor::arange(4, (Kind::Int, Device::Cpu)) - 2),
        (
            "g.u8",
            Tensor::arange_start(250, 256, (Kind::Uint8, Device::Cpu)),
        ),
        (
            "h.bool",
            Tensor::arange(5, (Kind::Int64, Device::Cpu))
                .remainder(2)
                .eq(0),
        ),
    ];
    let store = Checkpoints::new(fresh_dir("pytorch"));
    let bytes = checkpoint::encode_safetensors(&tensors).unwrap();
    let saved = store
        .save(
            1,
            vec![("t.safetensors".to_string(), bytes.into())],
            json!(null),
        )
        .unwrap();
    let out = Command::new(&python)
        .arg("-c")
        .arg(READ_IN_PYTORCH)
        .arg(saved.path().join("t.safetensors"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("read by safetensors.torch.load_file"),
        "{stdout}"
    );
    eprintln!("pytorch_reads_the_tensor_file: {}", stdout.trim());
}
