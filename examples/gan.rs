//! A GAN with two VarStores and two optimizers, one guarded step for both updates.
//!
//! The generator learns a 1-d Gaussian (mean 3, std 0.5); `cargo run --example gan`.

use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn mlp(vs: nn::Path, i: i64, o: i64) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(&vs / "l1", i, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&vs / "l2", 16, o, Default::default()))
}

/// Both updates of one GAN step. `log` is epsilon-protected: a saturated discriminator
/// (`sigmoid` = 1 exactly) would otherwise give `log(0)`.
#[guarded_step(max_norm = 1)]
#[allow(clippy::too_many_arguments)]
fn gan_step(
    g: &nn::Sequential,
    d: &nn::Sequential,
    g_vs: &nn::VarStore,
    d_vs: &nn::VarStore,
    g_opt: &mut nn::Optimizer,
    d_opt: &mut nn::Optimizer,
    z: &Tensor,
    real: &Tensor,
) -> (f64, f64) {
    let _ = (g_vs, d_vs);
    let fake = g.forward(z);
    let d_real = d.forward(real).sigmoid();
    let d_fake = d.forward(&fake.detach()).sigmoid();
    let d_loss = -(d_real.log() + (1.0f64 - d_fake).log()).mean(Kind::Float);
    d_opt.backward_step(&d_loss);
    let g_loss = -d.forward(&fake).sigmoid().log().mean(Kind::Float);
    g_opt.zero_grad();
    g_loss.backward();
    g_opt.step();
    (
        f64::try_from(&d_loss).unwrap(),
        f64::try_from(&g_loss).unwrap(),
    )
}

/// Trains for `steps`; returns the mean of generated samples.
pub fn run(steps: usize) -> f64 {
    tch::manual_seed(0);
    let (g_vs, d_vs) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let (g, d) = (
        mlp(g_vs.root() / "gen", 4, 1),
        mlp(d_vs.root() / "disc", 1, 1),
    );
    let mut g_opt = nn::Adam::default().build(&g_vs, 2e-3).unwrap();
    let mut d_opt = nn::Adam::default().build(&d_vs, 2e-3).unwrap();
    for _ in 0..steps {
        let z = Tensor::randn([64, 4], (Kind::Float, Device::Cpu));
        let real = Tensor::randn([64, 1], (Kind::Float, Device::Cpu)) * 0.5 + 3.0;
        gan_step(&g, &d, &g_vs, &d_vs, &mut g_opt, &mut d_opt, &z, &real);
    }
    let z = Tensor::randn([1000, 4], (Kind::Float, Device::Cpu));
    f64::try_from(tch::no_grad(|| g.forward(&z).mean(Kind::Float))).unwrap()
}

fn main() {
    let mean = run(1500);
    println!(
        "gan: generated mean {mean:.3} (target 3.0)\n\n{}",
        stepguard::report()
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn generator_moves_towards_the_data() {
        let start = super::run(0);
        let trained = super::run(300);
        assert!(
            (trained - 3.0).abs() < (start - 3.0).abs(),
            "{start} -> {trained}"
        );
    }
}
