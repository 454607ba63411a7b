//! A hand-written optimizer (SGD with momentum) guarded like tch's own: it implements
//! `stepguard::GuardedOptimizer`. `cargo run --example custom_optimizer`.

use stepguard::guarded_step;
use stepguard::optim::GuardedOptimizer;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// SGD with momentum, written by hand.
struct Momentum {
    params: Vec<Tensor>,
    velocity: Vec<Tensor>,
    lr: f64,
    mu: f64,
}

impl Momentum {
    fn new(vs: &nn::VarStore, lr: f64, mu: f64) -> Self {
        let params = vs.trainable_variables();
        let velocity = params.iter().map(Tensor::zeros_like).collect();
        Momentum {
            params,
            velocity,
            lr,
            mu,
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
        tch::no_grad(|| {
            for (p, v) in self.params.iter_mut().zip(&mut self.velocity) {
                let g = p.grad();
                let _ = v.g_mul_scalar_(self.mu).g_add_(&g);
                let _ = p.g_sub_(&(&*v * self.lr));
            }
        });
    }
}

impl GuardedOptimizer for Momentum {
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

#[guarded_step(max_norm = 1, on_nan = "skip")]
fn train_step(
    opt: &mut Momentum,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let _ = vs;
    let loss = (net.forward(x) - y).square().mean(Kind::Float);
    opt.zero_grad();
    loss.backward();
    opt.step();
    f64::try_from(&loss).unwrap()
}

/// Fits y = sin(3x) for `steps`, with one corrupted batch (skipped); returns first and last
/// loss and the skip count.
pub fn run(steps: usize) -> (f64, f64, u64) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let net = nn::seq()
        .add(nn::linear(&p / "l1", 1, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&p / "l2", 32, 1, Default::default()));
    let mut opt = Momentum::new(&vs, 0.05, 0.9);
    let x = Tensor::linspace(-1.0, 1.0, 64, (Kind::Float, Device::Cpu)).unsqueeze(1);
    let y = (&x * 3.0).sin();
    let site = stepguard::registry()
        .find(|s| s.name() == "train_step")
        .unwrap();
    let skipped0 = site.stats().skipped;
    let mut losses = Vec::new();
    for step in 0..steps {
        let xb = if step == steps / 2 {
            x.ones_like() * f64::NAN
        } else {
            x.shallow_clone()
        };
        losses.push(train_step(&mut opt, &vs, &net, &xb, &y));
    }
    let last = *losses.iter().rev().find(|l| l.is_finite()).unwrap();
    (losses[0], last, site.stats().skipped - skipped0)
}

fn main() {
    let (first, last, skipped) = run(400);
    println!(
        "custom optimizer: loss {first:.4} -> {last:.4}, {skipped} bad batch skipped\n\n{}",
        stepguard::report()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use stepguard_suite::{all_finite, serial, var_bits};

    /// `train_step` without the attribute, with its clipping (`max_norm = 1`) written out.
    fn train_step_plain(
        opt: &mut Momentum,
        vs: &nn::VarStore,
        net: &nn::Sequential,
        x: &Tensor,
        y: &Tensor,
    ) -> f64 {
        let _ = vs;
        let loss = (net.forward(x) - y).square().mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        let _ = stepguard::clip_grad_norm(&opt.params, 1.0, 2).unwrap();
        opt.step();
        f64::try_from(&loss).unwrap()
    }

    #[test]
    fn learns_and_skips_the_bad_batch() {
        let _serial = serial(); // `run` seeds and draws from tch's global generator
        let (first, last, skipped) = super::run(40);
        assert!(last < first, "{first} -> {last}");
        assert_eq!(skipped, 1);
    }

    fn net(vs: &nn::VarStore) -> nn::Sequential {
        let p = vs.root();
        nn::seq()
            .add(nn::linear(&p / "l1", 1, 32, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&p / "l2", 32, 1, Default::default()))
    }

    fn velocity_bits(opt: &Momentum) -> Vec<Vec<u32>> {
        opt.velocity
            .iter()
            .map(|v| {
                let v = Vec::<f32>::try_from(v.flatten(0, -1)).unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    }

    #[test]
    fn guarded_step_is_the_plain_one_and_skips_a_nan_batch_untouched() {
        let _serial = serial();
        tch::manual_seed(5); // the initial weights (held by `serial`: no other test draws)
        let (vs_a, mut vs_b) = (
            nn::VarStore::new(Device::Cpu),
            nn::VarStore::new(Device::Cpu),
        );
        let (net_a, net_b) = (net(&vs_a), net(&vs_b));
        vs_b.copy(&vs_a).unwrap();
        let (mut opt_a, mut opt_b) = (
            Momentum::new(&vs_a, 0.05, 0.9),
            Momentum::new(&vs_b, 0.05, 0.9),
        );
        let x = Tensor::linspace(-1.0, 1.0, 64, (Kind::Float, Device::Cpu)).unsqueeze(1);
        let y = (&x * 3.0).sin();
        let site = stepguard::registry()
            .find(|s| s.name() == "train_step")
            .expect("registered");
        let (clipped, skipped) = (site.stats().clipped, site.stats().skipped);
        for _ in 0..5 {
            let a = train_step_plain(&mut opt_a, &vs_a, &net_a, &x, &y);
            let b = train_step(&mut opt_b, &vs_b, &net_b, &x, &y);
            assert_eq!(a.to_bits(), b.to_bits(), "same loss");
        }
        assert!(
            site.stats().clipped > clipped,
            "clipping engaged: compared with it by hand"
        );
        assert_eq!(var_bits(&vs_a), var_bits(&vs_b), "bitwise the plain step");
        assert_eq!(velocity_bits(&opt_a), velocity_bits(&opt_b));

        // A NaN batch: skipped, parameters and momentum bitwise untouched.
        let bad = x.ones_like() * f64::NAN;
        let before = (var_bits(&vs_b), velocity_bits(&opt_b));
        let loss = train_step(&mut opt_b, &vs_b, &net_b, &bad, &y);
        assert!(loss.is_nan());
        assert_eq!(site.stats().skipped, skipped + 1);
        assert_eq!(
            before,
            (var_bits(&vs_b), velocity_bits(&opt_b)),
            "skipped untouched"
        );
        // The next good step is the plain copy's next step, as if the bad batch never came.
        let a = train_step_plain(&mut opt_a, &vs_a, &net_a, &x, &y);
        let b = train_step(&mut opt_b, &vs_b, &net_b, &x, &y);
        assert_eq!(a.to_bits(), b.to_bits());
        assert_eq!(var_bits(&vs_a), var_bits(&vs_b));
        // Without the guard the NaN batch poisons the weights and the momentum.
        train_step_plain(&mut opt_a, &vs_a, &net_a, &bad, &y);
        assert!(!all_finite(&vs_a), "the plain step applies the NaN update");
    }
}
