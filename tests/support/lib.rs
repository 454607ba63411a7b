//! Helpers shared by the workspace's tests, examples and benches.

use tch::{nn, Device};

/// The device tests run on: `STEPGUARD_TEST_DEVICE=cuda` (or `cuda:N`) picks a GPU, anything
/// else (or nothing) the CPU.
pub fn test_device() -> Device {
    match std::env::var("STEPGUARD_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        Ok(s) if s.starts_with("cuda:") => Device::Cuda(s[5..].parse().expect("cuda:N")),
        _ => Device::Cpu,
    }
}

/// The MLP of `shared/bench/torch_reference.py`: `layers` × (Linear(width) + ReLU), then
/// Linear(10), on 64 input features. Parameters are named `layer{i}.weight`/`.bias`, `out.*`.
pub fn mlp(vs: &nn::Path, layers: usize, width: i64) -> nn::Sequential {
    let mut seq = nn::seq();
    let mut d = 64;
    for i in 0..layers {
        seq = seq
            .add(nn::linear(
                vs / format!("layer{i}"),
                d,
                width,
                Default::default(),
            ))
            .add_fn(|x| x.relu());
        d = width;
    }
    seq.add(nn::linear(vs / "out", d, 10, Default::default()))
}

/// Host reads a fully guarded step makes: none on the CPU, where f32/f64 tensors are checked
/// in place by a loop over their memory; one per optimizer step on a GPU.
pub fn reads_per_step(steps: u64) -> u64 {
    if test_device() == Device::Cpu {
        0
    } else {
        steps
    }
}
