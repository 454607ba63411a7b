//! Behaviour on real tensors (the CPU, or `STEPGUARD_TEST_DEVICE=cuda`): each fault of a step
//! is named where it was born; nothing stays registered.

use std::sync::MutexGuard;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::*;

/// One watch at a time per process, and these tests draw random numbers: they take turns with
/// each other and with the other tests that draw.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    crate::shim::drawing()
}

/// The device of the workspace's tests (`tests/support`): `STEPGUARD_TEST_DEVICE=cuda` (or
/// `cuda:N`), else the CPU.
fn device() -> Device {
    match std::env::var("STEPGUARD_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        Ok(s) if s.starts_with("cuda:") => Device::Cuda(s[5..].parse().expect("cuda:N")),
        _ => Device::Cpu,
    }
}

/// Arms a watch naming every variable of `vs` and the step's `args`.
fn arm(vs: &nn::VarStore, args: &[(&str, &Tensor)]) -> Watch {
    let vars = vs.variables();
    let mut named: Vec<(String, &Tensor, Role)> = vars
        .iter()
        .map(|(n, t)| (n.clone(), t, Role::Parameter))
        .collect();
    named.extend(
        args.iter()
            .map(|(n, t)| (n.to_string(), *t, Role::Argument)),
    );
    Watch::arm(&named).expect("arm a watch")
}

/// fc1 (16 -> 32), tanh, fc2 (32 -> 8).
fn mlp(vs: &nn::VarStore) -> impl Module {
    let root = vs.root();
    nn::seq()
        .add(nn::linear(&root / "fc1", 16, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "fc2", 32, 8, Default::default()))
}

/// Ones of `shape` with a zero at [0, 0].
fn zero_at_origin(shape: [i64; 2], d: Device) -> Tensor {
    let m = Tensor::ones(shape, (Kind::Float, d));
    let _ = m.get(0).get(0).fill_(0.0);
    m
}

fn operator(f: Option<Finding>) -> OpOrigin {
    match f {
        Some(Finding::Operator(o)) => {
            eprintln!("{o}");
            o
        }
        other => panic!("expected an operator, found {other:?}"),
    }
}

fn input(f: Option<Finding>) -> InputOrigin {
    match f {
        Some(Finding::Input(i)) => {
            eprintln!("{i}");
            i
        }
        other => panic!("expected an input, found {other:?}"),
    }
}

fn finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) != 0
}

#[test]
fn log_of_zero_in_the_forward_is_born_in_aten_log() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let mask = zero_at_origin([4, 8], d);
    let watch = arm(&vs, &[("x", &x)]);
    let loss = (net.forward(&x).square() * &mask).log().mean(Kind::Float);
    loss.backward();
    let o = operator(watch.finish().unwrap());
    assert!(!finite(&loss));
    assert_eq!(o.op, "aten::log");
    assert_eq!(o.phase, Phase::Forward);
    assert_eq!(o.produced, NonFinite::Inf);
    assert_eq!(o.inputs.len(), 1);
    assert_eq!(
        (o.inputs[0].dtype.as_str(), &o.inputs[0].shape[..]),
        ("Float", &[4, 8][..])
    );
    assert!(o.inputs[0].finite && o.inputs[0].zeros);
    assert_eq!(o.hint, Some(Hint::Zeros { input: 0 }));
    assert_eq!(o.parameter, None);
    assert_eq!(o.after_parameter.as_deref(), Some("fc2.weight"));
    let shown = o.to_string();
    assert!(
        shown.starts_with("born in aten::log (forward) of Float[4, 8]"),
        "{shown}"
    );
    assert!(shown.contains("its input held zeros"), "{shown}");
}

#[test]
fn sqrt_at_zero_is_born_in_its_backward() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(1);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let mask = zero_at_origin([4, 8], d);
    let watch = arm(&vs, &[("x", &x)]);
    let loss = (net.forward(&x).square() * &mask).sqrt().mean(Kind::Float);
    loss.backward();
    let o = operator(watch.finish().unwrap());
    assert!(finite(&loss), "the forward is finite");
    assert_eq!(o.op, "aten::div");
    match &o.phase {
        Phase::Backward {
            node,
            of,
            of_inputs,
        } => {
            assert_eq!(node, "SqrtBackward0");
            assert_eq!(of.as_deref(), Some("aten::sqrt"));
            assert_eq!(of_inputs.len(), 1);
            assert_eq!(of_inputs[0].shape, [4, 8]);
        }
        other => panic!("expected the backward, found {other:?}"),
    }
    assert_eq!(o.hint, Some(Hint::ZeroDivisor));
    let shown = o.to_string();
    assert!(
        shown.starts_with(
            "born in aten::div in the backward of aten::sqrt(Float[4, 8]) (SqrtBackward0)"
        ),
        "{shown}"
    );
}

#[test]
fn division_by_a_parameter_at_zero_names_the_parameter() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(2);
    let vs = nn::VarStore::new(d);
    let root = vs.root();
    let fc1 = nn::linear(&root / "fc1", 16, 8, Default::default());
    let temp = (&root / "energy").var("temp", &[1], nn::Init::Const(0.0));
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let watch = arm(&vs, &[("x", &x)]);
    let energy = fc1.forward(&x) / &temp;
    let loss = energy.square().mean(Kind::Float);
    loss.backward();
    let o = operator(watch.finish().unwrap());
    assert_eq!(o.op, "aten::div");
    assert_eq!(o.phase, Phase::Forward);
    assert_eq!(o.parameter.as_deref(), Some("energy.temp"));
    assert_eq!(o.inputs[1].parameter.as_deref(), Some("energy.temp"));
    assert_eq!(o.hint, Some(Hint::ZeroDivisor));
    assert!(o
        .to_string()
        .ends_with("its divisor held zeros; layer: energy.temp"));
}

#[test]
fn an_overflow_in_mm_names_mm_and_the_huge_weight() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(d);
    let w = (&vs.root() / "fc1").var(
        "weight",
        &[16, 32],
        nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    );
    tch::no_grad(|| {
        let _ = w.get(0).get(5).fill_(3e38);
    });
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let _ = x.select(1, 0).fill_(4.0);
    let watch = arm(&vs, &[("x", &x)]);
    let loss = x.matmul(&w).square().mean(Kind::Float);
    loss.backward();
    let o = operator(watch.finish().unwrap());
    assert!(!finite(&loss));
    assert_eq!(o.op, "aten::mm");
    assert_eq!(o.phase, Phase::Forward);
    assert_eq!(o.within.as_deref(), Some("aten::matmul"));
    assert_eq!(o.parameter.as_deref(), Some("fc1.weight"));
    assert_eq!(o.inputs[0].argument.as_deref(), Some("x"));
    assert!(matches!(o.hint, Some(Hint::Large { input: 1, value }) if value >= 3e38));
    assert!(
        o.to_string().contains("fc1.weight reached |x| = 3e38"),
        "{o}"
    );
}

#[test]
fn an_exp_overflow_names_the_largest_input_of_exp() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(9);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let watch = arm(&vs, &[("x", &x)]);
    // Logits scaled far past what exp takes in f32 (about 88.7).
    let logits = net.forward(&x) * 1e3;
    let loss = logits.exp().sum(Kind::Float).log();
    loss.backward();
    let o = operator(watch.finish().unwrap());
    assert_eq!(o.op, "aten::exp");
    assert_eq!(o.phase, Phase::Forward);
    let top = tch::no_grad(|| f64::try_from(logits.max()).unwrap());
    assert!(matches!(o.hint, Some(Hint::Exponent { value }) if value == top && value > 88.8));
    assert!(o.to_string().contains("its input reached"), "{o}");
}

#[test]
fn an_absorbed_minus_inf_mask_is_not_blamed_for_a_later_log_of_zero() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(4);
    let vs = nn::VarStore::new(d);
    let attn = vs.root() / "attn";
    let randn = || nn::Init::Randn {
        mean: 0.0,
        stdev: 0.5,
    };
    let (wq, wk, wv) = (
        attn.var("q", &[8, 8], randn()),
        attn.var("k", &[8, 8], randn()),
        attn.var("v", &[8, 8], randn()),
    );
    let x = Tensor::randn([4, 8], (Kind::Float, d));
    let causal = Tensor::ones([4, 4], (Kind::Bool, d)).triu(1);
    let mask = zero_at_origin([4, 8], d);
    let watch = arm(&vs, &[("x", &x)]);
    let (q, k, v) = (x.matmul(&wq), x.matmul(&wk), x.matmul(&wv));
    // Two -inf masks, made during the step, both absorbed by the softmax.
    let scores = q.matmul(&k.tr()).masked_fill(&causal, f64::NEG_INFINITY);
    let additive = Tensor::full([4, 4], f64::NEG_INFINITY, (Kind::Float, d)).triu(2);
    let probs = (scores + additive).softmax(-1, Kind::Float);
    let out = probs.matmul(&v);
    let loss = (out.square() * &mask).log().mean(Kind::Float);
    loss.backward();
    let o = operator(watch.finish().unwrap());
    assert!(finite(&probs), "the softmax absorbed the masks");
    assert_eq!(o.op, "aten::log");
    assert_eq!(o.phase, Phase::Forward);
    assert_eq!(o.hint, Some(Hint::Zeros { input: 0 }));
}

#[test]
fn a_nan_already_in_an_argument_names_the_argument() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(5);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let _ = x.get(1).get(2).fill_(f64::NAN);
    let watch = arm(&vs, &[("x", &x)]);
    let loss = net.forward(&x).square().mean(Kind::Float);
    loss.backward();
    let i = input(watch.finish().unwrap());
    assert_eq!(i.source, Source::Argument("x".into()));
    assert_eq!(i.held, NonFinite::Nan);
    assert_eq!(i.input.shape, [4, 16]);
    assert_eq!(i.read_by, "aten::linear");
    assert_eq!(
        i.to_string(),
        "already in the argument `x` (Float[4, 16], NaN), first read by aten::linear (forward)"
    );
}

#[test]
fn an_inf_already_in_a_parameter_names_the_parameter() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(6);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    tch::no_grad(|| {
        let _ = vs.variables()["fc2.bias"].get(3).fill_(f64::INFINITY);
    });
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let watch = arm(&vs, &[("x", &x)]);
    let loss = net.forward(&x).mean(Kind::Float);
    loss.backward();
    let i = input(watch.finish().unwrap());
    assert_eq!(i.source, Source::Parameter("fc2.bias".into()));
    assert_eq!(i.held, NonFinite::Inf);
}

#[test]
fn an_inf_in_an_unnamed_input_is_reported_as_such() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(7);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let offset = Tensor::zeros([4, 8], (Kind::Float, d));
    let _ = offset.get(2).fill_(f64::INFINITY);
    let watch = arm(&vs, &[("x", &x)]);
    let loss = (net.forward(&x) + &offset).mean(Kind::Float);
    loss.backward();
    let i = input(watch.finish().unwrap());
    assert_eq!(i.source, Source::Unproduced);
    assert_eq!(i.read_by, "aten::add");
    assert!(i
        .to_string()
        .starts_with("already in an input not produced during the step"));
}

#[test]
fn a_finite_step_finds_nothing_and_other_threads_are_not_watched() {
    let _one = one_at_a_time();
    let d = device();
    tch::manual_seed(8);
    let vs = nn::VarStore::new(d);
    let net = mlp(&vs);
    let x = Tensor::randn([4, 16], (Kind::Float, d));
    let watch = arm(&vs, &[("x", &x)]);
    // Another thread makes -inf (forward and backward) while the watch is armed.
    std::thread::spawn(move || {
        let z = Tensor::zeros([3], (Kind::Float, d)).set_requires_grad(true);
        z.log().sum(Kind::Float).backward();
    })
    .join()
    .unwrap();
    let loss = net.forward(&x).square().mean(Kind::Float);
    loss.backward();
    assert_eq!(watch.finish().unwrap(), None);
}

#[test]
fn nothing_is_registered_unless_armed() {
    let _one = one_at_a_time();
    assert!(
        !armed() && !watch::global_callbacks(),
        "registered before any watch"
    );
    let x = Tensor::ones([2], (Kind::Float, device()));
    let named = [("x".to_string(), &x, Role::Argument)];
    let w = Watch::arm(&named).unwrap();
    assert!(armed() && watch::global_callbacks());
    let second = Watch::arm(&named).expect_err("a second watch while one is armed");
    assert!(second.message().contains("already armed"), "{second}");
    assert!(armed(), "the refused second watch disarmed the first");
    let _ = x.log();
    assert_eq!(w.finish().unwrap(), None);
    assert!(
        !armed() && !watch::global_callbacks(),
        "registered after finish"
    );

    // Dropped without finish.
    let w = Watch::arm(&named).unwrap();
    let _ = (&x * 2.0).sum(Kind::Float);
    drop(w);
    assert!(
        !armed() && !watch::global_callbacks(),
        "registered after a drop"
    );

    // A panic while armed.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _w = Watch::arm(&named).unwrap();
        panic!("the step failed");
    }));
    assert!(r.is_err());
    assert!(
        !armed() && !watch::global_callbacks(),
        "registered after a panic"
    );

    // And the next watch works.
    let w = Watch::arm(&named).unwrap();
    let y = (&x - 1.0).log();
    assert!(matches!(w.finish().unwrap(), Some(Finding::Operator(o)) if o.op == "aten::log"));
    drop(y);
}

#[test]
fn a_malformed_or_dangling_record_is_an_error() {
    use super::trace::Trace;
    assert!(Trace::parse("X\t1\n").is_err());
    assert!(Trace::parse("V\t0\t-1\t-1\t-1\t0\tFloat\t4,x\n").is_err());
    let log = "V\t0\t-1\t-1\t-1\t0\tFloat\t4\nO\t0\t-1\t-1\t-1\t-1\taten::log\t\t0\t1\n";
    let t = Trace::parse(log).unwrap();
    assert_eq!(t.ops[0].name, "aten::log");
    assert!(t.check(1, 0).is_err(), "its output 1 is not recorded");
    let with_out = format!("{log}V\t1\t0\t-1\t-1\t0\tFloat\t4\n");
    let t = Trace::parse(&with_out).unwrap();
    assert!(t.check(2, 0).is_ok());
    assert!(t.check(1, 0).is_err(), "a row of statistics is missing");
}

/// `STEPGUARD_REPLAY_TRACE=1`: prints the observer's record and the statistics of each watch
/// a test finishes (for debugging the analysis).
pub(super) fn dump(text: &str, stats: &[f64]) {
    if std::env::var_os("STEPGUARD_REPLAY_TRACE").is_some() {
        eprintln!("{text}");
        for (i, row) in stats.chunks(3).enumerate() {
            eprintln!("S\t{i}\t{row:?}");
        }
    }
}
