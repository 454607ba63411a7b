// Shapes that must keep compiling (and running) under #[guarded_step].
use stepguard::{guarded_step, GuardError};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

struct Scheduler(u32);
impl Scheduler {
    fn step(&mut self) {
        self.0 += 1;
    }
}

struct Trainer {
    vs: nn::VarStore,
    net: nn::Linear,
    opt: nn::Optimizer,
    sched: Scheduler,
}

impl Trainer {
    #[guarded_step(max_norm = 1.5, params = self.vs, on_nan = "error")]
    fn step_all(&mut self, batches: &[Tensor]) -> Result<usize, GuardError> {
        let mut n = 0;
        for x in batches {
            if x.size()[0] == 0 {
                continue;
            }
            let loss = self.net.forward(x).pow_tensor_scalar(2).mean(Kind::Float);
            let loss = match n {
                0 => loss / 2.0,
                _ => loss,
            };
            self.opt.zero_grad();
            loss.backward();
            self.opt.step();
            n += 1;
        }
        self.sched.step();
        Ok(n)
    }
}

#[guarded_step(checks = "loss", protect = "div")]
fn closure_step<F>(f: F, opt: &mut nn::Optimizer, x: &Tensor) -> f64
where
    F: Fn(&Tensor) -> Tensor,
{
    let mut run = |x: &Tensor| {
        let loss = f(x).mean(Kind::Float) / x.abs().sum(Kind::Float);
        opt.backward_step(&loss);
        loss
    };
    let l = run(x);
    let plain = 7 / 2 + (1.0f64 / 0.0).is_infinite() as i32;
    f64::try_from(l).unwrap() + plain as f64
}

#[guarded_step(checks = "none", protect = "log")]
fn protect_only(x: &Tensor) -> Tensor {
    x.log()
}

fn main() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::linear(vs.root() / "l", 3, 1, Default::default());
    let opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let mut t = Trainer { vs, net, opt, sched: Scheduler(0) };
    let x = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
    assert_eq!(t.step_all(&[x.shallow_clone(), Tensor::zeros([0, 3], (Kind::Float, Device::Cpu))]).unwrap(), 1);
    assert_eq!(t.sched.0, 1);

    let vs2 = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs2.root() / "m", 3, 2, Default::default());
    let mut opt2 = nn::Sgd::default().build(&vs2, 0.1).unwrap();
    let v = closure_step(|x| lin.forward(x), &mut opt2, &x);
    assert!(v.is_finite());
    assert_eq!(fn_closure(&[x.shallow_clone()]).len(), 1);
    assert!(f64::try_from(protect_only(&Tensor::zeros([1], (Kind::Float, Device::Cpu)))).unwrap().is_finite());
}

// A closure with a guarded division stays `Fn`.
#[guarded_step(checks = "none")]
fn fn_closure(xs: &[Tensor]) -> Vec<Tensor> {
    let norm = |x: &Tensor| x / x.sum(Kind::Float);
    fn takes_fn(f: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> Tensor {
        f(x)
    }
    xs.iter().map(|x| takes_fn(norm, x)).collect()
}

// The grouped forms of the arguments, long and short.
#[guarded_step(
    max_norm = adaptive(sigmas = 2, warmup = 5, window = 10),
    protect(ops = "div", eps = 1e-6),
    loss_scale(init = 1024, growth = 2, backoff = 0.25, interval = 10, min = 2),
    spike(sigmas = 5, warmup = 3, window = 8),
    on_nan = skip(max = 2),
    rollback = 4
)]
fn grouped(opt: &mut nn::Optimizer, loss: &Tensor) {
    opt.backward_step(loss);
}

#[guarded_step(max_norm = adaptive, protect = "log", loss_scale(), spike = 6)]
fn grouped_short(opt: &mut nn::Optimizer, loss: &Tensor) {
    opt.backward_step(loss);
}
