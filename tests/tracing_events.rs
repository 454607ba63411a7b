//! stepguard's `tracing` events reach the program's own subscriber: failures at ERROR,
//! skipped steps at WARN, clipping at DEBUG, with structured fields; a checkpoint's notices at
//! WARN.

use stepguard::{guarded_step, GuardError};
use stepguard_suite::capture_events;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

#[guarded_step(max_norm = 1e-6, on_nan = skip(max = 1))]
fn step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn events_carry_function_step_check_and_tensors() {
    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 1, 8);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    let ((), log) = capture_events(tracing::Level::DEBUG, || {
        step(&mut opt, &vs, &net, &x, &y).unwrap(); // clipped (max_norm is tiny)
        step(&mut opt, &vs, &net, &bad, &y).unwrap(); // skipped
        assert!(step(&mut opt, &vs, &net, &bad, &y).is_err()); // escalated
    });
    let line = |level: &str, what: &str| {
        log.lines()
            .find(|l| l.contains(level) && l.contains(what))
            .unwrap_or_else(|| panic!("no {level} {what} in:\n{log}"))
            .to_string()
    };
    let clip = line("DEBUG", "clipped gradients");
    assert!(
        clip.contains("function=\"step\"") && clip.contains("max_norm=1e-6"),
        "{clip}"
    );
    let skip = line("WARN", "skipped step 1");
    assert!(
        skip.contains("check=\"loss\"")
            && skip.contains("tensors=loss")
            && skip.contains("consecutive=1"),
        "{skip}"
    );
    let fail = line("ERROR", "non-finite loss");
    assert!(fail.contains("step=2") && fail.contains("cause="), "{fail}");
}

/// f32 weights, the forward under a bf16 autocast: loss scaling is needless there.
#[guarded_step(loss_scale = "dynamic")]
fn bf16_autocast_scaled(opt: &mut nn::Optimizer, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    let logits = stepguard::amp::autocast(x.device(), Kind::BFloat16, || net.forward(x)).unwrap();
    let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

/// The same in f32, run right after the bf16 one: not taken for a bf16 forward.
#[guarded_step(loss_scale = "dynamic")]
fn f32_scaled(opt: &mut nn::Optimizer, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

/// bf16 weights and a loss kept in bf16 (tch's `cross_entropy_for_logits` would give f32).
#[guarded_step(loss_scale = "dynamic")]
fn bf16_loss_scaled(opt: &mut nn::Optimizer, net: &nn::Sequential, x: &Tensor) {
    let loss = net.forward(x).square().mean(Kind::BFloat16);
    opt.backward_step(&loss);
}

#[test]
fn loss_scale_with_a_bf16_forward_is_noted_once() {
    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 1, 8);
    let mut opt = nn::Sgd::default().build(&vs, 0.01).unwrap();
    let mut vs16 = nn::VarStore::new(d);
    let net16 = stepguard_suite::mlp(&vs16.root(), 1, 8);
    vs16.bfloat16();
    let mut opt16 = nn::Sgd::default().build(&vs16, 0.01).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));
    let x16 = x.to_kind(Kind::BFloat16);
    let ((), log) = capture_events(tracing::Level::WARN, || {
        for _ in 0..20 {
            bf16_autocast_scaled(&mut opt, &net, &x, &y);
            f32_scaled(&mut opt, &net, &x, &y);
            bf16_loss_scaled(&mut opt16, &net16, &x16);
        }
    });
    let notes = |f: &str| {
        log.lines()
            .filter(|l| {
                l.contains("WARN") && l.contains(&format!("`{f}` scales a loss computed in bf16"))
            })
            .count()
    };
    assert_eq!(notes("bf16_autocast_scaled"), 1, "{log}");
    assert_eq!(notes("bf16_loss_scaled"), 1, "{log}");
    assert_eq!(notes("f32_scaled"), 0, "{log}");
    assert!(
        log.contains("needs no loss scaling (it is for f16)"),
        "{log}"
    );
}

/// A checkpoint saved with tch's `nn::Optimizer`, whose state it cannot read: said at WARN.
#[test]
fn a_checkpoint_without_the_optimizers_state_says_so() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tracing_events-checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
    let vs = nn::VarStore::new(stepguard_suite::test_device());
    let _net = stepguard_suite::mlp(&vs.root(), 1, 8);
    let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let store = stepguard::checkpoint::Checkpoints::new(&dir);
    let (saved, log) = capture_events(tracing::Level::DEBUG, || {
        store.save_run(1, &vs, Some(&opt), &0u64)
    });
    saved.unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("optimizer's state (momentum, moments)")),
        "{log}"
    );
}
