//! A small conv-net classifier, `backward_step` in a batch loop, guarded.
//!
//! 8x8 images of a horizontal or a vertical bar in noise; `cargo run --example convnet`.

use stepguard::guarded_step;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn net(vs: &nn::Path) -> nn::SequentialT {
    nn::seq_t()
        .add(nn::conv2d(vs / "conv1", 1, 8, 3, Default::default()))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        .add_fn(|x| x.flatten(1, -1))
        .add(nn::linear(vs / "fc", 8 * 3 * 3, 2, Default::default()))
}

/// Images of bars: label 0 horizontal, 1 vertical.
fn batches(n: usize, batch: i64) -> Vec<(Tensor, Tensor)> {
    (0..n)
        .map(|_| {
            let y = Tensor::randint(2, [batch], (Kind::Int64, Device::Cpu));
            let pos = Tensor::randint(8, [batch], (Kind::Int64, Device::Cpu));
            let bar = pos
                .one_hot(8)
                .to_kind(Kind::Float)
                .unsqueeze(-1)
                .expand([batch, 8, 8], false);
            let vertical = y.to_kind(Kind::Float).view([batch, 1, 1]);
            let img = &bar * (1.0f64 - &vertical) + bar.transpose(1, 2) * &vertical;
            (
                img.unsqueeze(1)
                    + Tensor::randn([batch, 1, 8, 8], (Kind::Float, Device::Cpu)) * 0.2,
                y,
            )
        })
        .collect()
}

/// One epoch: the loop people write, one attribute on it.
#[guarded_step(max_norm = 5)]
fn train_epoch(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::SequentialT,
    data: &[(Tensor, Tensor)],
) -> f64 {
    let _ = vs;
    let mut total = 0.0;
    for (x, y) in data {
        let loss = net.forward_t(x, true).cross_entropy_for_logits(y);
        opt.backward_step(&loss);
        total += f64::try_from(&loss).unwrap();
    }
    total / data.len() as f64
}

/// Trains for `epochs`; returns the mean loss of the first and the last epoch.
pub fn run(epochs: usize) -> (f64, f64) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs.root());
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let data = batches(8, 32);
    let losses: Vec<f64> = (0..epochs)
        .map(|_| train_epoch(&mut opt, &vs, &model, &data))
        .collect();
    (losses[0], *losses.last().unwrap())
}

fn main() {
    let (first, last) = run(15);
    println!(
        "conv-net: mean loss {first:.4} -> {last:.4}\n\n{}",
        stepguard::report()
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn learns_under_the_guard() {
        let (first, last) = super::run(6);
        assert!(last.is_finite() && last < first, "{first} -> {last}");
    }
}
