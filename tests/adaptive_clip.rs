//! Adaptive clipping (`max_norm = "adaptive"`, ZClip-like): the global grad norm is clipped to
//! `mean + sigmas * std` of its running statistics, which follow the clipped norms; checked
//! step by step against a host replica of the statistics.

use stepguard::{guarded_step, AdaptiveClip, Config, GuardState, StepGuard};
use stepguard_suite::test_device;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

/// The statistics as the runtime keeps them: a cumulative mean, then an EMA over `window`;
/// the deviation floored at 5 % of the mean.
struct Replica {
    count: f64,
    mean: f64,
    var: f64,
}

impl Replica {
    fn threshold(&self, a: &AdaptiveClip) -> f64 {
        if self.count < f64::from(a.warmup) {
            return f64::INFINITY;
        }
        let std = self.var.sqrt().max(self.mean.abs() * 0.05);
        self.mean + a.sigmas * std
    }
    fn accept(&mut self, x: f64, a: &AdaptiveClip) {
        let alpha = (1.0 / (self.count + 1.0)).max(2.0 / (f64::from(a.window) + 1.0));
        let delta = x - self.mean;
        self.mean += alpha * delta;
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta);
        self.count += 1.0;
    }
}

fn setup() -> (nn::VarStore, nn::Sequential, Tensor, Tensor) {
    // The global RNG, shared by the tests running in parallel: draw under a lock, so that
    // each test sees its own seeded numbers.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let vs = nn::VarStore::new(test_device());
    let p = vs.root();
    let net = nn::seq()
        .add(nn::linear(&p / "l1", 4, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&p / "out", 16, 2, Default::default()));
    let x = Tensor::randn([32, 4], (Kind::Float, test_device()));
    let y = Tensor::randn([32, 2], (Kind::Float, test_device()));
    (vs, net, x, y)
}

fn grad_norm(vs: &nn::VarStore) -> f64 {
    stepguard::grad_norm(vs.trainable_variables(), 2)
        .unwrap()
        .double_value(&[])
}

#[test]
fn the_threshold_follows_the_running_statistics_of_the_clipped_norms() {
    follows_the_statistics();
}

#[test]
fn the_same_on_the_aten_path() {
    // The multi-tensor operators, as on a GPU (the CPU fast path off on this thread).
    stepguard::testing::set_cpu_fast_path(false);
    follows_the_statistics();
    stepguard::testing::set_cpu_fast_path(true);
}

fn follows_the_statistics() {
    let (vs, net, x, y) = setup();
    let a = AdaptiveClip::new(2.0, 10, 20);
    let config = Config::DEFAULT.with_adaptive_clip(a);
    let state = GuardState::new();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let mut replica = Replica {
        count: 0.0,
        mean: 0.0,
        var: 0.0,
    };
    let mut clipped = 0;
    for step in 0..60 {
        // Every 7th batch after warm-up has its targets scaled: its gradient jumps.
        let scale = if step > 12 && step % 7 == 0 {
            30.0
        } else {
            1.0
        };
        let mut g = StepGuard::begin(&config, "adaptive", &state);
        let loss = (net.forward(&x) - &y * scale).square().mean(Kind::Float);
        g.loss(&loss);
        opt.zero_grad();
        loss.backward();
        let params = vs.trainable_variables();
        g.before_update(&params).expect("finite");
        let (raw, thr) = (
            g.last_grad_norm().unwrap(),
            g.last_clip_threshold().unwrap(),
        );
        let want = replica.threshold(&a);
        if want.is_finite() {
            assert!(
                (thr - want).abs() <= 1e-6 * want,
                "step {step}: {thr} vs {want}"
            );
        } else {
            assert!(thr.is_infinite(), "step {step}: warm-up");
        }
        let applied = grad_norm(&vs);
        if raw > thr {
            clipped += 1;
            assert!(
                (applied - thr).abs() <= 1e-4 * thr,
                "step {step}: clipped to {applied}, not {thr}"
            );
        } else {
            assert!(
                (applied - raw).abs() <= 1e-5 * raw.max(1e-6),
                "step {step}: untouched"
            );
        }
        replica.accept(raw.min(thr), &a);
        opt.step();
        g.after_update(&params);
    }
    assert!(clipped >= 5, "the scaled batches were clipped ({clipped})");
}

#[guarded_step(max_norm = "adaptive", clip_sigmas = 2)]
fn adaptive_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = (net.forward(x) - y).square().mean(Kind::Float);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[test]
fn the_attribute_clips_an_exploding_batch_to_the_running_threshold() {
    let (vs, net, x, y) = setup();
    let mut opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    let site = stepguard::registry()
        .find(|s| s.name() == "adaptive_step")
        .unwrap();
    for _ in 0..40 {
        adaptive_step(&mut opt, &vs, &net, &x, &y);
    }
    let before = site.stats().clipped;
    let w0: Vec<Tensor> = vs.trainable_variables().iter().map(Tensor::copy).collect();
    adaptive_step(&mut opt, &vs, &net, &x, &(&y * 1000.0));
    assert_eq!(site.stats().clipped, before + 1, "{}", stepguard::report());
    let moved: f64 = vs
        .trainable_variables()
        .iter()
        .zip(&w0)
        .map(|(a, b)| (a - b).square().sum(Kind::Float).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    let raw = site.stats().last_grad_norm.unwrap();
    // The update is lr times the clipped norm: far below lr times the raw one.
    assert!(raw > 100.0, "an exploding batch ({raw})");
    assert!(
        moved < 0.05 * raw / 10.0,
        "moved {moved}, raw grad norm {raw}"
    );
}

#[test]
fn adaptive_clipping_refuses_what_it_cannot_do() {
    let c = Config::DEFAULT
        .with_adaptive_clip(AdaptiveClip::DEFAULT)
        .with_sync(stepguard::Sync::Deferred);
    assert_eq!(c.validate(), Err(stepguard::ConfigError::AdaptiveClip));
    let c = Config::DEFAULT.with_adaptive_clip(AdaptiveClip::new(0.0, 1, 10));
    assert!(c.validate().is_err());
    assert!(Config::DEFAULT
        .with_adaptive_clip(AdaptiveClip::DEFAULT)
        .validate()
        .is_ok());
}
