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

/// Every variable's bits, by name (sorted): equal only when the parameters are bitwise equal.
pub fn var_bits(vs: &nn::VarStore) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let t = t
                .to_device(Device::Cpu)
                .to_kind(tch::Kind::Float)
                .flatten(0, -1);
            let b = Vec::<f32>::try_from(t).expect("float values");
            (n, b.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

/// Whether every value of every variable is finite.
pub fn all_finite(vs: &nn::VarStore) -> bool {
    vs.variables()
        .values()
        .all(|t| bool::try_from(t.isfinite().all()).expect("a bool"))
}

/// Serialises the tests of one binary that use tch's process-wide random generator (which
/// `tch::manual_seed` seeds): hold the guard for the whole test.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
