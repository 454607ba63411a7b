//! Where a NaN was born: a `log` of a zero energy inside a module's `forward`, and a `sqrt`
//! at 0 whose gradient is infinite. `cargo run --example origin` prints both errors, each with
//! its `origin` line, found by replaying the failed call under an ATen observer.

use stepguard::{guarded_step, GuardError};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// `log` of the squared norm of the input times a learned temperature: 0 for a blank input.
#[derive(Debug)]
struct Energy {
    fc: nn::Linear,
    temp: Tensor,
}

impl Module for Energy {
    fn forward(&self, x: &Tensor) -> Tensor {
        let energy = (x.square().sum_dim_intlist(1, true, Kind::Float) * &self.temp).log();
        x.apply(&self.fc) + energy
    }
}

#[guarded_step(on_nan = "error")]
fn train_step(
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

fn main() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = Energy {
        fc: nn::linear(&root / "fc", 8, 4, Default::default()),
        temp: (&root / "energy").ones("temp", &[1]),
    };
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = (Tensor::arange(32, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .reshape([4, 8]);
    let _ = x.narrow(0, 1, 1).zero_(); // a blank image
    let y = Tensor::arange(4, (Kind::Int64, Device::Cpu));
    if let Err(e) = train_step(&mut opt, &vs, &net, &x, &y) {
        println!("{e}\n");
    }

    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[4]);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::from_slice(&[1.0f32, 0.0, 2.0, 3.0]);
    if let Err(e) = sqrt_step(&mut opt, &vs, &w, &x) {
        println!("{e}");
    }
}
