//! The ATen path's errors: libtorch's, returned, never a panic.

use super::*;

/// A grad libtorch takes no norm of (quantized): an error, not a panic, on every path.
#[test]
fn a_grad_without_a_norm_is_an_error() {
    let q = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).quantize_per_tensor(
        0.1,
        0,
        Kind::QUInt8,
    );
    let grads = [q];
    for p in [NormType::L2, NormType::Inf, NormType::P(3.0)] {
        let e = measure(&grads, p).expect_err("no norm of a quantized tensor");
        assert!(e.message().to_lowercase().contains("quantized"), "{e}");
    }
    let total = Tensor::from(f64::NAN);
    assert!(
        coefficient_of(&total, 5.0).is_ok(),
        "a NaN total is a coefficient of 1"
    );
    let m = Measured::Device {
        grads: &grads,
        total: Tensor::from(10.0f64),
        norms: None,
    };
    assert!(m.clip(1.0).is_err(), "scaling a quantized grad");
    assert!(m.clip_to(&Tensor::from(1.0f64)).is_err());
}
