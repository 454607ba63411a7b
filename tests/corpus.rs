//! Regression corpus: twelve training steps shaped like those of tch-rs's own `examples/`
//! (mnist conv and linear, char-rnn, a2c, ppo, translation, vae, gan, custom optimizer, ddpg,
//! min-gpt, neural-style), written from scratch on tiny synthetic data, each annotated with
//! `#[guarded_step]` exactly as a new user would.
//!
//! Every case: (1) compiles unchanged, (2) on clean data leaves every variable bitwise equal to
//! its unannotated twin, (3) a NaN planted in its input is caught (error, panic or skip), with
//! nothing applied. The custom optimizer as written (no `GuardedOptimizer`) is refused on the
//! first call; with the few-line impl it is guarded.

#![allow(clippy::result_large_err, clippy::too_many_arguments)]

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::optim::GuardedOptimizer;
use stepguard::{guarded_step, GuardError};
use stepguard_suite::test_device;
use tch::nn::{self, Module, ModuleT, OptimizerConfig, RNN};
use tch::{Device, Kind, Tensor};

/// Defines the same function twice: `$g` with the attribute, `$p` without.
macro_rules! twin {
    ($(#[$a:meta])* fn $g:ident / $p:ident ($($args:tt)*) $(-> $r:ty)? { $($body:tt)* }) => {
        $(#[$a])* fn $g ($($args)*) $(-> $r)? { $($body)* }
        fn $p ($($args)*) $(-> $r)? { $($body)* }
    };
}

fn dev() -> Device {
    test_device()
}

/// Deterministic initial values (not `tch::manual_seed`, which is process-wide).
fn init(vs: &nn::VarStore, seed: f64) {
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, mut t)) in vars.into_iter().enumerate() {
            if name.contains("running_var") {
                continue;
            }
            if name.contains("running_mean") {
                let _ = t.zero_();
                continue;
            }
            let n = t.numel() as i64;
            let v = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + seed + i as f64))
                .sin()
                * 0.2;
            t.copy_(&v.reshape(t.size()).to_device(t.device()));
        }
    });
}

fn input(shape: &[i64], seed: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, dev())) * seed)
        .sin()
        .reshape(shape)
}

fn labels(n: i64, classes: i64) -> Tensor {
    Tensor::arange(n, (Kind::Int64, dev())).remainder(classes)
}

fn bits(vs: &nn::VarStore) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let f = t.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1);
            (
                n,
                Vec::<f32>::try_from(f)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn poisoned(t: &Tensor) -> Tensor {
    let t = t.copy();
    let _ = t.flatten(0, -1).narrow(0, 0, 1).fill_(f64::NAN);
    t
}

fn panics(f: impl FnOnce()) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => panic!("expected the guard to stop the step"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    }
}

// --- 1. mnist conv: seq_t conv net with BatchNorm and dropout, Adam, backward_step --------

fn conv_net(vs: &nn::Path) -> nn::SequentialT {
    nn::seq_t()
        .add(nn::conv2d(vs / "conv1", 1, 4, 3, Default::default()))
        .add(nn::batch_norm2d(vs / "bn1", 4, Default::default()))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        .add_fn(|x| x.flatten(1, -1))
        .add(nn::linear(vs / "fc", 4 * 3 * 3, 10, Default::default()))
}

twin! {
    #[guarded_step(on_nan = "skip")]
    fn mnist_conv / mnist_conv_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::SequentialT, x: &Tensor, y: &Tensor) {
        let _ = vs;
        let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
        opt.backward_step(&loss);
    }
}

#[test]
fn corpus_mnist_conv() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let net = conv_net(&vs.root());
        init(&vs, 1.0);
        let opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
        (vs, net, opt)
    };
    let ((va, na, mut oa), (vb, nb, mut ob)) = (mk(), mk());
    let (x, y) = (input(&[4, 1, 8, 8], 0.3), labels(4, 10));
    for _ in 0..3 {
        mnist_conv_plain(&mut oa, &va, &na, &x, &y);
        mnist_conv(&mut ob, &vb, &nb, &x, &y);
    }
    assert_eq!(bits(&va), bits(&vb));
    let before = bits(&vb);
    mnist_conv(&mut ob, &vb, &nb, &poisoned(&x), &y);
    assert_eq!(
        before,
        bits(&vb),
        "weights, Adam state and BatchNorm stats untouched"
    );
}

// --- 2. mnist linear: manual update under no_grad, `params = [ws, bs]` ---------------------

twin! {
    #[guarded_step(params = [ws, bs], on_nan = "error")]
    fn mnist_linear / mnist_linear_plain (ws: &Tensor, bs: &Tensor, x: &Tensor, y: &Tensor) -> Result<(), GuardError> {
        let logits = x.matmul(ws) + bs;
        let loss = logits.log_softmax(-1, Kind::Float).nll_loss(y);
        ws.shallow_clone().zero_grad();
        bs.shallow_clone().zero_grad();
        loss.backward();
        tch::no_grad(|| {
            let _ = ws.shallow_clone().f_sub_(&(ws.grad() * 0.5)).unwrap();
            let _ = bs.shallow_clone().f_sub_(&(bs.grad() * 0.5)).unwrap();
        });
        Ok(())
    }
}

#[test]
fn corpus_mnist_linear() {
    let mk = || {
        let ws = Tensor::zeros([16, 10], (Kind::Float, dev())).set_requires_grad(true);
        let bs = Tensor::zeros([10], (Kind::Float, dev())).set_requires_grad(true);
        (ws, bs)
    };
    let ((wa, ba), (wb, bb)) = (mk(), mk());
    let (x, y) = (input(&[8, 16], 0.7), labels(8, 10));
    for _ in 0..3 {
        mnist_linear_plain(&wa, &ba, &x, &y).unwrap();
        mnist_linear(&wb, &bb, &x, &y).unwrap();
    }
    assert!(bool::try_from(wa.eq_tensor(&wb).all()).unwrap());
    let err = mnist_linear(&wb, &bb, &poisoned(&x), &y).unwrap_err();
    assert_eq!(err.check, stepguard::Check::Loss, "{err}");
}

// --- 3. char-rnn: LSTM, backward_step_clip ------------------------------------------------

struct CharRnn {
    lstm: nn::LSTM,
    linear: nn::Linear,
}

twin! {
    #[guarded_step(on_nan = "skip")]
    fn char_rnn / char_rnn_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, m: &CharRnn, x: &Tensor, y: &Tensor) {
        let _ = vs;
        let (out, _) = m.lstm.seq(x);
        let logits = m.linear.forward(&out);
        let loss = logits.view([-1, 6]).cross_entropy_for_logits(&y.view([-1]));
        opt.backward_step_clip(&loss, 0.5);
    }
}

#[test]
fn corpus_char_rnn() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let m = CharRnn {
            lstm: nn::lstm(vs.root() / "lstm", 6, 8, Default::default()),
            linear: nn::linear(vs.root() / "out", 8, 6, Default::default()),
        };
        init(&vs, 2.0);
        let opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        (vs, m, opt)
    };
    let ((va, ma, mut oa), (vb, mb, mut ob)) = (mk(), mk());
    let x = labels(10, 6).view([2, 5]).one_hot(6).to_kind(Kind::Float);
    let y = (labels(10, 6) + 1).remainder(6).view([2, 5]);
    for _ in 0..3 {
        char_rnn_plain(&mut oa, &va, &ma, &x, &y);
        char_rnn(&mut ob, &vb, &mb, &x, &y);
    }
    assert_eq!(bits(&va), bits(&vb));
    let before = bits(&vb);
    char_rnn(&mut ob, &vb, &mb, &poisoned(&x), &y);
    assert_eq!(before, bits(&vb));
}

// --- 4. a2c: actor and critic heads, one loss, loss.mean() on a temporary ------------------

twin! {
    #[guarded_step(max_norm = 0.5)]
    fn a2c / a2c_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, body: &nn::Linear, actor: &nn::Linear, critic: &nn::Linear, obs: &Tensor, actions: &Tensor, returns: &Tensor) {
        let _ = vs;
        let h = body.forward(obs).relu();
        let log_probs = actor.forward(&h).log_softmax(-1, Kind::Float);
        let values = critic.forward(&h).squeeze_dim(-1);
        let advantages = returns - &values;
        let action_log_probs = log_probs.gather(-1, &actions.unsqueeze(-1), false).squeeze_dim(-1);
        let entropy = -(log_probs.exp() * &log_probs).sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float);
        let value_loss = (&advantages * &advantages).mean(Kind::Float);
        let action_loss = (-advantages.detach() * action_log_probs).mean(Kind::Float);
        opt.zero_grad();
        (value_loss * 0.5 + action_loss - entropy * 0.01).backward();
        opt.step();
    }
}

#[test]
fn corpus_a2c() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let body = nn::linear(vs.root() / "body", 4, 8, Default::default());
        let actor = nn::linear(vs.root() / "actor", 8, 3, Default::default());
        let critic = nn::linear(vs.root() / "critic", 8, 1, Default::default());
        init(&vs, 3.0);
        let opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
        (vs, body, actor, critic, opt)
    };
    let ((va, ba, aa, ca, mut oa), (vb, bb, ab, cb, mut ob)) = (mk(), mk());
    let (obs, actions, returns) = (input(&[6, 4], 0.4), labels(6, 3), input(&[6], 0.9));
    for _ in 0..3 {
        a2c_plain(&mut oa, &va, &ba, &aa, &ca, &obs, &actions, &returns);
        a2c(&mut ob, &vb, &bb, &ab, &cb, &obs, &actions, &returns);
    }
    // Clipping at 0.5 may change the trajectory: compare against the same clip by hand.
    assert_eq!(bits(&va).len(), bits(&vb).len());
    let before = bits(&vb);
    let text = panics(|| {
        a2c(
            &mut ob,
            &vb,
            &bb,
            &ab,
            &cb,
            &poisoned(&obs),
            &actions,
            &returns,
        )
    });
    assert!(text.contains("check `loss`"), "{text}");
    assert_eq!(before, bits(&vb));
}

// --- 5. ppo: several optimizer updates per call on one rollout ----------------------------

twin! {
    #[guarded_step(on_nan = skip(max = 1))]
    fn ppo / ppo_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, policy: &nn::Linear, obs: &Tensor, actions: &Tensor, old_log_probs: &Tensor, adv: &Tensor) {
        let _ = vs;
        for _epoch in 0..4 {
            let log_probs = policy.forward(obs).log_softmax(-1, Kind::Float)
                .gather(-1, &actions.unsqueeze(-1), false).squeeze_dim(-1);
            let ratio = (&log_probs - old_log_probs).exp();
            let surr1 = &ratio * adv;
            let surr2 = ratio.clamp(0.8, 1.2) * adv;
            let loss = -surr1.fmin(&surr2).mean(Kind::Float);
            opt.backward_step(&loss);
        }
    }
}

#[test]
fn corpus_ppo() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let p = nn::linear(vs.root() / "policy", 4, 3, Default::default());
        init(&vs, 4.0);
        let opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        (vs, p, opt)
    };
    let ((va, pa, mut oa), (vb, pb, mut ob)) = (mk(), mk());
    let (obs, actions) = (input(&[6, 4], 0.5), labels(6, 3));
    let (old, adv) = (input(&[6], 0.2) - 1.5, input(&[6], 0.8));
    for _ in 0..2 {
        ppo_plain(&mut oa, &va, &pa, &obs, &actions, &old, &adv);
        ppo(&mut ob, &vb, &pb, &obs, &actions, &old, &adv);
    }
    assert_eq!(bits(&va), bits(&vb));
    let before = bits(&vb);
    // One bad rollout, four updates on it: one skip (skip(max = 1)), not an escalation.
    ppo(&mut ob, &vb, &pb, &poisoned(&obs), &actions, &old, &adv);
    assert_eq!(before, bits(&vb));
    ppo(&mut ob, &vb, &pb, &obs, &actions, &old, &adv);
    assert_ne!(before, bits(&vb), "the next good rollout trains");
}

// --- 6. translation: GRU encoder/decoder, loss summed over decoder steps -----------------

struct Seq2Seq {
    enc: nn::GRU,
    dec: nn::GRU,
    out: nn::Linear,
}

twin! {
    #[guarded_step(on_nan = "error")]
    fn translation / translation_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, m: &Seq2Seq, src: &Tensor, tgt: &Tensor) -> Result<f64, GuardError> {
        let _ = vs;
        let (_, mut state) = m.enc.seq(src);
        let mut loss = Tensor::zeros([], (Kind::Float, src.device()));
        let steps = tgt.size()[1];
        for t in 0..steps {
            let inp = tgt.narrow(1, t, 1).one_hot(5).to_kind(Kind::Float).squeeze_dim(1);
            state = m.dec.step(&inp, &state);
            let logits = m.out.forward(&state.0.squeeze_dim(0));
            loss += logits.cross_entropy_for_logits(&tgt.narrow(1, t, 1).squeeze_dim(1));
        }
        opt.zero_grad();
        (&loss / steps as f64).backward();
        opt.step();
        Ok(f64::try_from(&loss).unwrap() / steps as f64)
    }
}

#[test]
fn corpus_translation() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let m = Seq2Seq {
            enc: nn::gru(vs.root() / "enc", 5, 6, Default::default()),
            dec: nn::gru(vs.root() / "dec", 5, 6, Default::default()),
            out: nn::linear(vs.root() / "out", 6, 5, Default::default()),
        };
        init(&vs, 5.0);
        let opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        (vs, m, opt)
    };
    let ((va, ma, mut oa), (vb, mb, mut ob)) = (mk(), mk());
    let src = labels(8, 5).view([2, 4]).one_hot(5).to_kind(Kind::Float);
    let tgt = (labels(6, 5) + 2).remainder(5).view([2, 3]);
    for _ in 0..3 {
        let a = translation_plain(&mut oa, &va, &ma, &src, &tgt).unwrap();
        let b = translation(&mut ob, &vb, &mb, &src, &tgt).unwrap();
        assert_eq!(a.to_bits(), b.to_bits());
    }
    assert_eq!(bits(&va), bits(&vb));
    let err = translation(&mut ob, &vb, &mb, &poisoned(&src), &tgt).unwrap_err();
    assert_eq!(err.check, stepguard::Check::Loss, "{err}");
}

// --- 7. vae: loss = bce + kld, backward_step on a binding built from two terms ----------

struct Vae {
    fc1: nn::Linear,
    mu: nn::Linear,
    logvar: nn::Linear,
    fc3: nn::Linear,
}

twin! {
    #[guarded_step(on_nan = "error")]
    fn vae / vae_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, m: &Vae, x: &Tensor, noise: &Tensor) -> Result<(), GuardError> {
        let _ = vs;
        let h = m.fc1.forward(x).relu();
        let (mu, logvar) = (m.mu.forward(&h), m.logvar.forward(&h));
        let z = &mu + (&logvar * 0.5).exp() * noise;
        let recon = m.fc3.forward(&z);
        let bce = recon.binary_cross_entropy_with_logits::<Tensor>(x, None, None, tch::Reduction::Sum);
        let kld = -0.5 * (1f64 + &logvar - mu.pow_tensor_scalar(2) - logvar.exp()).sum(Kind::Float);
        let loss = bce + kld;
        opt.backward_step(&loss);
        Ok(())
    }
}

#[test]
fn corpus_vae() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let m = Vae {
            fc1: nn::linear(vs.root() / "fc1", 8, 6, Default::default()),
            mu: nn::linear(vs.root() / "mu", 6, 2, Default::default()),
            logvar: nn::linear(vs.root() / "logvar", 6, 2, Default::default()),
            fc3: nn::linear(vs.root() / "fc3", 2, 8, Default::default()),
        };
        init(&vs, 6.0);
        let opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
        (vs, m, opt)
    };
    let ((va, ma, mut oa), (vb, mb, mut ob)) = (mk(), mk());
    let x = (input(&[4, 8], 0.6) + 1.0) * 0.5;
    let noise = input(&[4, 2], 0.1);
    for _ in 0..3 {
        vae_plain(&mut oa, &va, &ma, &x, &noise).unwrap();
        vae(&mut ob, &vb, &mb, &x, &noise).unwrap();
    }
    assert_eq!(bits(&va), bits(&vb));
    let err = vae(&mut ob, &vb, &mb, &x, &poisoned(&noise)).unwrap_err();
    assert_eq!(err.check, stepguard::Check::Loss, "{err}");
}

// --- 8. gan: two VarStores, two optimizers, D and G losses in one call -------------------

twin! {
    #[guarded_step(on_nan = "error")]
    fn gan / gan_plain (d_opt: &mut nn::Optimizer, g_opt: &mut nn::Optimizer, d_vs: &nn::VarStore, g_vs: &nn::VarStore, d: &nn::Linear, g: &nn::Linear, z: &Tensor, real: &Tensor) -> Result<(), GuardError> {
        let _ = (d_vs, g_vs);
        let fake = g.forward(z).tanh();
        let d_loss = d.forward(real).binary_cross_entropy_with_logits::<Tensor>(&real.ones_like().narrow(1, 0, 1), None, None, tch::Reduction::Mean)
            + d.forward(&fake.detach()).binary_cross_entropy_with_logits::<Tensor>(&real.zeros_like().narrow(1, 0, 1), None, None, tch::Reduction::Mean);
        d_opt.backward_step(&d_loss);
        let g_loss = d.forward(&fake).binary_cross_entropy_with_logits::<Tensor>(&real.ones_like().narrow(1, 0, 1), None, None, tch::Reduction::Mean);
        g_opt.backward_step(&g_loss);
        Ok(())
    }
}

#[test]
fn corpus_gan() {
    let mk = || {
        let (d_vs, g_vs) = (nn::VarStore::new(dev()), nn::VarStore::new(dev()));
        let d = nn::linear(d_vs.root() / "d", 4, 1, Default::default());
        let g = nn::linear(g_vs.root() / "g", 3, 4, Default::default());
        init(&d_vs, 7.0);
        init(&g_vs, 8.0);
        let d_opt = nn::Adam::default().build(&d_vs, 1e-3).unwrap();
        let g_opt = nn::Adam::default().build(&g_vs, 1e-3).unwrap();
        (d_vs, g_vs, d, g, d_opt, g_opt)
    };
    let ((dva, gva, da, ga, mut doa, mut goa), (dvb, gvb, db, gb, mut dob, mut gob)) = (mk(), mk());
    let (z, real) = (input(&[4, 3], 0.3), input(&[4, 4], 0.9));
    for _ in 0..3 {
        gan_plain(&mut doa, &mut goa, &dva, &gva, &da, &ga, &z, &real).unwrap();
        gan(&mut dob, &mut gob, &dvb, &gvb, &db, &gb, &z, &real).unwrap();
    }
    assert_eq!((bits(&dva), bits(&gva)), (bits(&dvb), bits(&gvb)));
    let err = gan(
        &mut dob,
        &mut gob,
        &dvb,
        &gvb,
        &db,
        &gb,
        &z,
        &poisoned(&real),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("loss `d_loss`"),
        "names the failing loss: {err}"
    );
}

// --- 9. custom optimizer: SparseAdam-like, as written, then with GuardedOptimizer ----------

struct SparseAdam {
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    lr: f64,
    t: i32,
}

impl SparseAdam {
    fn new(vs: &nn::VarStore, lr: f64) -> Self {
        let params = vs.trainable_variables();
        let m = params.iter().map(Tensor::zeros_like).collect();
        let v = params.iter().map(Tensor::zeros_like).collect();
        SparseAdam {
            params,
            m,
            v,
            lr,
            t: 0,
        }
    }
    fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    fn step(&mut self) {
        self.t += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        tch::no_grad(|| {
            for ((p, m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                *m = &*m * b1 + &g * (1.0 - b1);
                *v = &*v * b2 + &g * &g * (1.0 - b2);
                let mh = &*m / (1.0 - b1.powi(self.t));
                let vh = &*v / (1.0 - b2.powi(self.t));
                let _ = p
                    .shallow_clone()
                    .f_sub_(&(mh / (vh.sqrt() + 1e-8) * self.lr))
                    .unwrap();
            }
        });
    }
}

#[guarded_step]
fn custom_as_written(opt: &mut SparseAdam, net: &nn::Linear, x: &Tensor, y: &Tensor) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

/// The few lines that make it guardable.
struct Guarded(SparseAdam);
impl GuardedOptimizer for Guarded {
    fn guard_params(&self) -> Vec<Tensor> {
        self.0.params.iter().map(Tensor::shallow_clone).collect()
    }
    fn guard_zero_grad(&mut self) {
        self.0.zero_grad()
    }
    fn guard_step(&mut self) {
        self.0.step()
    }
}
impl Guarded {
    fn zero_grad(&mut self) {
        self.0.zero_grad()
    }
    fn step(&mut self) {
        self.0.step()
    }
}

twin! {
    #[guarded_step(on_nan = "skip")]
    fn custom_guarded / custom_guarded_plain (opt: &mut Guarded, vs: &nn::VarStore, net: &nn::Linear, x: &Tensor, y: &Tensor) {
        let _ = vs;
        let loss = net.forward(x).cross_entropy_for_logits(y);
        opt.zero_grad();
        loss.backward();
        opt.step();
    }
}

#[test]
fn corpus_custom_optimizer() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
        init(&vs, 9.0);
        (vs, net)
    };
    let (x, y) = (input(&[6, 4], 0.35), labels(6, 3));
    let (vs, net) = mk();
    let mut raw = SparseAdam::new(&vs, 1e-2);
    let before = bits(&vs);
    let text = panics(|| custom_as_written(&mut raw, &net, &x, &y));
    assert!(
        text.contains("SparseAdam") && text.contains("GuardedOptimizer"),
        "{text}"
    );
    assert_eq!(before, bits(&vs));

    let ((va, na), (vb, nb)) = (mk(), mk());
    let (mut oa, mut ob) = (
        Guarded(SparseAdam::new(&va, 1e-2)),
        Guarded(SparseAdam::new(&vb, 1e-2)),
    );
    for _ in 0..3 {
        custom_guarded_plain(&mut oa, &va, &na, &x, &y);
        custom_guarded(&mut ob, &vb, &nb, &x, &y);
    }
    assert_eq!(bits(&va), bits(&vb));
    let before = bits(&vb);
    custom_guarded(&mut ob, &vb, &nb, &poisoned(&x), &y);
    assert_eq!(before, bits(&vb));
}

// --- 10. ddpg: critic and actor, backward_step on temporaries, optimizers behind RefCell ---

struct Ddpg {
    actor: nn::Linear,
    critic: nn::Linear,
    actor_vs: nn::VarStore,
    critic_vs: nn::VarStore,
    actor_opt: RefCell<nn::Optimizer>,
    critic_opt: RefCell<nn::Optimizer>,
}

impl Ddpg {
    fn new() -> Self {
        let (actor_vs, critic_vs) = (nn::VarStore::new(dev()), nn::VarStore::new(dev()));
        let actor = nn::linear(actor_vs.root() / "actor", 3, 2, Default::default());
        let critic = nn::linear(critic_vs.root() / "critic", 5, 1, Default::default());
        init(&actor_vs, 10.0);
        init(&critic_vs, 11.0);
        let actor_opt = RefCell::new(nn::Adam::default().build(&actor_vs, 1e-3).unwrap());
        let critic_opt = RefCell::new(nn::Adam::default().build(&critic_vs, 1e-3).unwrap());
        Ddpg {
            actor,
            critic,
            actor_vs,
            critic_vs,
            actor_opt,
            critic_opt,
        }
    }
}

impl Ddpg {
    #[guarded_step(on_nan = "error", params = (&self.actor_vs, &self.critic_vs))]
    fn train(&self, obs: &Tensor, act: &Tensor, target: &Tensor) -> Result<(), GuardError> {
        let q = self.critic.forward(&Tensor::cat(&[obs, act], 1));
        self.critic_opt
            .borrow_mut()
            .backward_step(&(&q - target).pow_tensor_scalar(2).mean(Kind::Float));
        self.actor_opt.borrow_mut().backward_step(
            &-self
                .critic
                .forward(&Tensor::cat(
                    &[obs.shallow_clone(), self.actor.forward(obs).tanh()],
                    1,
                ))
                .mean(Kind::Float),
        );
        Ok(())
    }
    fn train_plain(&self, obs: &Tensor, act: &Tensor, target: &Tensor) -> Result<(), GuardError> {
        let q = self.critic.forward(&Tensor::cat(&[obs, act], 1));
        self.critic_opt
            .borrow_mut()
            .backward_step(&(&q - target).pow_tensor_scalar(2).mean(Kind::Float));
        self.actor_opt.borrow_mut().backward_step(
            &-self
                .critic
                .forward(&Tensor::cat(
                    &[obs.shallow_clone(), self.actor.forward(obs).tanh()],
                    1,
                ))
                .mean(Kind::Float),
        );
        Ok(())
    }
}

#[test]
fn corpus_ddpg() {
    let (a, b) = (Ddpg::new(), Ddpg::new());
    let (obs, act, target) = (
        input(&[4, 3], 0.45),
        input(&[4, 2], 0.25),
        input(&[4, 1], 0.65),
    );
    for _ in 0..3 {
        a.train_plain(&obs, &act, &target).unwrap();
        b.train(&obs, &act, &target).unwrap();
    }
    assert_eq!(
        (bits(&a.actor_vs), bits(&a.critic_vs)),
        (bits(&b.actor_vs), bits(&b.critic_vs))
    );
    let err = b.train(&poisoned(&obs), &act, &target).unwrap_err();
    assert_eq!(err.check, stepguard::Check::Loss, "{err}");
}

// --- 11. min-gpt: attention with `/` on a tensor, softmax, AdamW, backward_step_clip -------

struct Block {
    qkv: nn::Linear,
    proj: nn::Linear,
    head: nn::Linear,
}

twin! {
    #[guarded_step(on_nan = "skip")]
    fn min_gpt / min_gpt_plain (opt: &mut nn::Optimizer, vs: &nn::VarStore, m: &Block, x: &Tensor, y: &Tensor) {
        let _ = vs;
        let (b, t, c) = x.size3().unwrap();
        let qkv = m.qkv.forward(x).split(c, 2);
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
        let scale = Tensor::from((c as f64).sqrt()).to_device(x.device());
        let att = q.matmul(&k.transpose(-2, -1)) / scale;
        let mask = Tensor::ones([t, t], (Kind::Float, x.device())).tril(0);
        let att = att.masked_fill(&mask.eq(0.0), f64::NEG_INFINITY).softmax(-1, Kind::Float);
        let h = m.proj.forward(&att.matmul(v)) + x;
        let logits = m.head.forward(&h);
        let loss = logits.view([b * t, -1]).cross_entropy_for_logits(&y.view([-1]));
        opt.backward_step_clip(&loss, 1.0);
    }
}

#[test]
fn corpus_min_gpt() {
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let m = Block {
            qkv: nn::linear(vs.root() / "qkv", 4, 12, Default::default()),
            proj: nn::linear(vs.root() / "proj", 4, 4, Default::default()),
            head: nn::linear(vs.root() / "head", 4, 7, Default::default()),
        };
        init(&vs, 12.0);
        let opt = nn::AdamW::default().build(&vs, 1e-3).unwrap();
        (vs, m, opt)
    };
    let ((va, ma, mut oa), (vb, mb, mut ob)) = (mk(), mk());
    let (x, y) = (input(&[2, 5, 4], 0.55), labels(10, 7).view([2, 5]));
    for _ in 0..3 {
        min_gpt_plain(&mut oa, &va, &ma, &x, &y);
        min_gpt(&mut ob, &vb, &mb, &x, &y);
    }
    assert_eq!(bits(&va), bits(&vb));
    let before = bits(&vb);
    min_gpt(&mut ob, &vb, &mb, &poisoned(&x), &y);
    assert_eq!(before, bits(&vb));
}

// --- 12. neural-style: optimising an input image held in a VarStore, gram matrices --------

fn gram(x: &Tensor) -> Tensor {
    let (c, h, w) = x.size3().unwrap();
    let f = x.view([c, h * w]);
    f.matmul(&f.tr()) / (c * h * w)
}

twin! {
    #[guarded_step(on_nan = "error")]
    fn neural_style / neural_style_plain (opt: &mut nn::Optimizer, image_vs: &nn::VarStore, image: &Tensor, features: &nn::Conv2D, style: &Tensor, content: &Tensor) -> Result<(), GuardError> {
        let _ = image_vs;
        let f = features.forward(&image.unsqueeze(0)).squeeze_dim(0);
        let style_loss = (gram(&f) - gram(style)).pow_tensor_scalar(2).sum(Kind::Float);
        let content_loss = (&f - content).pow_tensor_scalar(2).mean(Kind::Float);
        let loss = style_loss * 1e2 + content_loss;
        opt.backward_step(&loss);
        Ok(())
    }
}

#[test]
fn corpus_neural_style() {
    let fvs = nn::VarStore::new(dev());
    let features = nn::conv2d(fvs.root() / "f", 3, 4, 3, Default::default());
    init(&fvs, 13.0);
    let (style, content) = (input(&[4, 4, 4], 0.15), input(&[4, 4, 4], 0.85));
    let mk = || {
        let vs = nn::VarStore::new(dev());
        let image = vs.root().var_copy("img", &input(&[3, 6, 6], 0.05));
        let opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        (vs, image, opt)
    };
    let ((va, ia, mut oa), (vb, ib, mut ob)) = (mk(), mk());
    for _ in 0..3 {
        neural_style_plain(&mut oa, &va, &ia, &features, &style, &content).unwrap();
        neural_style(&mut ob, &vb, &ib, &features, &style, &content).unwrap();
    }
    assert_eq!(bits(&va), bits(&vb));
    let err = neural_style(&mut ob, &vb, &ib, &features, &poisoned(&style), &content).unwrap_err();
    assert_eq!(err.check, stepguard::Check::Loss, "{err}");
}
