// Bodies emitted as a closure that can run twice (a failed call replayed), and bodies that
// cannot, must keep compiling and meaning the same.
use stepguard::{guarded_step, GuardError};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, TchError, Tensor};

fn setup() -> (nn::VarStore, nn::Linear, nn::Optimizer) {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::linear(vs.root() / "l", 3, 1, Default::default());
    let opt = nn::Sgd::default().build(&vs, 0.01).unwrap();
    (vs, net, opt)
}

fn x() -> Tensor {
    Tensor::ones([4, 3], (Kind::Float, Device::Cpu))
}

// `?` and `return` inside the closure: the function's return type, errors converted.
#[guarded_step(on_nan = "error")]
fn question_mark(opt: &mut nn::Optimizer, net: &nn::Linear, xs: &[Tensor]) -> Result<f64, TchError> {
    let mut total = 0.0;
    for (i, x) in xs.iter().enumerate() {
        if i > 1 {
            return Ok(total);
        }
        let loss = net.forward(x).mean(Kind::Float);
        opt.backward_step(&loss);
        total += f64::try_from(&loss)?;
    }
    Ok(total)
}

// A reference tied to an argument's lifetime, and a `mut` number copied afresh for each run.
#[guarded_step(checks(list = "loss,grads"))]
fn returns_a_reference<'a>(opt: &mut nn::Optimizer, net: &nn::Linear, xs: &'a [Tensor], mut k: usize) -> &'a Tensor {
    k += 1;
    let loss = net.forward(&xs[k - 1]).mean(Kind::Float);
    opt.backward_step(&loss);
    &xs[k - 1]
}

// A generic function, a closure in the body, a `&mut` argument moved (`for .. in`).
#[guarded_step]
fn generic<M: Module>(net: &M, opt: &mut nn::Optimizer, xs: &mut Vec<Tensor>, scale: f64) -> Vec<f64> {
    let loss_of = |x: &Tensor| net.forward(x).mean(Kind::Float) * scale;
    let mut out = Vec::new();
    for x in xs {
        let loss = loss_of(x);
        opt.backward_step(&loss);
        out.push(f64::try_from(&loss).unwrap());
    }
    out
}

struct Trainer {
    vs: nn::VarStore,
    net: nn::Linear,
    opt: nn::Optimizer,
    steps: u32,
}

impl Trainer {
    fn new() -> Self {
        let (vs, net, opt) = setup();
        Trainer { vs, net, opt, steps: 0 }
    }

    // A method: `self` and `Self` in the body.
    #[guarded_step(params = self.vs, on_nan = "skip")]
    fn step(&mut self, x: &Tensor) -> Option<Self> {
        let loss = self.net.forward(x).mean(Kind::Float);
        self.opt.backward_step(&loss);
        self.steps += 1;
        let none: Option<Self> = None;
        none
    }

    // A borrow of `&mut self` returned: not replayed, compiles as before.
    #[guarded_step(params = self.vs)]
    fn step_and_peek(&mut self, x: &Tensor) -> &nn::Linear {
        let loss = self.net.forward(x).mean(Kind::Float);
        self.opt.backward_step(&loss);
        &self.net
    }
}

// A `Vec<Tensor>` taken by value: not replayed, compiles as before.
#[guarded_step(on_nan = "error")]
fn by_value(batch: Vec<Tensor>, opt: &mut nn::Optimizer, net: &nn::Linear) -> Result<usize, GuardError> {
    for x in batch.into_iter() {
        let loss = net.forward(&x).mean(Kind::Float);
        opt.backward_step(&loss);
    }
    Ok(1)
}

// `impl Trait` returned: not replayed.
#[guarded_step]
fn returns_impl(opt: &mut nn::Optimizer, net: &nn::Linear, x: &Tensor) -> impl Iterator<Item = f64> {
    let loss = net.forward(x).mean(Kind::Float);
    opt.backward_step(&loss);
    vec![f64::try_from(&loss).unwrap()].into_iter()
}

// A coercion at the tail (`Box<dyn ..>`), and `checks(diagnose = "off")`.
#[guarded_step(checks(diagnose = "off"))]
fn boxed(opt: &mut nn::Optimizer, net: &nn::Linear, x: &Tensor) -> Box<dyn std::fmt::Debug> {
    let loss = net.forward(x).mean(Kind::Float);
    opt.backward_step(&loss);
    Box::new(loss)
}

// A `mut` reference argument reassigned in the body.
#[guarded_step(checks(list = "all", diagnose = "replay"))]
fn reassigned<'o>(mut opt: &'o mut nn::Optimizer, other: &'o mut nn::Optimizer, net: &nn::Linear, x: &Tensor, second: bool) {
    if second {
        opt = other;
    }
    let loss = net.forward(x).mean(Kind::Float);
    opt.backward_step(&loss);
}

fn main() {
    let (_vs, net, mut opt) = setup();
    let xs = [x(), x(), x()];
    assert!(question_mark(&mut opt, &net, &xs).unwrap().is_finite());
    let r = returns_a_reference(&mut opt, &net, &xs, 1);
    assert!(std::ptr::eq(r, &xs[1]));
    let mut v = vec![x(), x()];
    assert_eq!(generic(&net, &mut opt, &mut v, 2.0).len(), 2);

    let mut t = Trainer::new();
    assert!(t.step(&x()).is_none());
    assert_eq!(t.steps, 1);
    let _ = t.step_and_peek(&x());

    assert_eq!(by_value(vec![x()], &mut opt, &net).unwrap(), 1);
    assert!(returns_impl(&mut opt, &net, &x()).all(f64::is_finite));
    let _ = boxed(&mut opt, &net, &x());
    let (_vs2, _net2, mut opt2) = setup();
    reassigned(&mut opt, &mut opt2, &net, &x(), false);
}
