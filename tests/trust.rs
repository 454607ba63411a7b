//! Never silently unguarded, nothing lost on skip, state per model, the right diagnosis.
//!
//! Each test here failed (or did not compile) before the guard kept its state per set of
//! parameters; see the closing note of the issue "Trustworthy on real code".

#![allow(clippy::result_large_err)]

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use stepguard::{guarded_step, Check, Diagnosis, GuardError, GuardState};
use stepguard_suite::test_device;
use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Kind, Tensor};

fn fill(vs: &nn::VarStore, seed: f64) {
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, mut t)) in vars.into_iter().enumerate() {
            if name.contains("running") {
                continue;
            }
            let n = t.numel() as i64;
            let v = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (0.31 + seed + i as f64))
                .sin()
                * 0.3;
            t.copy_(&v.reshape(t.size()).to_device(t.device()));
        }
    });
}

fn linear_model(seed: f64) -> (nn::VarStore, nn::Linear, nn::Optimizer) {
    let vs = nn::VarStore::new(test_device());
    let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    fill(&vs, seed);
    let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    (vs, net, opt)
}

fn data(seed: f64) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(32, (Kind::Float, d)) * seed)
        .sin()
        .reshape([8, 4]);
    let y = Tensor::arange(8, (Kind::Int64, d)).remainder(3);
    (x, y)
}

fn bits(vs: &nn::VarStore) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = vs
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

fn panic_text<R>(r: std::thread::Result<R>) -> String {
    match r {
        Ok(_) => panic!("expected the guard to panic"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    }
}

// --- never silently unguarded --------------------------------------------------------------

/// An optimizer written by hand that does not implement `GuardedOptimizer` (like tch-rs's
/// SparseAdam example).
struct HandSgd {
    params: Vec<Tensor>,
    lr: f64,
}

impl HandSgd {
    fn zero_grad(&mut self) {
        for p in &mut self.params {
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
                let _ = p.f_sub_(&(g * self.lr)).unwrap();
            }
        })
    }
}

#[guarded_step]
fn hand_step(opt: &mut HandSgd, net: &nn::Linear, x: &Tensor, y: &Tensor) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
}

#[guarded_step(on_nan = "error")]
fn hand_step_error(
    opt: &mut HandSgd,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(())
}

#[test]
fn a_step_on_an_optimizer_the_guard_cannot_see_is_refused_on_the_first_call() {
    let (vs, net, _) = linear_model(0.0);
    let mut opt = HandSgd {
        params: vs.trainable_variables(),
        lr: 0.1,
    };
    let (x, y) = data(0.3);
    let before = bits(&vs);
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        hand_step(&mut opt, &net, &x, &y)
    })));
    assert!(text.contains("unguarded optimizer step"), "{text}");
    assert!(text.contains("HandSgd::step()"), "{text}");
    assert!(
        text.contains("implement `stepguard::optim::GuardedOptimizer`"),
        "{text}"
    );
    assert_eq!(before, bits(&vs), "the unguarded update did not run");

    let err = hand_step_error(&mut opt, &net, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Unguarded);
    assert!(matches!(
        err.diagnosis,
        Diagnosis::Unguarded {
            optimizer: "HandSgd",
            ..
        }
    ));
}

struct Trainer {
    vs: nn::VarStore,
    net: nn::Linear,
    opt: RefCell<nn::Optimizer>,
}

impl Trainer {
    #[guarded_step(on_nan = "error")]
    fn step(&self, x: &Tensor, y: &Tensor) -> Result<(), GuardError> {
        let _ = &self.vs;
        let loss = self.net.forward(x).cross_entropy_for_logits(y);
        self.opt.borrow_mut().zero_grad();
        loss.backward();
        self.opt.borrow_mut().step();
        Ok(())
    }
}

#[test]
fn a_step_through_refcell_is_guarded() {
    let (vs, net, opt) = linear_model(1.0);
    let t = Trainer {
        vs,
        net,
        opt: RefCell::new(opt),
    };
    let (x, y) = data(0.4);
    t.step(&x, &y).unwrap();
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let before = bits(&t.vs);
    let err = t.step(&x, &y).unwrap_err();
    assert_eq!(err.check, Check::Loss);
    assert_eq!(before, bits(&t.vs));
}

#[guarded_step(checks = "loss", on_nan = "error")]
fn accumulate(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
    i: usize,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y) / 4.0;
    loss.backward();
    if i % 4 == 3 {
        opt.step();
        opt.zero_grad();
    }
    Ok(())
}

#[test]
fn a_bad_micro_batch_is_read_at_the_update_and_named() {
    let (vs, net, mut opt) = linear_model(2.0);
    let before = bits(&vs);
    for i in 0..4 {
        let (x, y) = data(0.5 + i as f64);
        if i == 1 {
            let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
        }
        let r = accumulate(&mut opt, &vs, &net, &x, &y, i);
        if i < 3 {
            r.expect("no update yet: nothing read");
        } else {
            let err = r.expect_err("the NaN of micro-batch 1 reaches the update's read");
            assert_eq!(err.check, Check::Loss);
            let name = &err.tensors[0].name;
            assert!(name.contains("micro-batch 1"), "{name}");
            assert!(name.contains("loss `loss`"), "{name}");
        }
    }
    assert_eq!(before, bits(&vs), "the update never ran");
}

// --- compiles unchanged -------------------------------------------------------------------

/// A scheduler whose `step()` returns a type without `Default`.
struct Sched(f64);
struct Lr(#[allow(dead_code)] f64);
impl Sched {
    fn step(&mut self) -> Lr {
        self.0 *= 0.5;
        Lr(self.0)
    }
}

#[guarded_step(max_norm = 1)]
fn temporaries(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    sched: &mut Sched,
    x: &Tensor,
    y: &Tensor,
) -> Lr {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
    let a = net.forward(x).pow_tensor_scalar(2).mean(Kind::Float);
    let kld = net.forward(x).exp().mean(Kind::Float);
    let loss = a + kld;
    opt.backward_step(&loss);
    opt.zero_grad();
    net.forward(x).mean(Kind::Float).backward();
    opt.step();
    sched.step()
}

#[test]
fn temporaries_inference_and_non_default_returns_compile_and_are_guarded() {
    let (vs, net, mut opt) = linear_model(3.0);
    let mut sched = Sched(1.0);
    let (x, y) = data(0.7);
    let Lr(lr) = temporaries(&mut opt, &vs, &net, &mut sched, &x, &y);
    assert_eq!(lr, 0.5);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        temporaries(&mut opt, &vs, &net, &mut sched, &x, &y)
    })));
    assert!(text.contains("check `loss`"), "{text}");
    assert!(
        text.contains("net.forward(x).cross_entropy_for_logits(y)"),
        "names the failing loss expression: {text}"
    );
}

#[guarded_step(params = [w, b], max_norm = 1)]
fn manual_array(w: &Tensor, b: &Tensor, x: &Tensor) {
    let loss = (x.matmul(w) + b).pow_tensor_scalar(2).sum(Kind::Float);
    loss.backward();
    tch::no_grad(|| {
        let _ = w.shallow_clone().f_sub_(&(w.grad() * 0.1)).unwrap();
        let _ = b.shallow_clone().f_sub_(&(b.grad() * 0.1)).unwrap();
    });
}

#[guarded_step(params = vec![w.shallow_clone(), b.shallow_clone()], on_nan = "error")]
fn manual_vec(w: &Tensor, b: &Tensor, x: &Tensor) -> std::io::Result<()> {
    let loss = (x.matmul(w) + b).pow_tensor_scalar(2).sum(Kind::Float);
    loss.backward();
    Ok(())
}

#[guarded_step(on_nan = "error")]
fn tch_error_step(
    opt: &mut nn::Optimizer,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), tch::TchError> {
    let loss = net
        .forward(x)
        .f_log_softmax(-1, Kind::Float)?
        .f_nll_loss::<Tensor>(y, None, tch::Reduction::Mean, -100)?;
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn params_as_arrays_and_vecs_and_foreign_error_types() {
    let d = test_device();
    let w = Tensor::ones([4, 2], (Kind::Float, d)).set_requires_grad(true);
    let b = Tensor::zeros([2], (Kind::Float, d)).set_requires_grad(true);
    let (x, _) = data(0.2);
    manual_array(&w, &b, &x);
    let g = Tensor::cat(&[w.grad().flatten(0, -1), b.grad().flatten(0, -1)], 0);
    let norm = f64::try_from(g.norm()).unwrap();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "clipped once to max_norm = 1, got {norm}"
    );

    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let err = manual_vec(&w, &b, &x).unwrap_err();
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<GuardError>());
    assert_eq!(inner.map(|e| e.check), Some(Check::Loss), "{err}");

    let (vs, net, mut opt) = linear_model(4.0);
    let (x, y) = data(0.3);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let before = bits(&vs);
    let err = tch_error_step(&mut opt, &net, &x, &y).unwrap_err();
    assert!(err.to_string().contains("check `loss`"), "{err}");
    assert_eq!(before, bits(&vs));
}

// --- state per model ----------------------------------------------------------------------

#[guarded_step(on_nan = "error")]
fn shared_fn(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn two_models_through_one_function_never_see_each_others_verdicts() {
    let (vs_a, net_a, mut opt_a) = linear_model(5.0);
    let (vs_b, net_b, mut opt_b) = linear_model(6.0);
    let (x, y) = data(0.9);
    shared_fn(&mut opt_a, &vs_a, &net_a, &x, &y).unwrap();
    // Model A's update goes bad (an absurd learning rate overflows its weights).
    opt_a.set_lr(3e38);
    let big = (x.shallow_clone() * 1e3, y.shallow_clone());
    shared_fn(&mut opt_a, &vs_a, &net_a, &big.0, &big.1).unwrap();
    let a_bad = !bits(&vs_a)
        .iter()
        .all(|(_, b)| b.iter().all(|x| f32::from_bits(*x).is_finite()));
    assert!(a_bad, "the planted update made A's weights non-finite");
    // Model B's steps must not be blamed for it.
    for _ in 0..3 {
        shared_fn(&mut opt_b, &vs_b, &net_b, &x, &y).expect("B is fine");
    }
    // A's next step reports A's update.
    opt_a.set_lr(0.1);
    let err = shared_fn(&mut opt_a, &vs_a, &net_a, &x, &y).unwrap_err();
    assert_eq!((err.check, err.step), (Check::Params, 1), "{err}");
    assert_eq!(err.diagnosis, Diagnosis::Update);
}

#[guarded_step(on_nan = skip(max = 2), state = state)]
fn gan_like(
    state: &GuardState,
    d_opt: &mut nn::Optimizer,
    g_opt: &mut nn::Optimizer,
    d: &nn::Linear,
    g: &nn::Linear,
    z: &Tensor,
    real: &Tensor,
) {
    let d_loss =
        d.forward(real).mean(Kind::Float) - d.forward(&g.forward(z).detach()).mean(Kind::Float);
    d_opt.backward_step(&d_loss);
    let g_loss = -d.forward(&g.forward(z)).mean(Kind::Float);
    g_opt.backward_step(&g_loss);
}

#[test]
fn an_optimizer_skipped_every_call_escalates_although_another_succeeds() {
    let (d_vs, d, mut d_opt) = linear_model(7.0);
    let g_vs = nn::VarStore::new(test_device());
    let g = nn::linear(g_vs.root() / "g", 2, 4, Default::default());
    fill(&g_vs, 8.0);
    let mut g_opt = nn::Sgd::default().build(&g_vs, 0.1).unwrap();
    let _ = &d_vs;
    let state = GuardState::new();
    let z = Tensor::ones([8, 2], (Kind::Float, test_device()));
    let (real, _) = data(0.1);
    let _ = real.narrow(0, 0, 1).fill_(f64::NAN); // only D's loss sees it
    gan_like(&state, &mut d_opt, &mut g_opt, &d, &g, &z, &real);
    gan_like(&state, &mut d_opt, &mut g_opt, &d, &g, &z, &real);
    let text = panic_text(catch_unwind(AssertUnwindSafe(|| {
        gan_like(&state, &mut d_opt, &mut g_opt, &d, &g, &z, &real)
    })));
    assert!(text.contains("skipped 2 consecutive steps"), "{text}");
}

#[guarded_step(on_nan = skip(max = 1), state = state)]
fn ppo_like(
    state: &GuardState,
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    for _ in 0..4 {
        let loss = net.forward(x).cross_entropy_for_logits(y);
        opt.backward_step(&loss);
    }
}

#[test]
fn one_bad_rollout_used_for_four_updates_is_one_skip() {
    let (vs, net, mut opt) = linear_model(9.0);
    let state = GuardState::new();
    let (x, y) = data(0.2);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let before = bits(&vs);
    ppo_like(&state, &mut opt, &vs, &net, &x, &y); // four skipped updates, one bad batch
    assert_eq!(before, bits(&vs));
    let (good, _) = data(0.3);
    ppo_like(&state, &mut opt, &vs, &net, &good, &y);
    assert_ne!(
        before,
        bits(&vs),
        "a good rollout resets the count and trains"
    );
}

// --- a skipped batch leaves no trace --------------------------------------------------------

#[guarded_step(on_nan = "skip")]
fn bn_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[test]
fn a_skipped_batch_leaves_batchnorm_statistics_as_they_were() {
    let vs = nn::VarStore::new(test_device());
    let net = nn::seq_t()
        .add(nn::linear(vs.root() / "fc", 4, 6, Default::default()))
        .add(nn::batch_norm1d(vs.root() / "bn", 6, Default::default()))
        .add(nn::linear(vs.root() / "out", 6, 3, Default::default()));
    fill(&vs, 10.0);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let (x, y) = data(0.6);
    bn_step(&mut opt, &vs, &net, &x, &y);
    let before = bits(&vs);
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    bn_step(&mut opt, &vs, &net, &bad, &y);
    assert_eq!(
        before,
        bits(&vs),
        "params and running stats as if the batch never came"
    );
    let eval = net.forward_t(&x, false);
    assert!(bool::try_from(eval.isfinite().all()).unwrap());
}

// --- diagnosis ----------------------------------------------------------------------------

#[guarded_step(on_nan = "error")]
fn no_protected_ops(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn protection_is_mentioned_only_where_the_body_has_protected_ops() {
    let (vs, net, mut opt) = linear_model(11.0);
    let (x, y) = data(0.2);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let err = no_protected_ops(&mut opt, &vs, &net, &x, &y).unwrap_err();
    assert_eq!(err.diagnosis, Diagnosis::Forward { protected: None });
    assert!(!err.to_string().contains("epsilon protection"), "{err}");
}

#[test]
fn a_skip_is_counted_in_the_report() {
    let (vs, net, mut opt) = linear_model(12.0);
    let (x, y) = data(0.2);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let net_t = nn::seq_t().add(net);
    bn_step(&mut opt, &vs, &net_t, &x, &y);
    let line = stepguard::report()
        .lines()
        .find(|l| l.contains("bn_step"))
        .map(str::to_owned)
        .unwrap();
    let skipped: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(skipped >= 1, "{line}");
}

// --- no crash on sparse grads ------------------------------------------------------------

#[guarded_step(max_norm = 0.5, on_nan = "error")]
fn sparse_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    emb: &nn::Embedding,
    ids: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = emb.forward(ids).pow_tensor_scalar(2).sum(Kind::Float);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn sparse_grads_are_clipped_and_checked() {
    let vs = nn::VarStore::new(test_device());
    let cfg = nn::EmbeddingConfig {
        sparse: true,
        ..Default::default()
    };
    let emb = nn::embedding(vs.root() / "emb", 10, 3, cfg);
    fill(&vs, 13.0);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 2, 7]).to_device(test_device());
    let before = Tensor::from_slice(
        &Vec::<f32>::try_from(
            vs.variables()["emb.weight"]
                .flatten(0, -1)
                .to_device(tch::Device::Cpu),
        )
        .unwrap(),
    );
    sparse_step(&mut opt, &vs, &emb, &ids).expect("finite");
    let g = vs.variables()["emb.weight"].grad();
    assert!(g.is_sparse());
    let norm = f64::try_from(g.coalesce().values().norm()).unwrap();
    assert!((norm - 0.5).abs() < 1e-4, "clipped to max_norm: {norm}");
    let after = vs.variables()["emb.weight"]
        .flatten(0, -1)
        .to_device(tch::Device::Cpu);
    assert!(bool::try_from((after - before).abs().sum(Kind::Float).gt(0.0)).unwrap());

    tch::no_grad(|| {
        let _ = vs.variables()["emb.weight"]
            .narrow(0, 2, 1)
            .shallow_clone()
            .fill_(f64::NAN);
    });
    let err = sparse_step(&mut opt, &vs, &emb, &ids).unwrap_err();
    assert_eq!(err.check, Check::Params, "{err}");
}

#[test]
fn the_unguarded_twin_of_the_hand_optimizer_really_trains() {
    // The refused `hand_step` is not refused because the optimizer is broken.
    let (vs, net, _) = linear_model(14.0);
    let mut opt = HandSgd {
        params: vs.trainable_variables(),
        lr: 0.1,
    };
    let (x, y) = data(0.3);
    let before = bits(&vs);
    let loss = net.forward(&x).cross_entropy_for_logits(&y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    assert_ne!(before, bits(&vs));
}

// --- a scheduler's step() is not mistaken for an unguarded optimizer --------------------------

/// An LR scheduler with a zero-argument `step()` that returns `()`.
struct Warmup(u32);
impl Warmup {
    fn step(&mut self) {
        self.0 += 1;
    }
}

#[guarded_step(on_nan = "skip")]
fn skip_then_schedule(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    sched: &mut Warmup,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    opt.backward_step(&net.forward(x).cross_entropy_for_logits(y));
    sched.step();
}

#[guarded_step(on_nan = "error")]
fn accumulate_and_schedule(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    sched: &mut Warmup,
    x: &Tensor,
    y: &Tensor,
    i: usize,
) -> Result<(), GuardError> {
    let _ = vs;
    net.forward(x).cross_entropy_for_logits(y).backward();
    if i % 2 == 1 {
        opt.step();
        opt.zero_grad();
    }
    sched.step(); // every micro-batch: no parameter changes, not an optimizer
    Ok(())
}

#[test]
fn a_scheduler_after_a_skipped_update_or_between_micro_batches_runs() {
    let (vs, net, mut opt) = linear_model(15.0);
    let mut sched = Warmup(0);
    let (x, y) = data(0.4);
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    skip_then_schedule(&mut opt, &vs, &net, &mut sched, &bad, &y);
    assert_eq!(
        sched.0, 1,
        "the skipped update did not turn the scheduler into an error"
    );
    for i in 0..4 {
        accumulate_and_schedule(&mut opt, &vs, &net, &mut sched, &x, &y, i)
            .expect("a scheduler stepped between micro-batches changes no parameter");
    }
    assert_eq!(sched.0, 5);
}

#[guarded_step(on_nan = "error")]
fn hand_step_with_var_store(
    opt: &mut HandSgd,
    vs: &nn::VarStore,
    net: &nn::Linear,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    Ok(())
}

#[test]
fn an_unseen_optimizer_is_caught_by_the_parameters_it_changed_when_the_var_store_is_known() {
    let (vs, net, _) = linear_model(16.0);
    let mut opt = HandSgd {
        params: vs.trainable_variables(),
        lr: 0.1,
    };
    let (x, y) = data(0.3);
    let err = hand_step_with_var_store(&mut opt, &vs, &net, &x, &y).unwrap_err();
    assert_eq!(err.check, Check::Unguarded);
    assert!(err.to_string().contains("HandSgd::step()"), "{err}");
}
