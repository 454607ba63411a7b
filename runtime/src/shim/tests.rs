//! The shim's edges: errors, list lengths, rejected steps, leaks.

use super::*;
use tch::{Device, Kind};

fn resident_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4
}

#[test]
fn a_cpp_exception_comes_back_as_an_error() {
    let ints = [Tensor::ones([3], (Kind::Int64, Device::Cpu))];
    let e = foreach_norms(&ints, 2.0).expect_err("_foreach_norm refuses integer tensors");
    assert!(!e.message().is_empty());
    let coef = Tensor::from(0.5f64);
    let e = foreach_mul_(&[Tensor::ones([2], (Kind::Bool, Device::Cpu))], &coef);
    assert!(e.is_err(), "a bool tensor cannot be scaled in place by 0.5");
}

extern "C" {
    fn sg_test_fail_next_error_alloc();
}

#[test]
fn an_error_whose_text_cannot_be_allocated_is_still_an_error() {
    let ints = [Tensor::ones([3], (Kind::Int64, Device::Cpu))];
    // SAFETY: no arguments; sets a thread-local flag of the shim.
    unsafe { sg_test_fail_next_error_alloc() };
    let r = foreach_norms(&ints, 2.0);
    assert!(r.is_err(), "a failure read as success: {r:?}");
}

#[test]
fn empty_or_unequal_lists_are_errors_not_reads_past_the_end() {
    assert!(foreach_norms(&[], 2.0).is_err());
    let t = || Tensor::ones([2], (Kind::Float, Device::Cpu));
    let (p, g1, g0) = ([t(), t()], [t()], [t(), t()]);
    let (m, v, st) = (
        [t(), t()],
        [t(), t()],
        [Tensor::from(0f32), Tensor::from(0f32)],
    );
    let adam = AdamStep {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        weight_decay: 0.0,
        eps: 1e-8,
        amsgrad: false,
        adamw: false,
    };
    let short = FusedLists {
        params: &p,
        grads: &g1,
        first: &m,
        second: &v,
        max: &[],
        steps: &st,
    };
    let e = fused_adam_(&short, adam, None, None).expect_err("one grad for two params");
    assert!(e.message().contains("grads"), "{e}");
    let amsgrad = AdamStep {
        amsgrad: true,
        ..adam
    };
    let no_max = FusedLists {
        grads: &g0,
        ..short
    };
    assert!(fused_adam_(&no_max, amsgrad, None, None).is_err());
    let sgd = SgdStep {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        is_first_step: true,
    };
    let one_buffer = FusedLists {
        first: &m[..1],
        ..no_max
    };
    assert!(fused_sgd_(&one_buffer, sgd, None, None).is_err());
    // Nothing moved.
    assert!(p.iter().all(|x| x.equal(&t())));
    assert!(m.iter().all(|x| x.equal(&t())));
    assert!(st.iter().all(|s| s.double_value(&[]) == 0.0));
}

/// Params, grads, moments and step counters of a fused Adam step over `kinds`.
fn adam_lists(kinds: [Kind; 2], moment: Kind) -> [Vec<Tensor>; 5] {
    let t = |k: Kind, v: f64| Tensor::full([3], v, (k, Device::Cpu));
    [
        kinds.iter().map(|&k| t(k, 1.0)).collect(),
        kinds.iter().map(|&k| t(k, 0.5)).collect(),
        [kinds[0], moment].iter().map(|&k| t(k, 0.0)).collect(),
        kinds.iter().map(|&k| t(k, 0.0)).collect(),
        (0..2).map(|_| Tensor::from(3f32)).collect(),
    ]
}

#[test]
fn a_step_the_kernel_rejects_moves_no_counter_and_no_parameter() {
    let adam = AdamStep {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        weight_decay: 0.0,
        eps: 1e-8,
        amsgrad: false,
        adamw: true,
    };
    // Integer tensors (no fused kernel for them), then a moment of another dtype than its
    // parameter (the CPU kernel updates the tensors before it, then throws).
    for (kinds, moment) in [
        ([Kind::Int64, Kind::Int64], Kind::Int64),
        ([Kind::Float, Kind::Float], Kind::Double),
    ] {
        let [p, g, m, v, st] = adam_lists(kinds, moment);
        let before: Vec<Tensor> = p
            .iter()
            .chain(&m)
            .chain(&v)
            .chain(&st)
            .map(Tensor::copy)
            .collect();
        let lists = FusedLists {
            params: &p,
            grads: &g,
            first: &m,
            second: &v,
            max: &[],
            steps: &st,
        };
        let found_inf = Tensor::from(0f32);
        for inf in [None, Some(&found_inf)] {
            let r = fused_adam_(&lists, adam, None, inf);
            assert!(r.is_err(), "{kinds:?} {moment:?}");
            let after = p.iter().chain(&m).chain(&v).chain(&st);
            for (i, (a, b)) in before.iter().zip(after).enumerate() {
                assert!(a.equal(b), "{kinds:?} {moment:?}: tensor {i} moved");
            }
        }
    }
}

#[test]
fn the_shim_leaks_no_tensors() {
    let ts: Vec<Tensor> = (0..4)
        .map(|i| Tensor::ones([8], (Kind::Float, Device::Cpu)) * i)
        .collect();
    let coef = Tensor::from(1.0f64);
    let w = Tensor::ones([8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&w * 2.0).sum(Kind::Float).backward();
    let params = [w.shallow_clone(), w.shallow_clone()];
    let run = |n: usize| {
        for _ in 0..n {
            let norms = foreach_norms(&ts, 2.0).unwrap();
            assert_eq!(norms.size(), vec![4]);
            foreach_mul_(&ts, &coef).unwrap();
            drop(Grads::of(&params));
            release(ts.iter().map(Tensor::shallow_clone).collect());
            drop(detached(&norms));
        }
    };
    if resident_kib() == 0 {
        return; // no /proc: nothing to measure
    }
    run(2_000);
    let before = resident_kib();
    run(20_000);
    let grown = resident_kib().saturating_sub(before);
    // A leaked at::Tensor (with its TensorImpl and storage) is several hundred bytes: 20k
    // of them would be well over 4 MiB.
    assert!(
        grown < 4 * 1024,
        "resident memory grew by {grown} KiB over 20k calls"
    );
}

#[test]
fn grads_of_a_list_detached_values_and_released_handles() {
    let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&a * 2.0).sum(Kind::Float).backward();
    // `b` has no grad: skipped.
    let params = [a.shallow_clone(), b.shallow_clone(), a.shallow_clone()];
    let grads = Grads::of(&params);
    assert_eq!(grads.len(), 2);
    assert_eq!(Vec::<f32>::try_from(&grads[1]).unwrap(), vec![2.0; 3]);
    // The handles are the parameter's own grad: a write through one is the grad's.
    let _ = grads[0].shallow_clone().f_mul_scalar_(3.0).unwrap();
    assert_eq!(Vec::<f32>::try_from(&a.grad()).unwrap(), vec![6.0; 3]);
    let loss = (&a * 3.0).sum(Kind::Float);
    let d = detached(&loss);
    assert!(loss.requires_grad() && !d.requires_grad());
    assert_eq!(d.double_value(&[]), 9.0);
    drop(grads);
    release(params.iter().map(Tensor::shallow_clone).collect());
    let g = Vec::<f32>::try_from(&a.grad()).unwrap();
    assert_eq!(
        g,
        vec![6.0; 3],
        "the grad lives on after its borrowed handles and released handles are gone"
    );
    drop(params);
    assert_eq!(Vec::<f32>::try_from(&a.grad()).unwrap(), vec![6.0; 3]);
}

/// Restored generators draw the same numbers again (dropout masks on a replay).
#[test]
fn restored_generators_draw_the_same_numbers() {
    let _draws = super::rng::drawing();
    let saved = super::Generators::save().unwrap();
    let a = Tensor::randn([64], (tch::Kind::Float, tch::Device::Cpu));
    let mask = Tensor::ones([64], (tch::Kind::Float, tch::Device::Cpu)).dropout(0.5, true);
    saved.restore().unwrap();
    let b = Tensor::randn([64], (tch::Kind::Float, tch::Device::Cpu));
    let mask2 = Tensor::ones([64], (tch::Kind::Float, tch::Device::Cpu)).dropout(0.5, true);
    assert!(a.equal(&b), "the same draws after a restore");
    assert!(mask.equal(&mask2), "the same dropout mask");
    let c = Tensor::randn([64], (tch::Kind::Float, tch::Device::Cpu));
    assert!(!c.equal(&b), "the generator moves on");
}

/// The CPU generator's position (`left`, `next`) in its saved state, as `torch.get_rng_state()`
/// lays it out: the initial seed (u64), `left` (i32), `seeded` (i32), `next` (u64), the words.
fn cpu_position() -> (i32, u64) {
    let states = super::rng_states().unwrap();
    let bytes = Vec::<u8>::try_from(&states[0].1).unwrap();
    let left = i32::from_ne_bytes(bytes[8..12].try_into().unwrap());
    let next = u64::from_ne_bytes(bytes[16..24].try_into().unwrap());
    (left, next)
}

fn cpu_state() -> Vec<u8> {
    Vec::<u8>::try_from(&super::rng_states().unwrap()[0].1).unwrap()
}

/// A save reuses the copy an earlier save left when the generator drew nothing since, so it
/// must tell a generator that drew a whole turn of its 624 words (back at the same position,
/// every word changed) from one that drew nothing: restoring the earlier copy would go back
/// too far.
#[test]
fn a_generator_back_at_its_position_after_a_whole_turn_is_saved_anew() {
    let _draws = super::rng::drawing();
    let draw = || drop(Tensor::rand([1], (tch::Kind::Float, tch::Device::Cpu)));
    tch::manual_seed(11);
    draw();
    drop(super::Generators::save().unwrap());
    let start = cpu_position();
    let mut turns = 0;
    loop {
        draw();
        turns += 1;
        assert!(turns <= 624, "the position came back within one turn");
        if cpu_position() == start {
            break;
        }
    }
    let here = cpu_state();
    let saved = super::Generators::save().unwrap();
    draw();
    saved.restore().unwrap();
    assert_eq!(
        cpu_state(),
        here,
        "restored to the second save, not the first"
    );

    // Nothing drawn between two saves: the second restores the same state.
    drop(saved);
    let saved = super::Generators::save().unwrap();
    let a = Tensor::rand([8], (tch::Kind::Float, tch::Device::Cpu));
    saved.restore().unwrap();
    let b = Tensor::rand([8], (tch::Kind::Float, tch::Device::Cpu));
    assert!(a.equal(&b), "the same draws after a restore");
}
