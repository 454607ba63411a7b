//! The `strip-release` feature: without debug assertions the checks compile away (no reads,
//! no failure, no check code in the binary), while clipping, epsilon protection and loss
//! scaling stay. `scripts/test.sh` runs this file in the normal test profile and again with
//! `--profile strip --features strip-release`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::testing::count_host_reads;
use stepguard::{guarded_step, CHECKS_ENABLED};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

#[guarded_step(max_norm = 0.01)]
fn step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Tensor {
    let _ = vs;
    let logits = net.forward(x);
    let loss = logits.cross_entropy_for_logits(y) / (x.abs().sum(Kind::Float) * 0.0);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss
}

#[test]
fn checks_follow_the_strip_constant_and_the_math_stays() {
    let stripped = cfg!(all(feature = "strip-release", not(debug_assertions)));
    assert_eq!(CHECKS_ENABLED, !stripped);

    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 2, 8);
    let mut opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));

    // Epsilon protection stays: the division by an exact zero gives a finite loss.
    let (loss, reads) = count_host_reads(|| step(&mut opt, &vs, &net, &x, &y));
    assert!(f64::try_from(&loss).unwrap().is_finite());
    assert_eq!(
        reads,
        if stripped {
            0
        } else {
            stepguard_suite::reads_per_step(1)
        }
    );
    // Clipping stays: the grads left by the step have a global norm of at most max_norm.
    let norm = f64::try_from(stepguard::grad_norm(opt.trainable_variables(), 2).unwrap()).unwrap();
    assert!(norm <= 0.01 * (1.0 + 1e-4), "clipped to {norm}");

    // A NaN batch: caught with checks, unnoticed when stripped.
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    let r = catch_unwind(AssertUnwindSafe(|| {
        count_host_reads(|| step(&mut opt, &vs, &net, &bad, &y))
    }));
    match r {
        Ok((_, reads)) => assert!(
            stripped && reads == 0,
            "only a stripped build lets it through"
        ),
        Err(_) => assert!(!stripped, "checks on: the NaN batch is caught"),
    }
}

#[guarded_step(loss_scale = "dynamic", on_nan = "skip", spike = 6, rollback = 5)]
fn scaled_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn loss_scaling_stays_and_spike_detection_and_rollback_go_with_the_checks() {
    let site = stepguard::registry()
        .find(|s| s.name() == "scaled_step")
        .expect("registered");
    let c = site.effective_config();
    assert!(c.loss_scale.is_some(), "training math stays");
    assert_eq!(c.spike.is_some(), CHECKS_ENABLED);
    assert_eq!(c.rollback.is_some(), CHECKS_ENABLED);

    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 2, 8);
    let mut opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));
    let before: Vec<Tensor> = vs.trainable_variables().iter().map(Tensor::copy).collect();
    scaled_step(&mut opt, &vs, &net, &x, &y);
    assert_eq!(
        site.state().read_loss_scale(),
        Some(65536.0),
        "the loss was scaled"
    );
    // Unscaled before the update: the parameters moved by lr * grad, not 65536x that.
    let moved = vs
        .trainable_variables()
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 0.0 && moved < 0.1, "{moved}");
}

/// Every check: the forward check binds each tensor `let` makes.
#[guarded_step(checks = "all", max_norm = 1)]
fn all_checks(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Tensor {
    let _ = vs;
    let logits = net.forward(x);
    let loss = logits.cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    loss
}

/// The names in the symbol table (`.symtab`) of an ELF64 little-endian file: the functions
/// linked into it (the linker drops the ones nothing calls; debug info would still name them).
fn linked_symbols(file: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(file[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(file[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(file[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(
        &file[..6],
        b"\x7fELF\x02\x01",
        "an ELF64 little-endian binary"
    );
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut names = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 2 {
            continue; // SHT_SYMTAB only
        }
        let (off, size, link, entsize) = (
            u64_at(sh + 0x18),
            u64_at(sh + 0x20),
            u32_at(sh + 0x28),
            u64_at(sh + 0x38),
        );
        let strtab = u64_at(section(link) + 0x18);
        for sym in (off..off + size).step_by(entsize) {
            let start = strtab + u32_at(sym);
            let end = start + file[start..].iter().position(|b| *b == 0).unwrap();
            names.push(String::from_utf8_lossy(&file[start..end]).into_owned());
        }
    }
    names
}

#[test]
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn stripped_checks_are_not_in_the_binary() {
    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 2, 8);
    let mut opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));
    let (loss, reads) = count_host_reads(|| all_checks(&mut opt, &vs, &net, &x, &y));
    assert!(f64::try_from(&loss).unwrap().is_finite());
    if !CHECKS_ENABLED {
        assert_eq!(reads, 0);
    }
    let norm = f64::try_from(stepguard::grad_norm(opt.trainable_variables(), 2).unwrap()).unwrap();
    assert!(norm <= 1.0 + 1e-4, "clipped to {norm}");

    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let symbols = linked_symbols(&exe);
    assert!(
        symbols
            .iter()
            .any(|s| s.contains("clip_grad_norm") || s.contains("StepGuard")),
        "the symbol table is read"
    );
    // The forward check (only `all_checks` has it) is compiled in exactly when checks are
    // enabled: its context method, the guard's, and the probe that calls them.
    for check in ["3Ctx4bind", "9StepGuard4bind", "7Tensors4bind"] {
        let linked: Vec<&String> = symbols.iter().filter(|s| s.contains(check)).collect();
        assert_eq!(
            !linked.is_empty(),
            CHECKS_ENABLED,
            "{check}: {linked:?} (checks enabled: {CHECKS_ENABLED})"
        );
    }
}
