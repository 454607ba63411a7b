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

/// Distance between two values of the floating dtype `kind` in units in the last place: how
/// many steps between neighbouring representable values of `kind` lead from one to the other.
///
/// The values are given as f64 (every floating dtype converts to f64 exactly, as
/// `Tensor::to_kind(Kind::Double)` does); a value `kind` cannot represent is first rounded to
/// it. +0 and -0 are 0 apart, so are two NaNs; a NaN and a number are `u64::MAX` apart.
///
/// Transcendental ops (log, exp, tanh, pow, softmax, ...) differ by an ulp or two between
/// CPUs, vector widths and libm builds: compare them with values written by PyTorch on another
/// machine within a few ulps, and bitwise only with the same op run on the same machine.
pub fn ulp_distance(a: f64, b: f64, kind: tch::Kind) -> u64 {
    if a.is_nan() || b.is_nan() {
        return if a.is_nan() && b.is_nan() {
            0
        } else {
            u64::MAX
        };
    }
    let (ka, kb) = (ordered_bits(a, kind), ordered_bits(b, kind));
    u64::try_from(ka.abs_diff(kb)).unwrap_or(u64::MAX)
}

/// The gap between `|x|` (rounded to `kind`) and the next larger value of `kind`: one ulp at x.
pub fn ulp(x: f64, kind: tch::Kind) -> f64 {
    use tch::Kind;
    let x = x.abs();
    match kind {
        Kind::Half => {
            let h = half::f16::from_f64(x);
            half::f16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()
        }
        Kind::BFloat16 => {
            let h = half::bf16::from_f64(x);
            half::bf16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()
        }
        Kind::Float => {
            let f = x as f32;
            f64::from(f32::from_bits(f.to_bits() + 1)) - f64::from(f)
        }
        Kind::Double => f64::from_bits(x.to_bits() + 1) - x,
        other => panic!("ulp: {other:?} is not a floating dtype"),
    }
}

/// Asserts that `got[i]` is within `max_ulps` ulps of `want[i]` in `kind` for every i (see
/// [`ulp_distance`]); on failure names the first few positions that are not, with their
/// distance.
#[track_caller]
pub fn assert_within_ulps(got: &[f64], want: &[f64], kind: tch::Kind, max_ulps: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let far: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| (i, g, w, ulp_distance(*g, *w, kind)))
        .filter(|(.., d)| *d > max_ulps)
        .take(5)
        .map(|(i, g, w, d)| format!("[{i}] got {g:e}, want {w:e} ({d} ulps)"))
        .collect();
    assert!(
        far.is_empty(),
        "{what}: more than {max_ulps} ulps ({kind:?}) from the reference: {}",
        far.join("; ")
    );
}

/// The bit pattern of `x` rounded to `kind`, as an integer that grows with the value: adjacent
/// values of `kind` are adjacent integers, and +0 and -0 are both 0.
fn ordered_bits(x: f64, kind: tch::Kind) -> i128 {
    use tch::Kind;
    let (bits, width) = match kind {
        Kind::Half => (u64::from(half::f16::from_f64(x).to_bits()), 16),
        Kind::BFloat16 => (u64::from(half::bf16::from_f64(x).to_bits()), 16),
        Kind::Float => (u64::from((x as f32).to_bits()), 32),
        Kind::Double => (x.to_bits(), 64),
        other => panic!("ulp_distance: {other:?} is not a floating dtype"),
    };
    let sign = 1u64 << (width - 1);
    if bits & sign == 0 {
        i128::from(bits)
    } else {
        -i128::from(bits & !sign)
    }
}

/// Runs `f` with a `tracing` subscriber of its own (events up to `level`, no colours) and
/// returns what `f` returned and the events as they were printed.
pub fn capture_events<R>(level: tracing::Level, f: impl FnOnce() -> R) -> (R, String) {
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (r, log)
}

#[cfg(test)]
mod tests {
    use super::{ulp, ulp_distance};
    use tch::Kind;

    #[test]
    fn ulp_distance_counts_representable_steps_in_the_dtype() {
        let one_up = |k: Kind| 1.0 + ulp(1.0, k);
        for (kind, eps) in [
            (Kind::Half, 2f64.powi(-10)),
            (Kind::BFloat16, 2f64.powi(-7)),
            (Kind::Float, f64::from(f32::EPSILON)),
            (Kind::Double, f64::EPSILON),
        ] {
            assert_eq!(ulp(1.0, kind), eps, "{kind:?}");
            assert_eq!(ulp_distance(1.0, 1.0, kind), 0, "{kind:?}");
            assert_eq!(ulp_distance(1.0, one_up(kind), kind), 1, "{kind:?}");
            assert_eq!(ulp_distance(one_up(kind), 1.0, kind), 1, "{kind:?}");
            assert_eq!(ulp_distance(1.0, 1.0 + 3.0 * eps, kind), 3, "{kind:?}");
            // Below 1.0 the steps are half as wide.
            assert_eq!(ulp_distance(1.0, 1.0 - eps, kind), 2, "{kind:?}");
            assert_eq!(ulp_distance(-1.0, -1.0 - eps, kind), 1, "{kind:?}");
            assert_eq!(ulp_distance(0.0, -0.0, kind), 0, "{kind:?}");
            assert_eq!(ulp_distance(f64::NAN, f64::NAN, kind), 0, "{kind:?}");
            assert_eq!(ulp_distance(f64::NAN, 1.0, kind), u64::MAX, "{kind:?}");
        }
        // Across zero: the smallest positive and negative subnormals are two steps apart.
        let tiny = f64::from(f32::from_bits(1));
        assert_eq!(ulp_distance(tiny, -tiny, Kind::Float), 2);
        assert_eq!(
            ulp_distance(f64::from(f32::MAX), f64::INFINITY, Kind::Float),
            1
        );
        // The f32 log(7) of two machines: one ulp in f32, about 2^29 in f64.
        let (a, b) = (1.945910096168518, 1.9459102153778076);
        assert_eq!(ulp_distance(a, b, Kind::Float), 1);
        assert_eq!(ulp_distance(a, b, Kind::Double), 1 << 29);
    }
}
