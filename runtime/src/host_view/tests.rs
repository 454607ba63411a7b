//! Which tensors the fast path reads, and the AVX2 copies giving the baseline's bits.

use super::*;
use tch::Kind;

fn of(ts: &[Tensor]) -> bool {
    HostView::of(ts).is_some()
}

#[test]
fn only_dense_contiguous_cpu_f32_f64_tensors_are_read_directly() {
    let _draws = crate::shim::drawing();
    let f = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let d = Tensor::randn([5], (Kind::Double, Device::Cpu));
    assert!(of(&[f.shallow_clone(), d.shallow_clone()]));
    assert!(of(&[Tensor::zeros([0], (Kind::Float, Device::Cpu))]));
    let not = [
        f.tr(),
        f.to_kind(Kind::BFloat16),
        f.to_kind(Kind::Half),
        Tensor::ones([3], (Kind::Int64, Device::Cpu)),
        f.to_sparse_sparse_dim(2),
        Tensor::new(),
        f.select(1, 1),
        f.neg().internal_neg_view(),
    ];
    for (i, t) in not.iter().enumerate() {
        assert!(!of(&[f.shallow_clone(), t.shallow_clone()]), "tensor {i}");
    }
    assert!(!of(&[]));
}

#[test]
fn a_slice_with_an_offset_is_read_from_its_first_element() {
    let base = Tensor::arange(10, (Kind::Float, Device::Cpu));
    let part = base.narrow(0, 3, 4); // 3, 4, 5, 6: contiguous, offset 3
    let view = HostView::of(std::slice::from_ref(&part)).unwrap();
    assert_eq!(view.total_norm(NormType::L1), 18.0);
    view.scale(2.0);
    assert_eq!(
        Vec::<f32>::try_from(&base).unwrap()[2..8],
        [2.0, 6.0, 8.0, 10.0, 12.0, 7.0]
    );
}

#[test]
fn a_tensor_that_requires_grad_is_scaled_by_aten() {
    let w = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::ones([3], (Kind::Float, Device::Cpu));
    let (vw, vg) = (w.internal_version(), g.internal_version());
    let ts = [w.shallow_clone(), g.shallow_clone()];
    HostView::of(&ts).unwrap().scale(0.5);
    assert_eq!(Vec::<f32>::try_from(&w).unwrap(), [0.5; 3]);
    assert_eq!(Vec::<f32>::try_from(&g).unwrap(), [0.5; 3]);
    assert!(
        w.internal_version() > vw,
        "ATen's mul_ bumps the version counter"
    );
    assert_eq!(g.internal_version(), vg, "a direct write does not");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx2_copies_give_the_baseline_bits() {
    let _draws = crate::shim::drawing();
    if !avx2() {
        return;
    }
    let ts: Vec<Tensor> = [1usize, 15, 16, 17, 1023, 1025, 4099]
        .iter()
        .flat_map(|&n| {
            let x = Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * 3.7;
            [x.shallow_clone(), x.to_kind(Kind::Double)]
        })
        .collect();
    let view = HostView::of(&ts).unwrap();
    for p in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)] {
        // SAFETY: the CPU has AVX2 (checked above).
        let wide = unsafe { view.total_norm_avx2(p) };
        assert_eq!(wide.to_bits(), view.total_norm_here(p).to_bits(), "{p:?}");
    }
    let copies: Vec<Tensor> = ts.iter().map(Tensor::copy).collect();
    let other = HostView::of(&copies).unwrap();
    // SAFETY: as above.
    unsafe { view.scale_avx2(0.37) };
    other.scale_here(0.37);
    for (a, b) in ts.iter().zip(&copies) {
        assert!(a.equal(b));
    }
    let finite = |v: &HostView, wide: bool| {
        v.parts.iter().all(|x| match wide {
            // SAFETY: as above.
            true => unsafe { raw_all_finite_avx2(x.raw) },
            false => raw_all_finite_here(x.raw),
        })
    };
    let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY, 2.0]);
    let bad = HostView::of(std::slice::from_ref(&bad)).unwrap();
    assert!(!finite(&bad, true) && !finite(&bad, false));
    assert!(finite(&view, true) && finite(&view, false));
}

#[test]
fn the_total_adds_the_parts_as_a_sum_of_them_does() {
    let _draws = crate::shim::drawing();
    let ts: Vec<Tensor> = [3i64, 17, 1025]
        .iter()
        .map(|&n| Tensor::randn([n], (Kind::Float, Device::Cpu)) * 1e3)
        .collect();
    let view = HostView::of(&ts).unwrap();
    let parts = |p| {
        ts.iter()
            .map(|t| HostView::of(std::slice::from_ref(t)).unwrap().total_norm(p))
            .collect::<Vec<f64>>()
    };
    let l1: f64 = parts(NormType::L1).into_iter().sum();
    assert_eq!(view.total_norm(NormType::L1).to_bits(), l1.to_bits());
    let l2: f64 = parts(NormType::L2)
        .into_iter()
        .map(|n| n * n)
        .sum::<f64>()
        .sqrt();
    assert!((view.total_norm(NormType::L2) - l2).abs() <= 1e-9 * l2);
    let inf = parts(NormType::Inf).into_iter().fold(0.0, f64::max);
    assert_eq!(view.total_norm(NormType::Inf), inf);
}

#[test]
fn all_finite_of_skips_undefined_tensors_and_reads_none_without_a_defined_one() {
    let ok = Tensor::from_slice(&[1.0f32, 2.0]);
    let bad = Tensor::from_slice(&[1.0f64, f64::NAN]);
    let none = Tensor::new();
    let of = |ts: &[&Tensor]| HostView::all_finite_of(ts);
    assert_eq!(of(&[&ok, &none]), Some(true));
    assert_eq!(of(&[&none, &ok, &bad]), Some(false));
    assert_eq!(of(&[&none, &none]), None);
    assert_eq!(of(&[]), None);
    assert_eq!(of(&[&ok, &ok.to_kind(Kind::BFloat16)]), None);
}
