//! `#[guarded_step]` on step functions shaped like the ones people write with tch.
//!
//! For each shape: the guarded function leaves parameters bitwise identical to the same
//! function unannotated when nothing is wrong, and a planted fault is caught by the right check
//! with the right name, or survived under `skip` with the parameters untouched.

#![allow(clippy::result_large_err)] // GuardError is returned only on failure

use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::optim::GuardedOptimizer;
use stepguard::testing::count_host_reads;
use stepguard::{guarded_step, Check, Diagnosis, GuardError};
use stepguard_suite::{mlp, reads_per_step, test_device};
use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Kind, Tensor};

/// Defines the same function twice: `$g` with the attributes, `$p` without.
macro_rules! twin {
    ($(#[$a:meta])* fn $g:ident / $p:ident ($($args:tt)*) $(-> $r:ty)? { $($body:tt)* }) => {
        $(#[$a])* fn $g ($($args)*) $(-> $r)? { $($body)* }
        #[allow(dead_code)]
        fn $p ($($args)*) $(-> $r)? { $($body)* }
    };
}

/// Every variable's bits, by name (Debug prints a checksum per tensor, not the values).
#[derive(PartialEq)]
struct Snapshot(Vec<(String, Vec<u32>)>);

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sums: Vec<(&str, u64)> = self
            .0
            .iter()
            .map(|(n, b)| (n.as_str(), b.iter().map(|x| *x as u64).sum::<u64>()))
            .collect();
        write!(f, "{sums:?}")
    }
}

fn bits(vs: &nn::VarStore) -> Snapshot {
    Snapshot(bits_raw(vs))
}

fn bits_raw(vs: &nn::VarStore) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let b = Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).flatten(0, -1)).unwrap();
            (n, b.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

fn setup(seed: i64, lr: f64) -> (nn::VarStore, nn::Sequential, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = mlp(&vs.root(), 2, 16);
    // Same initial weights for every run with the same seed, whatever other tests do.
    tch::no_grad(|| {
        for (i, (_, mut t)) in sorted(&vs).into_iter().enumerate() {
            let g = Tensor::randn(t.size(), (Kind::Float, tch::Device::Cpu));
            let _ = g; // shape only
            let n = t.numel() as i64;
            let vals = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu))
                * (0.37 + seed as f64 + i as f64))
                .sin()
                * 0.2;
            t.copy_(&vals.reshape(t.size()).to_device(t.device()));
        }
    });
    let opt = nn::Sgd::default().build(&vs, lr).unwrap();
    (vs, net, opt)
}

fn sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn batch(n: i64, seed: f64) -> (Tensor, Tensor) {
    let d = test_device();
    let x = ((Tensor::arange(n * 64, (Kind::Float, d)) * seed).sin()).reshape([n, 64]);
    let y = Tensor::arange(n, (Kind::Int64, d)).remainder(10);
    (x, y)
}

fn panic_text(r: std::thread::Result<()>) -> String {
    let e = r.expect_err("the guard panicked");
    e.downcast_ref::<String>().cloned().unwrap_or_default()
}

// --- 1. the backward_step one-liner in a batch loop ----------------------------------------

twin! {
    #[guarded_step(max_norm = 5)]
    fn one_liner / one_liner_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, batches: &[(Tensor, Tensor)]) {
        let _ = vs;
        for (x, y) in batches {
            let loss = net.forward(x).cross_entropy_for_logits(y);
            opt.backward_step(&loss);
        }
    }
}

#[guarded_step]
fn one_liner_noclip(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    batches: &[(Tensor, Tensor)],
) {
    let _ = vs;
    for (x, y) in batches {
        let loss = net.forward(x).cross_entropy_for_logits(y);
        opt.backward_step(&loss);
    }
}

#[test]
fn backward_step_loop_is_identical_and_names_a_nan_batch() {
    let batches: Vec<_> = (0..3).map(|i| batch(8, 0.1 + i as f64)).collect();
    let (vs_a, net_a, mut opt_a) = setup(1, 0.05);
    let (vs_b, net_b, mut opt_b) = setup(1, 0.05);
    for _ in 0..3 {
        one_liner_plain(&mut opt_a, &vs_a, &net_a, &batches);
        let ((), reads) =
            count_host_reads(|| one_liner_noclip(&mut opt_b, &vs_b, &net_b, &batches));
        assert_eq!(
            reads,
            reads_per_step(3),
            "one host read per optimizer step (none on CPU)"
        );
    }
    assert_eq!(bits(&vs_a), bits(&vs_b));

    let (vs, net, mut opt) = setup(1, 0.05);
    let (x, y) = batch(8, 0.3);
    let _ = x.narrow(0, 2, 1).fill_(f64::NAN);
    let before = bits(&vs);
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        one_liner(&mut opt, &vs, &net, &[(x, y)])
    })));
    assert!(
        text.contains("non-finite loss in `one_liner`") && text.contains("check `loss`"),
        "{text}"
    );
    assert!(text.contains("forward pass produced it"), "{text}");
    assert_eq!(before, bits(&vs), "nothing was applied");
}

// --- 2. explicit zero_grad / backward / step, hand-written cross-entropy ---------------------

twin! {
    #[guarded_step(on_nan = "error")]
    fn explicit / explicit_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) -> Result<f64, GuardError> {
        let _ = vs;
        let p = net.forward(x).softmax(-1, Kind::Float);
        let onehot = y.one_hot(10).to_kind(Kind::Float);
        let loss = -(&onehot * p.log()).sum(Kind::Float) / (x.size()[0] as f64);
        opt.zero_grad();
        loss.backward();
        opt.step();
        Ok(f64::try_from(&loss).unwrap())
    }
}

twin! {
    #[guarded_step(on_nan = "error", protect = "none")]
    fn explicit_unprotected / explicit_unprotected_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) -> Result<f64, GuardError> {
        let _ = vs;
        let p = net.forward(x).softmax(-1, Kind::Float);
        let onehot = y.one_hot(10).to_kind(Kind::Float);
        let loss = -(&onehot * p.log()).sum(Kind::Float) / (x.size()[0] as f64);
        opt.zero_grad();
        loss.backward();
        opt.step();
        Ok(f64::try_from(&loss).unwrap())
    }
}

#[test]
fn explicit_step_is_identical_when_finite() {
    let (x, y) = batch(8, 0.7);
    let (vs_a, net_a, mut opt_a) = setup(2, 0.05);
    let (vs_b, net_b, mut opt_b) = setup(2, 0.05);
    for _ in 0..4 {
        let a = explicit_plain(&mut opt_a, &vs_a, &net_a, &x, &y).unwrap();
        let (b, reads) = count_host_reads(|| explicit(&mut opt_b, &vs_b, &net_b, &x, &y));
        assert_eq!(a.to_bits(), b.unwrap().to_bits());
        assert_eq!(
            reads,
            reads_per_step(1),
            "loss + grads + previous params in one read"
        );
    }
    assert_eq!(bits(&vs_a), bits(&vs_b));
}

#[test]
fn log_of_zero_is_caught_unprotected_and_survived_protected() {
    // Huge logits: the softmax underflows to exact zeros, log(0) = -inf, 0 * -inf = NaN.
    let (x, y) = batch(8, 0.7);
    let x = x * 1e6;
    let (vs, net, mut opt) = setup(3, 0.05);
    let before = bits(&vs);
    let err = explicit_unprotected(&mut opt, &vs, &net, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Loss);
    assert_eq!(err.function, "explicit_unprotected");
    assert_eq!(
        err.diagnosis,
        Diagnosis::Forward {
            protected: Some(false)
        }
    );
    assert!(
        err.to_string().contains("enable epsilon protection"),
        "{err}"
    );
    assert_eq!(before, bits(&vs), "returned before any update");

    let loss = explicit(&mut opt, &vs, &net, &x, &y).expect("epsilon protection keeps it finite");
    assert!(loss.is_finite());
    assert!(vs
        .variables()
        .values()
        .all(|t| bool::try_from(t.isfinite().all()).unwrap()));
    // The unannotated function really produces NaN here.
    let (vs2, net2, mut opt2) = setup(3, 0.05);
    assert!(explicit_unprotected_plain(&mut opt2, &vs2, &net2, &x, &y)
        .unwrap()
        .is_nan());
}

// --- 3. a struct method with two optimizers in fields (actor/critic) and env.step(a) --------

struct Env {
    steps: u32,
}

impl Env {
    /// A reinforcement-learning environment's step: must not be touched by the rewrite.
    fn step(&mut self, action: &Tensor) -> Tensor {
        self.steps += 1;
        action.sum(Kind::Float).detach() * 0.0 + 1.0
    }
}

/// An LR scheduler: its zero-argument `step()` is not an optimizer's.
struct Scheduler {
    epoch: u32,
}

impl Scheduler {
    fn step(&mut self) -> u32 {
        self.epoch += 1;
        self.epoch
    }
}

struct Agent {
    actor_vs: nn::VarStore,
    critic_vs: nn::VarStore,
    actor: nn::Linear,
    critic: nn::Linear,
    actor_opt: nn::Optimizer,
    critic_opt: nn::Optimizer,
    sched: Scheduler,
}

impl Agent {
    fn new(lr: f64) -> Self {
        let actor_vs = nn::VarStore::new(test_device());
        let critic_vs = nn::VarStore::new(test_device());
        let actor = nn::linear(actor_vs.root() / "actor", 4, 2, Default::default());
        let critic = nn::linear(critic_vs.root() / "critic", 4, 1, Default::default());
        tch::no_grad(|| {
            for vs in [&actor_vs, &critic_vs] {
                for (i, (_, mut t)) in sorted(vs).into_iter().enumerate() {
                    let n = t.numel() as i64;
                    let v = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (1.3 + i as f64))
                        .cos()
                        * 0.3;
                    t.copy_(&v.reshape(t.size()).to_device(t.device()));
                }
            }
        });
        let actor_opt = nn::Adam::default().build(&actor_vs, lr).unwrap();
        let critic_opt = nn::Sgd::default().build(&critic_vs, lr).unwrap();
        Agent {
            actor_vs,
            critic_vs,
            actor,
            critic,
            actor_opt,
            critic_opt,
            sched: Scheduler { epoch: 0 },
        }
    }
}

impl Agent {
    #[guarded_step(on_nan = "error", params = (&self.actor_vs, &self.critic_vs))]
    fn update(&mut self, env: &mut Env, obs: &Tensor) -> Result<u32, GuardError> {
        let action = self.actor.forward(obs).tanh();
        let reward = env.step(&action);
        let value = self.critic.forward(obs).squeeze();
        let critic_loss = (&reward - &value).pow_tensor_scalar(2).mean(Kind::Float);
        self.critic_opt.zero_grad();
        critic_loss.backward();
        self.critic_opt.step();
        let advantage = (&reward - value.detach()).mean(Kind::Float);
        let actor_loss = -(action.mean(Kind::Float) * advantage);
        self.actor_opt.backward_step(&actor_loss);
        Ok(self.sched.step())
    }

    fn update_plain(&mut self, env: &mut Env, obs: &Tensor) -> Result<u32, GuardError> {
        let action = self.actor.forward(obs).tanh();
        let reward = env.step(&action);
        let value = self.critic.forward(obs).squeeze();
        let critic_loss = (&reward - &value).pow_tensor_scalar(2).mean(Kind::Float);
        self.critic_opt.zero_grad();
        critic_loss.backward();
        self.critic_opt.step();
        let advantage = (&reward - value.detach()).mean(Kind::Float);
        let actor_loss = -(action.mean(Kind::Float) * advantage);
        self.actor_opt.backward_step(&actor_loss);
        Ok(self.sched.step())
    }
}

#[test]
fn actor_critic_method_is_identical_and_leaves_env_and_scheduler_alone() {
    let obs = (Tensor::arange(32, (Kind::Float, test_device())) * 0.3)
        .sin()
        .reshape([8, 4]);
    let (mut a, mut b) = (Agent::new(0.01), Agent::new(0.01));
    let (mut env_a, mut env_b) = (Env { steps: 0 }, Env { steps: 0 });
    for i in 1..=3 {
        assert_eq!(a.update_plain(&mut env_a, &obs).unwrap(), i);
        let (r, reads) = count_host_reads(|| b.update(&mut env_b, &obs));
        assert_eq!(r.unwrap(), i, "the scheduler's step() ran unchanged");
        assert_eq!(reads, reads_per_step(2), "one read per optimizer step");
    }
    assert_eq!(env_b.steps, 3);
    assert_eq!(bits(&a.actor_vs), bits(&b.actor_vs));
    assert_eq!(bits(&a.critic_vs), bits(&b.critic_vs));

    // A NaN planted in the critic's weights: named, and caught before any update.
    tch::no_grad(|| {
        let _ = b.critic_vs.variables()["critic.weight"]
            .narrow(1, 0, 1)
            .fill_(f64::NAN);
    });
    let actor_before = bits(&b.actor_vs);
    let err = b.update(&mut env_b, &obs).unwrap_err();
    assert_eq!(err.check, Check::Params);
    assert_eq!(err.tensors[0].name, "critic.weight");
    assert_eq!(err.tensors[0].nan, 1);
    assert_eq!(actor_before, bits(&b.actor_vs));
}

// --- 4. a GAN: two VarStores, two optimizers, two steps ------------------------------------

struct Gan {
    g: nn::Linear,
    d: nn::Linear,
}

twin! {
    #[guarded_step(max_norm = 1, norm_type = "inf")]
    fn gan_step / gan_step_plain (gan: &Gan, g_vs: &nn::VarStore, d_vs: &nn::VarStore, g_opt: &mut nn::Optimizer, d_opt: &mut nn::Optimizer, z: &Tensor, real: &Tensor) {
        let _ = (g_vs, d_vs);
        let fake = gan.g.forward(z);
        let d_loss = (gan.d.forward(real).sigmoid().log() + (1.0f64 - gan.d.forward(&fake.detach()).sigmoid()).log()).mean(Kind::Float).neg();
        d_opt.backward_step(&d_loss);
        let g_loss = gan.d.forward(&fake).sigmoid().log().mean(Kind::Float).neg();
        g_opt.zero_grad();
        g_loss.backward();
        g_opt.step();
    }
}

/// `gan_step` without the attribute, with the clipping the attribute asks for written out:
/// the global inf-norm of each optimizer's grads clipped to 1 before its step.
fn gan_step_clipped_by_hand(
    gan: &Gan,
    g_opt: &mut nn::Optimizer,
    d_opt: &mut nn::Optimizer,
    z: &Tensor,
    real: &Tensor,
) {
    let clip = |opt: &nn::Optimizer| {
        stepguard::clip_grad_norm(opt.trainable_variables(), 1.0, stepguard::NormType::Inf).unwrap()
    };
    let fake = gan.g.forward(z);
    let d_loss = (gan.d.forward(real).sigmoid().log()
        + (1.0f64 - gan.d.forward(&fake.detach()).sigmoid()).log())
    .mean(Kind::Float)
    .neg();
    d_opt.zero_grad();
    d_loss.backward();
    let _ = clip(d_opt);
    d_opt.step();
    let g_loss = gan.d.forward(&fake).sigmoid().log().mean(Kind::Float).neg();
    g_opt.zero_grad();
    g_loss.backward();
    let _ = clip(g_opt);
    g_opt.step();
}

fn gan(
    seed: f64,
) -> (
    Gan,
    nn::VarStore,
    nn::VarStore,
    nn::Optimizer,
    nn::Optimizer,
) {
    let (g_vs, d_vs) = (
        nn::VarStore::new(test_device()),
        nn::VarStore::new(test_device()),
    );
    let g = nn::linear(g_vs.root() / "gen", 3, 4, Default::default());
    let d = nn::linear(d_vs.root() / "disc", 4, 1, Default::default());
    tch::no_grad(|| {
        for vs in [&g_vs, &d_vs] {
            for (_, mut t) in sorted(vs) {
                let n = t.numel() as i64;
                let v = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * seed).sin() * 0.5;
                t.copy_(&v.reshape(t.size()).to_device(t.device()));
            }
        }
    });
    let g_opt = nn::Adam::default().build(&g_vs, 1e-2).unwrap();
    let d_opt = nn::Adam::default().build(&d_vs, 1e-2).unwrap();
    (Gan { g, d }, g_vs, d_vs, g_opt, d_opt)
}

#[test]
fn gan_steps_clip_and_name_the_generator_or_discriminator() {
    let d = test_device();
    let z = (Tensor::arange(24, (Kind::Float, d)) * 0.7)
        .sin()
        .reshape([8, 3]);
    // Real samples up to 4 in size: some grads exceed 1, and the inf-norm clipping engages.
    let real = (Tensor::arange(32, (Kind::Float, d)) * 0.9)
        .cos()
        .reshape([8, 4])
        * 4.0;
    let (ga, gva, dva, mut goa, mut doa) = gan(0.4);
    let (gb, gvb, dvb, mut gob, mut dob) = gan(0.4);
    let (gc, gvc, dvc, mut goc, mut doc) = gan(0.4);
    for _ in 0..3 {
        gan_step_plain(&ga, &gva, &dva, &mut goa, &mut doa, &z, &real);
        gan_step(&gb, &gvb, &dvb, &mut gob, &mut dob, &z, &real);
        gan_step_clipped_by_hand(&gc, &mut goc, &mut doc, &z, &real);
    }
    // Clipping (inf-norm 1) changes the trajectory unless no grad exceeds 1: compare norms.
    let site = stepguard::registry()
        .find(|s| s.name() == "gan_step")
        .expect("registered");
    assert_eq!(site.stats().calls, 3);
    assert!(site.config().max_norm == Some(1.0));
    // Here some grads exceed 1: the guarded step is bitwise the plain step with the clipping
    // written out, and not the plain step without it.
    assert!(site.stats().clipped > 0, "clipping engaged");
    assert_eq!(
        bits(&gvb),
        bits(&gvc),
        "generator: guarded = clipped by hand"
    );
    assert_eq!(
        bits(&dvb),
        bits(&dvc),
        "discriminator: guarded = clipped by hand"
    );
    assert_ne!(
        (bits(&gva), bits(&dva)),
        (bits(&gvb), bits(&dvb)),
        "the unclipped plain step goes elsewhere"
    );

    tch::no_grad(|| {
        let _ = gvb.variables()["gen.bias"]
            .shallow_clone()
            .fill_(f64::INFINITY);
    });
    let before = (bits(&gvb), bits(&dvb));
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        gan_step(&gb, &gvb, &dvb, &mut gob, &mut dob, &z, &real)
    })));
    assert!(
        text.contains("gen.bias"),
        "names the generator's tensor: {text}"
    );
    assert_eq!(before, (bits(&gvb), bits(&dvb)), "neither update applied");

    // The same fault in the discriminator: named as the discriminator's.
    tch::no_grad(|| {
        let _ = dvc.variables()["disc.weight"]
            .narrow(1, 2, 1)
            .fill_(f64::NAN);
    });
    let before = (bits(&gvc), bits(&dvc));
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        gan_step(&gc, &gvc, &dvc, &mut goc, &mut doc, &z, &real)
    })));
    assert!(
        text.contains("disc.weight") && !text.contains("gen."),
        "names the discriminator's tensor: {text}"
    );
    assert_eq!(before, (bits(&gvc), bits(&dvc)), "neither update applied");
}

// --- 5. a custom optimizer implementing the runtime trait ----------------------------------

struct PlainSgd {
    params: Vec<Tensor>,
    lr: f64,
}

impl PlainSgd {
    fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    fn step(&mut self) {
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.grad();
                let _ = p.g_sub_(&(g * self.lr));
            }
        });
    }
}

impl GuardedOptimizer for PlainSgd {
    fn guard_params(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }
    fn guard_zero_grad(&mut self) {
        self.zero_grad()
    }
    fn guard_step(&mut self) {
        self.step()
    }
}

twin! {
    #[guarded_step(on_nan = skip(max = 2))]
    fn custom / custom_plain (opt: &mut PlainSgd, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
        let _ = vs;
        let loss = net.forward(x).cross_entropy_for_logits(y);
        opt.zero_grad();
        loss.backward();
        opt.step();
    }
}

#[test]
fn custom_optimizer_skips_bad_batches_then_escalates() {
    let (x, y) = batch(8, 0.2);
    let (vs_a, net_a, _) = setup(4, 0.1);
    let (vs_b, net_b, _) = setup(4, 0.1);
    let mut oa = PlainSgd {
        params: vs_a.trainable_variables(),
        lr: 0.1,
    };
    let mut ob = PlainSgd {
        params: vs_b.trainable_variables(),
        lr: 0.1,
    };
    for _ in 0..3 {
        custom_plain(&mut oa, &vs_a, &net_a, &x, &y);
        custom(&mut ob, &vs_b, &net_b, &x, &y);
    }
    assert_eq!(bits(&vs_a), bits(&vs_b));

    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::INFINITY);
    let site = || {
        stepguard::registry()
            .find(|s| s.name() == "custom")
            .unwrap()
            .stats()
    };
    let before = bits(&vs_b);
    let skipped0 = site().skipped;
    custom(&mut ob, &vs_b, &net_b, &bad, &y);
    custom(&mut ob, &vs_b, &net_b, &bad, &y);
    assert_eq!(
        before,
        bits(&vs_b),
        "skipped steps leave parameters bitwise untouched"
    );
    assert_eq!(site().skipped - skipped0, 2);
    assert!(
        ob.params.iter().all(|p| {
            let g = p.grad();
            !g.defined() || f64::try_from(g.abs().sum(Kind::Float)).unwrap() == 0.0
        }),
        "grads zeroed"
    );
    // A finite step resets the count...
    custom(&mut ob, &vs_b, &net_b, &x, &y);
    assert_ne!(before, bits(&vs_b));
    let before = bits(&vs_b);
    custom(&mut ob, &vs_b, &net_b, &bad, &y);
    custom(&mut ob, &vs_b, &net_b, &bad, &y);
    // ...and the third consecutive bad step escalates to a panic.
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        custom(&mut ob, &vs_b, &net_b, &bad, &y)
    })));
    assert!(text.contains("skipped 2 consecutive steps"), "{text}");
    assert_eq!(before, bits(&vs_b));
}

// --- 6. a generic step over M: ModuleT with a where-clause, impl Trait argument -------------

#[guarded_step(max_norm = 1e9)]
#[allow(clippy::multiple_bound_locations)] // a where-clause on purpose
fn generic<M: ModuleT>(
    net: &M,
    opt: &mut nn::Optimizer,
    x: &Tensor,
    y: impl std::borrow::Borrow<Tensor>,
) -> impl Into<f64>
where
    M: Send,
{
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y.borrow());
    opt.backward_step_clip_norm(&loss, 1e9);
    f64::try_from(loss).unwrap()
}

#[allow(clippy::multiple_bound_locations)]
fn generic_plain<M: ModuleT>(
    net: &M,
    opt: &mut nn::Optimizer,
    x: &Tensor,
    y: impl std::borrow::Borrow<Tensor>,
) -> impl Into<f64>
where
    M: Send,
{
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y.borrow());
    opt.backward_step_clip_norm(&loss, 1e9);
    f64::try_from(loss).unwrap()
}

#[test]
fn generic_step_is_identical() {
    let (x, y) = batch(8, 0.5);
    let (vs_a, net_a, mut opt_a) = setup(5, 0.05);
    let (vs_b, net_b, mut opt_b) = setup(5, 0.05);
    for _ in 0..3 {
        let a: f64 = generic_plain(&net_a, &mut opt_a, &x, &y).into();
        let b: f64 = generic(&net_b, &mut opt_b, &x, y.shallow_clone()).into();
        assert_eq!(a.to_bits(), b.to_bits());
    }
    assert_eq!(bits(&vs_a), bits(&vs_b));
}

// --- 7. a Result-returning step using `?`, early return, match ----------------------------

#[derive(Debug)]
#[allow(dead_code)] // the payloads are for Debug output
enum TrainError {
    Guard(GuardError),
    Tch(tch::TchError),
}
impl From<GuardError> for TrainError {
    fn from(e: GuardError) -> Self {
        TrainError::Guard(e)
    }
}
impl From<tch::TchError> for TrainError {
    fn from(e: tch::TchError) -> Self {
        TrainError::Tch(e)
    }
}

twin! {
    #[guarded_step(on_nan = "error", max_norm = 3)]
    fn fallible / fallible_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor, mode: u8) -> Result<Option<f64>, TrainError> {
        let _ = vs;
        let logits = net.forward(x);
        let loss = match mode {
            0 => return Ok(None),
            1 => logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)?,
            _ => logits.cross_entropy_for_logits(y),
        };
        let scale = x.f_abs()?.f_mean(Kind::Float)?;
        let loss = loss / &scale;
        opt.zero_grad();
        loss.backward();
        opt.step();
        Ok(Some(f64::try_from(&loss)?))
    }
}

/// `fallible` without the attribute, with its clipping (`max_norm = 3`, L2) written out.
fn fallible_clipped_by_hand(
    opt: &mut nn::Optimizer,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
    mode: u8,
) -> Result<Option<f64>, TrainError> {
    let logits = net.forward(x);
    let loss = match mode {
        0 => return Ok(None),
        1 => logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
            y,
            None::<Tensor>,
            tch::Reduction::Mean,
            -100,
        )?,
        _ => logits.cross_entropy_for_logits(y),
    };
    let scale = x.f_abs()?.f_mean(Kind::Float)?;
    let loss = loss / &scale;
    opt.zero_grad();
    loss.backward();
    let _ = stepguard::clip_grad_norm(opt.trainable_variables(), 3.0, 2).unwrap();
    opt.step();
    Ok(Some(f64::try_from(&loss)?))
}

#[test]
fn result_step_with_question_mark_returns_the_guard_error() {
    let (x, y) = batch(8, 0.9);
    let (vs_a, net_a, mut opt_a) = setup(6, 0.05);
    let (vs_b, net_b, mut opt_b) = setup(6, 0.05);
    for mode in [0, 1, 2, 1] {
        let a = fallible_plain(&mut opt_a, &vs_a, &net_a, &x, &y, mode).unwrap();
        let b = fallible(&mut opt_b, &vs_b, &net_b, &x, &y, mode).unwrap();
        assert_eq!(a.map(f64::to_bits), b.map(f64::to_bits));
    }
    // Clipping at 3 does not engage on this batch (the fixtures are fixed values): bitwise the
    // plain step, unconditionally.
    let site = stepguard::registry()
        .find(|s| s.name() == "fallible")
        .unwrap();
    assert_eq!(site.stats().clipped, 0, "no grad norm above 3 here");
    if site.stats().clipped == 0 {
        assert_eq!(bits(&vs_a), bits(&vs_b));
    }

    // A batch a hundred times smaller: `loss / scale` grows a hundredfold, the grad norm
    // exceeds 3 and the guard clips. Bitwise the plain step with the clipping written out, and
    // not the plain step without it.
    let big = &x * 0.01;
    let (vs_p, net_p, mut opt_p) = setup(6, 0.05);
    let (vs_g, net_g, mut opt_g) = setup(6, 0.05);
    let (vs_h, net_h, mut opt_h) = setup(6, 0.05);
    for mode in [1, 2] {
        let p = fallible_plain(&mut opt_p, &vs_p, &net_p, &big, &y, mode).unwrap();
        let g = fallible(&mut opt_g, &vs_g, &net_g, &big, &y, mode).unwrap();
        let h = fallible_clipped_by_hand(&mut opt_h, &net_h, &big, &y, mode).unwrap();
        assert_eq!(g.map(f64::to_bits), h.map(f64::to_bits));
        let _ = p;
    }
    assert_eq!(site.stats().clipped, 2, "both updates clipped");
    assert_eq!(bits(&vs_g), bits(&vs_h), "guarded = clipped by hand");
    assert_ne!(bits(&vs_g), bits(&vs_p), "the plain step does not clip");

    // Division by zero in the forward: an all-zero batch makes `scale` 0. Protected (the
    // default) it stays finite; the loss check would otherwise catch it.
    let zeros = x.zeros_like();
    let r = fallible(&mut opt_b, &vs_b, &net_b, &zeros, &y, 2)
        .unwrap()
        .unwrap();
    assert!(r.is_finite());
    let r = fallible_plain(&mut opt_a, &vs_a, &net_a, &zeros, &y, 2)
        .unwrap()
        .unwrap();
    assert!(
        !r.is_finite(),
        "unprotected, the same division is not finite"
    );

    // A wrong label index makes `?` return the tch error, untouched by the guard. (On CUDA
    // the same mistake is a device-side assert that ends the process, not an error.)
    if test_device() == tch::Device::Cpu {
        let bad_y = y.full_like(99);
        assert!(matches!(
            fallible(&mut opt_b, &vs_b, &net_b, &x, &bad_y, 1),
            Err(TrainError::Tch(_))
        ));
    }

    // A huge learning rate: caught, named, explained.
    opt_b.set_lr(1e35);
    let mut last = None;
    for _ in 0..3 {
        match fallible(&mut opt_b, &vs_b, &net_b, &x, &y, 2) {
            Err(TrainError::Guard(e)) => {
                last = Some(e);
                break;
            }
            other => {
                other.unwrap();
            }
        }
    }
    let e = last.expect("the huge learning rate is caught within 3 steps");
    assert!(
        matches!(e.diagnosis, Diagnosis::Diverged { .. } | Diagnosis::Update),
        "{e}"
    );
    assert!(e.to_string().contains("learning rate"), "{e}");
}

// --- 8. a manual update under no_grad, parameters from `params = ...` ----------------------

twin! {
    #[guarded_step(params = vs, on_nan = "skip")]
    fn manual / manual_plain (vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor, lr: f64) {
        for p in vs.trainable_variables() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let loss = net.forward(x).cross_entropy_for_logits(y);
        loss.backward();
        tch::no_grad(|| {
            for mut p in vs.trainable_variables() {
                let g = p.grad();
                let _ = p.g_sub_(&(g * lr));
            }
        });
    }
}

#[test]
fn manual_update_is_guarded_through_params() {
    let (x, y) = batch(8, 0.4);
    let (vs_a, net_a, _) = setup(7, 0.0);
    let (vs_b, net_b, _) = setup(7, 0.0);
    for _ in 0..3 {
        manual_plain(&vs_a, &net_a, &x, &y, 0.1);
        let ((), reads) = count_host_reads(|| manual(&vs_b, &net_b, &x, &y, 0.1));
        assert_eq!(reads, reads_per_step(1));
    }
    assert_eq!(bits(&vs_a), bits(&vs_b));
    let before = bits(&vs_b);
    let bad = x.copy();
    let _ = bad.narrow(0, 1, 1).fill_(f64::NAN);
    manual(&vs_b, &net_b, &bad, &y, 0.1);
    assert_eq!(
        before,
        bits(&vs_b),
        "skipped: the manual update applied zero grads"
    );
}

#[test]
fn report_lists_the_guarded_steps() {
    let names: Vec<&str> = stepguard::registry().map(|s| s.name()).collect();
    for n in [
        "one_liner",
        "explicit",
        "update",
        "gan_step",
        "custom",
        "generic",
        "fallible",
        "manual",
    ] {
        assert!(names.contains(&n), "{n} registered: {names:?}");
    }
    let site = stepguard::registry()
        .find(|s| s.name() == "explicit")
        .unwrap();
    assert!(site.file().ends_with("guarded_step.rs") && site.line() > 0);
    let table = stepguard::report();
    assert!(
        table.contains("gan_step") && table.contains("max_norm=1"),
        "{table}"
    );
}

// --- skip escalating to an error in a Result-returning step; protected operations ----------

#[guarded_step(on_nan = skip(max = 1))]
fn skip_then_error(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), TrainError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn skip_escalates_to_an_error_when_the_step_returns_result() {
    let (x, y) = batch(8, 0.6);
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    let (vs, net, mut opt) = setup(9, 0.05);
    let before = bits(&vs);
    skip_then_error(&mut opt, &vs, &net, &bad, &y).expect("first bad batch is skipped");
    match skip_then_error(&mut opt, &vs, &net, &bad, &y) {
        Err(TrainError::Guard(e)) => {
            assert_eq!(e.consecutive_skips, Some(1));
            assert_eq!(e.check, Check::Loss);
        }
        other => panic!("expected the escalated error, got {other:?}"),
    }
    assert_eq!(before, bits(&vs));
}

/// A number type with a `log()` of its own: the rewrite turns `.log()` into the probe, which
/// must call this method unchanged.
struct Meter(f64);

impl Meter {
    fn log(&self) -> f64 {
        self.0.ln()
    }
}

/// The plain (non-tensor) results of `protected_ops`: each went through the probe.
type Plain = (i32, f64, f64, f64, f64, i32);

twin! {
    #[guarded_step(checks = "none")]
    fn protected_ops / protected_ops_plain (a: &Tensor, z: &Tensor) -> (Vec<Tensor>, Plain) {
        use std::ops::Div;
        let mut m = a.copy();
        m /= z;
        let plain_int = 7 / 2;
        let plain_float = 1.0f64 / 0.0;
        let plain_method = std::ops::Div::div(9.0f64, 2.0);
        assert_eq!(
            (plain_int, plain_float, plain_method),
            (3, f64::INFINITY, 4.5)
        );
        // The same operations on numbers held in variables: rewritten (only literal / literal is
        // left alone), so they go through the probe, which must pick the plain operation.
        let (seven, two, one, zero, nine, two_f) = (7i32, 2i32, 1.0f64, 0.0f64, 9.0f64, 2.0f64);
        let mut assigned = one;
        assigned /= zero;
        let probed: Plain = (
            seven / two,
            one / zero,
            nine.div(two_f),
            assigned,
            Meter(zero).log(),
            -seven / two,
        );
        // (not `vec![..]`: the rewrite cannot see into macro invocations)
        let tensors = Vec::from([
            a / z,
            a.div(z),
            m,
            1.0 / z,
            z.log(),
            z.log2(),
            z.log10(),
            a / 2.0,
        ]);
        (tensors, probed)
    }
}

#[test]
fn every_protected_form_is_finite_at_zero_and_plain_elsewhere() {
    let d = test_device();
    let a = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).to_device(d);
    let z = Tensor::from_slice(&[0.0f32, 0.0, 4.0]).to_device(d);
    let (out, probed) = protected_ops(&a, &z);
    for (i, t) in out.iter().enumerate() {
        assert!(
            bool::try_from(t.isfinite().all()).unwrap(),
            "form {i} is finite: {t}"
        );
    }
    // Where the divisor is safe, bitwise the plain result.
    let plain = (&a / &z).narrow(0, 2, 1);
    assert_eq!(
        f32::try_from(out[0].narrow(0, 2, 1)).unwrap().to_bits(),
        f32::try_from(plain).unwrap().to_bits()
    );
    assert_eq!(f64::try_from(out[7].narrow(0, 0, 1)).unwrap(), 0.5);

    // The same body without the attribute: every form but `a / 2.0` is non-finite at the
    // zeros (so each one was protected), and where the divisor is 4 every form is bitwise the
    // plain one.
    let (plain_out, plain_probed) = protected_ops_plain(&a, &z);
    assert_eq!(out.len(), plain_out.len());
    for (i, (g, p)) in out.iter().zip(&plain_out).enumerate() {
        let (g, p) = (
            Vec::<f32>::try_from(g.to_device(tch::Device::Cpu)).unwrap(),
            Vec::<f32>::try_from(p.to_device(tch::Device::Cpu)).unwrap(),
        );
        assert_eq!(
            g[2].to_bits(),
            p[2].to_bits(),
            "form {i} at 4: {g:?} vs {p:?}"
        );
        if i == 7 {
            assert_eq!(g, p, "`a / 2.0` is the plain division everywhere");
        } else {
            assert!(
                !p[0].is_finite() && !p[1].is_finite(),
                "form {i} plain: {p:?}"
            );
        }
    }
    // Numbers reach the probe and come back as the plain operation gives them, infinities and
    // integer division included.
    assert_eq!(
        probed,
        (3, f64::INFINITY, 4.5, f64::INFINITY, f64::NEG_INFINITY, -3)
    );
    assert_eq!(probed, plain_probed);
}

// --- the `forward` check: the first non-finite `let` binding, by name, line and kind -------

#[guarded_step(checks = "all", protect = "none", on_nan = "error")]
fn normalised_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let count = x.size()[0];
    let scale = x.abs().sum(Kind::Float);
    let xn = x / &scale;
    let logits = net.forward(&xn);
    let loss = logits.cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    let _ = count;
    Ok(())
}

#[test]
fn forward_check_names_the_first_bad_binding() {
    let (x, y) = batch(8, 0.8);
    let (vs, net, mut opt) = setup(10, 0.05);
    let (r, reads) = count_host_reads(|| normalised_step(&mut opt, &vs, &net, &x, &y));
    r.unwrap();
    assert_eq!(reads, reads_per_step(1), "bindings fold into the one read");
    let before = bits(&vs);
    let zeros = x.zeros_like(); // `scale` is 0: `x / scale` is 0/0 = NaN
    let err = normalised_step(&mut opt, &vs, &net, &zeros, &y).unwrap_err();
    assert_eq!(err.check, Check::Forward);
    eprintln!("{err}"); // the README quotes this
    let name = &err.tensors[0].name;
    assert!(
        name.starts_with("`xn` (line ") && name.ends_with(", division)"),
        "{name}"
    );
    let src = include_str!("guarded_step.rs");
    let line = src
        .lines()
        .position(|l| l.trim() == "let xn = x / &scale;")
        .unwrap()
        + 1;
    assert!(
        name.contains(&format!("line {line},")),
        "{name} at line {line}"
    );
    assert!(
        err.to_string()
            .contains("non-finite value in the forward pass"),
        "{err}"
    );
    assert_eq!(before, bits(&vs));
}

#[test]
fn report_data_serialises() {
    let data = stepguard::report_data();
    let site = data
        .iter()
        .find(|s| s.function == "gan_step")
        .expect("registered");
    assert_eq!(site.norm_type, "inf");
    assert_eq!(site.checks, vec!["loss", "grads", "params"]);
    let fwd = data
        .iter()
        .find(|s| s.function == "normalised_step")
        .unwrap();
    assert_eq!(fwd.checks, vec!["loss", "grads", "params", "forward"]);
    let json = serde_json::to_string(&data).unwrap();
    assert!(
        json.contains("\"function\":\"gan_step\"") && json.contains("\"max_norm\":1.0"),
        "{json}"
    );
}
