//! A failed call replayed under the ATen observer names where its NaN/Inf was born: the
//! operator (forward or backward), its inputs, the layer; or the input that already held it;
//! or says that the replay did not fail the same way. The replay leaves no trace: under `skip`
//! the run ends bitwise as a run without the bad batch.
//!
//! Every guarded function here is replayed on its first failure of each check only (as the
//! message is printed once): each test has functions of its own.

#![allow(clippy::result_large_err)]

use stepguard::replay::{Finding, Phase, Traced};
use stepguard::{guarded_step, Check, GuardError};
use stepguard_suite::{serial, test_device, var_bits};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

/// An energy-based head: `log` of the squared norm of its input times a learned temperature
/// (a blank image makes the energy 0 and the log -inf, inside the module's `forward`).
#[derive(Debug)]
struct Energy {
    fc: nn::Linear,
    temp: Tensor,
}

impl Energy {
    fn new(vs: &nn::VarStore) -> Energy {
        let root = vs.root();
        Energy {
            fc: nn::linear(&root / "fc", 8, 4, Default::default()),
            temp: (&root / "energy").ones("temp", &[1]),
        }
    }
}

impl Module for Energy {
    fn forward(&self, x: &Tensor) -> Tensor {
        let energy = (x.square().sum_dim_intlist(1, true, Kind::Float) * &self.temp).log();
        x.apply(&self.fc) + energy
    }
}

fn batch(blank: bool) -> (Tensor, Tensor) {
    let d = test_device();
    let x = (Tensor::arange(32, (Kind::Float, d)) * 0.37)
        .sin()
        .reshape([4, 8]);
    if blank {
        let _ = x.narrow(0, 1, 1).zero_();
    }
    (x, Tensor::arange(4, (Kind::Int64, d)).remainder(4))
}

fn origin(e: &GuardError) -> &Finding {
    match &e.origin {
        Some(Traced::Found { finding, .. }) => finding,
        other => panic!("no origin found: {other:?}\n{e}"),
    }
}

fn operator(e: &GuardError) -> &stepguard::replay::OpOrigin {
    match origin(e) {
        Finding::Operator(op) => op,
        other => panic!("not an operator: {other:?}\n{e}"),
    }
}

#[guarded_step(on_nan = "error")]
fn energy_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &Energy,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn a_log_of_zero_inside_a_module_names_the_log_and_its_layer() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let net = Energy::new(&vs);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let (x, y) = batch(false);
    energy_step(&mut opt, &vs, &net, &x, &y).unwrap();
    let before = var_bits(&vs);
    let (x, y) = batch(true);
    let e = energy_step(&mut opt, &vs, &net, &x, &y).expect_err("log(0) in the forward");
    assert_eq!(e.check, Check::Loss, "{e}");
    let op = operator(&e);
    assert_eq!(op.op, "aten::log", "{e}");
    assert!(matches!(op.phase, Phase::Forward), "{e}");
    assert_eq!(
        op.after_parameter.as_deref().or(op.parameter.as_deref()),
        Some("energy.temp"),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("aten::log"), "{text}");
    assert!(
        !text.contains("protection of / and log was on"),
        "claims no protection: {text}"
    );
    assert_eq!(var_bits(&vs), before, "nothing applied");
    assert_eq!(
        stepguard::registry()
            .find(|s| s.name() == "energy_step")
            .map(|s| s.stats().calls),
        Some(2),
        "the replay counts as the same call"
    );
}

/// `x / scale`, with a learned `scale`.
#[derive(Debug)]
struct Scaled {
    scale: Tensor,
    fc: nn::Linear,
}

#[guarded_step(on_nan = "error")]
fn divide_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &Scaled,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let h = x.apply(&net.fc).divide(&net.scale);
    let loss = h.cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn a_division_by_a_parameter_that_reached_zero_names_the_operator_and_the_parameter() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let root = vs.root();
    let net = Scaled {
        scale: (&root / "norm").ones("scale", &[4]),
        fc: nn::linear(&root / "fc", 8, 4, Default::default()),
    };
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    tch::no_grad(|| {
        let _ = net.scale.shallow_clone().narrow(0, 2, 1).zero_();
    });
    let (x, y) = batch(false);
    let e = divide_step(&mut opt, &vs, &net, &x, &y).expect_err("a division by 0");
    let op = operator(&e);
    assert_eq!(op.op, "aten::div", "{e}");
    assert_eq!(op.parameter.as_deref(), Some("norm.scale"), "{e}");
    assert!(
        matches!(op.hint, Some(stepguard::replay::Hint::ZeroDivisor)),
        "{e}"
    );
}

#[guarded_step(on_nan = "error", checks = "grads")]
fn sqrt_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    w: &Tensor,
    x: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = (x * w).sqrt().sum(Kind::Float);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn sqrt_at_zero_names_the_backward_of_sqrt() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let w = vs.root().ones("w", &[4]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::from_slice(&[1.0f32, 0.0, 2.0, 3.0]).to_device(test_device());
    let e = sqrt_step(&mut opt, &vs, &w, &x).expect_err("an infinite grad");
    assert_eq!(e.check, Check::Grads, "{e}");
    let op = operator(&e);
    match &op.phase {
        Phase::Backward { node, of, .. } => {
            assert_eq!(node, "SqrtBackward0", "{e}");
            assert_eq!(of.as_deref(), Some("aten::sqrt"), "{e}");
        }
        Phase::Forward => panic!("in the backward: {e}"),
        _ => panic!("{e}"),
    }
}

/// `loss.backward()` on a thread of its own, as CUDA's autograd engine runs a backward on its
/// device threads: the observer must see operators of a thread other than the step's.
fn backward_on_another_thread(loss: &Tensor) {
    let loss = loss.shallow_clone();
    std::thread::spawn(move || loss.backward())
        .join()
        .expect("the backward's thread");
}

#[guarded_step(on_nan = "error", checks = "grads")]
fn sqrt_step_backward_elsewhere(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    w: &Tensor,
    x: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = (x * w).sqrt().sum(Kind::Float);
    opt.zero_grad();
    backward_on_another_thread(&loss);
    opt.step();
    Ok(())
}

#[test]
fn a_backward_run_on_another_thread_is_seen() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let w = vs.root().ones("w", &[4]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::from_slice(&[1.0f32, 0.0, 2.0, 3.0]).to_device(test_device());
    let before = var_bits(&vs);
    let e = sqrt_step_backward_elsewhere(&mut opt, &vs, &w, &x).expect_err("an infinite grad");
    assert_eq!(e.check, Check::Grads, "{e}");
    let op = operator(&e);
    match &op.phase {
        Phase::Backward { node, of, .. } => {
            assert_eq!(node, "SqrtBackward0", "{e}");
            assert_eq!(of.as_deref(), Some("aten::sqrt"), "{e}");
        }
        _ => panic!("not in the backward: {e}"),
    }
    assert_eq!(var_bits(&vs), before, "no update applied");
}

#[guarded_step(on_nan = "error")]
fn huge_step(
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
fn an_overflow_in_a_matmul_names_it_and_the_huge_weight() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "l1", 8, 16, Default::default()))
        .add(nn::linear(&root / "l2", 16, 4, Default::default()));
    tch::no_grad(|| {
        for (name, t) in vs.variables() {
            if name == "l2.weight" {
                let _ = t.shallow_clone().fill_(1e30);
            }
        }
    });
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let (x, y) = batch(false);
    let x = x * 1e10;
    let e = huge_step(&mut opt, &vs, &net, &x, &y).expect_err("an overflow");
    let op = operator(&e);
    assert!(op.op.contains("mm"), "a matrix product: {e}");
    assert_eq!(op.parameter.as_deref(), Some("l2.weight"), "{e}");
}

#[guarded_step(on_nan = "error", protect = "none")]
fn attention_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    q: &Tensor,
    x: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let scores = q.matmul(&x.transpose(0, 1));
    let n = scores.size()[0];
    let mask = Tensor::ones([n, n], (Kind::Bool, scores.device())).triu(1);
    let attn = scores
        .masked_fill(&mask, f64::NEG_INFINITY)
        .softmax(-1, Kind::Float);
    // A real fault after the intended infinities: the log of a weight that is 0.
    let loss = attn.log().mean(Kind::Float);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn intended_infinities_of_an_attention_mask_are_not_blamed() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let q = vs.root().randn_standard("q", &[4, 8]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let (x, _) = batch(false);
    let e = attention_step(&mut opt, &vs, &q, &x).expect_err("log(0) of a masked weight");
    let op = operator(&e);
    assert_eq!(op.op, "aten::log", "not the mask: {e}");
}

#[guarded_step(on_nan = "error")]
fn nan_batch_step(
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
fn a_nan_already_in_the_batch_names_the_argument() {
    let _serial = serial();
    let vs = nn::VarStore::new(test_device());
    let net = nn::linear(vs.root() / "fc", 8, 4, Default::default());
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let (x, y) = batch(false);
    let _ = x.narrow(0, 0, 1).fill_(f64::NAN);
    let e = nan_batch_step(&mut opt, &vs, &net, &x, &y).expect_err("a NaN in the batch");
    match origin(&e) {
        Finding::Input(i) => {
            assert_eq!(
                i.source,
                stepguard::replay::Source::Argument("x".into()),
                "{e}"
            )
        }
        other => panic!("the argument, not {other:?}: {e}"),
    }
    assert!(e.to_string().contains("argument `x`"), "{e}");
}

#[guarded_step(on_nan = "error", protect = "none")]
fn dropout_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, w: &Tensor) -> Result<(), GuardError> {
    let _ = vs;
    // One dropped weight or none: log(0) only when the mask drops it.
    let kept = w.dropout(0.5, true);
    let loss = kept.log().sum(Kind::Float);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn dropout_before_the_fault_draws_the_same_mask_on_replay() {
    let _serial = serial();
    let d = test_device();
    let draws = |seed: i64| {
        tch::manual_seed(seed);
        let one = Tensor::ones([1], (Kind::Float, d));
        let a = one.dropout(0.5, true).double_value(&[0]);
        let b = one.dropout(0.5, true).double_value(&[0]);
        (a, b)
    };
    // A seed whose first draw drops the weight and whose second keeps it: a replay that did
    // not draw the same mask again would pass.
    let seed = (0..1000)
        .find(|&s| draws(s) == (0.0, 2.0))
        .expect("a seed that drops, then keeps");
    let vs = nn::VarStore::new(d);
    let w = vs.root().ones("w", &[1]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    tch::manual_seed(seed);
    let e = dropout_step(&mut opt, &vs, &w).expect_err("the dropped weight's log");
    assert_eq!(operator(&e).op, "aten::log", "reproduced: {e}");
}

#[guarded_step(on_nan = "error")]
fn draws_its_own_batch(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Linear,
    batches: &mut std::vec::IntoIter<Tensor>,
) -> Result<(), GuardError> {
    let _ = vs;
    let x = batches.next().unwrap();
    let loss = net.forward(&x).square().mean(Kind::Float);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn a_body_that_draws_its_own_batch_is_not_reproduced_and_says_so() {
    let _serial = serial();
    let d = test_device();
    let vs = nn::VarStore::new(d);
    let net = nn::linear(vs.root() / "fc", 8, 4, Default::default());
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let (good, _) = batch(false);
    let bad = good.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    let mut batches = vec![bad, good].into_iter();
    let before = var_bits(&vs);
    let e = draws_its_own_batch(&mut opt, &vs, &net, &mut batches).expect_err("the bad batch");
    assert_eq!(e.origin, Some(Traced::NotReproduced), "{e}");
    assert!(e.to_string().contains("not reproduced on replay"), "{e}");
    assert_eq!(
        var_bits(&vs),
        before,
        "the good batch the replay drew was not applied"
    );
}

#[guarded_step(on_nan = "skip")]
fn skipping_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = tch::nn::ModuleT::forward_t(net, x, true)
        .dropout(0.2, true)
        .cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[guarded_step(on_nan = "skip")]
fn skipping_twin(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = tch::nn::ModuleT::forward_t(net, x, true)
        .dropout(0.2, true)
        .cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

#[test]
fn under_skip_the_replayed_batch_leaves_no_trace() {
    let _serial = serial();
    let d = test_device();
    let model = || {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(d);
        let root = vs.root();
        let net = nn::seq_t()
            .add(nn::linear(&root / "fc", 8, 6, Default::default()))
            .add(nn::batch_norm1d(&root / "bn", 6, Default::default()))
            .add(nn::linear(&root / "out", 6, 4, Default::default()));
        let opt = nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(&vs, 0.1)
        .unwrap();
        (vs, net, opt)
    };
    let good = |k: usize| {
        let (x, y) = batch(false);
        (x * (1.0 + k as f64 * 0.1), y)
    };
    let (vs, net, mut opt) = model();
    tch::manual_seed(11);
    for k in 0..2 {
        let (x, y) = good(k);
        skipping_step(&mut opt, &vs, &net, &x, &y);
    }
    let (bad, y) = batch(false);
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    // The generators as they were before the bad batch, for the run without it.
    skipping_step(&mut opt, &vs, &net, &bad, &y);
    let after_bad = tch::Tensor::randn([8], (Kind::Float, tch::Device::Cpu));
    let (x, y) = good(2);
    skipping_step(&mut opt, &vs, &net, &x, &y);
    let with_bad = var_bits(&vs);

    let (vs2, net2, mut opt2) = model();
    tch::manual_seed(11);
    for k in 0..2 {
        let (x, y) = good(k);
        skipping_twin(&mut opt2, &vs2, &net2, &x, &y);
    }
    // The skipped call drew its dropout mask once: draw it here too.
    let _ = Tensor::ones([4, 4], (Kind::Float, d)).dropout(0.2, true);
    let after = tch::Tensor::randn([8], (Kind::Float, tch::Device::Cpu));
    assert!(
        after.equal(&after_bad),
        "the replay left the generators where one run leaves them"
    );
    let (x, y) = good(2);
    skipping_twin(&mut opt2, &vs2, &net2, &x, &y);
    assert_eq!(
        with_bad,
        var_bits(&vs2),
        "parameters, momentum and buffers as without the batch"
    );
}

macro_rules! failing_steps {
    ($($name:ident),*) => {$(
        #[guarded_step(on_nan = skip(max = 100))]
        fn $name(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
            let _ = vs;
            let loss = net.forward(x).cross_entropy_for_logits(y);
            opt.backward_step(&loss);
        }
    )*};
}

failing_steps!(
    replayed_a, replayed_b, replayed_c, replayed_d, replayed_e, replayed_f, replayed_g, replayed_h,
    replayed_i, replayed_j
);

#[guarded_step(on_nan = skip(max = 100), checks(diagnose = "off"))]
fn unreplayed(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
}

type Step = fn(&mut nn::Optimizer, &nn::VarStore, &nn::Sequential, &Tensor, &Tensor);

/// The failure path's cost against a healthy guarded step, on the bench MLPs (input 64, 10
/// classes, SGD, CPU): a failed call replayed (the first failure of each function), and the
/// same failure without a replay. Timings, nothing asserted:
/// `cargo test --release --test replay -- --ignored --nocapture cost_of_the_failure_path`.
#[test]
#[ignore = "prints timings; run by hand, in release"]
fn cost_of_the_failure_path() {
    let _serial = serial();
    tch::set_num_threads(1);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let all: [Step; 10] = [
        replayed_a, replayed_b, replayed_c, replayed_d, replayed_e, replayed_f, replayed_g,
        replayed_h, replayed_i, replayed_j,
    ];
    for (k, (layers, width, batch)) in [(8usize, 256i64, 64i64), (50, 64, 32)]
        .into_iter()
        .enumerate()
    {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = stepguard_suite::mlp(&vs.root(), layers, width);
        let mut opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
        let x = Tensor::randn([batch, 64], (Kind::Float, tch::Device::Cpu));
        let y = Tensor::randint(10, [batch], (Kind::Int64, tch::Device::Cpu));
        let bad = x.copy();
        let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
        let time = |f: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        };
        // Each function replays its first failure only: five fresh ones per model.
        let steps = &all[k * 5..k * 5 + 5];
        for s in steps {
            s(&mut opt, &vs, &net, &x, &y); // warm-up, healthy
        }
        unreplayed(&mut opt, &vs, &net, &x, &y);
        let healthy = median(
            (0..20)
                .map(|_| time(&mut || steps[0](&mut opt, &vs, &net, &x, &y)))
                .collect(),
        );
        let replayed = median(
            steps
                .iter()
                .map(|s| time(&mut || s(&mut opt, &vs, &net, &bad, &y)))
                .collect(),
        );
        let plain_failure = median(
            (0..5)
                .map(|_| time(&mut || unreplayed(&mut opt, &vs, &net, &bad, &y)))
                .collect(),
        );
        println!(
            "{layers} x Linear({width}), batch {batch}: healthy guarded step {:.2} ms; failed call \
             replayed {:.2} ms ({:.1}x); failed call without replay {:.2} ms ({:.1}x)",
            healthy * 1e3,
            replayed * 1e3,
            replayed / healthy,
            plain_failure * 1e3,
            plain_failure / healthy
        );
    }
}
