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
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use stepguard_suite::{all_finite, serial, var_bits};

    /// `train_epoch` without the attribute: the same body.
    fn train_epoch_plain(
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

    #[test]
    fn learns_under_the_guard() {
        let _serial = serial(); // `run` seeds and draws from tch's global generator
        let (first, last) = super::run(6);
        assert!(last.is_finite() && last < first, "{first} -> {last}");
    }

    #[test]
    fn guarded_epoch_is_the_plain_one_and_stops_at_a_nan_batch() {
        let _serial = serial();
        tch::manual_seed(1);
        let data = batches(3, 16);
        let (vs_a, mut vs_b) = (
            nn::VarStore::new(Device::Cpu),
            nn::VarStore::new(Device::Cpu),
        );
        let (net_a, net_b) = (net(&vs_a.root()), net(&vs_b.root()));
        vs_b.copy(&vs_a).unwrap();
        let mut opt_a = nn::Adam::default().build(&vs_a, 1e-2).unwrap();
        let mut opt_b = nn::Adam::default().build(&vs_b, 1e-2).unwrap();
        let site = stepguard::registry()
            .find(|s| s.name() == "train_epoch")
            .expect("registered");
        let clipped = site.stats().clipped;
        for _ in 0..2 {
            let a = train_epoch_plain(&mut opt_a, &vs_a, &net_a, &data);
            let b = train_epoch(&mut opt_b, &vs_b, &net_b, &data);
            assert_eq!(a.to_bits(), b.to_bits(), "same mean loss");
        }
        assert_eq!(
            site.stats().clipped,
            clipped,
            "no norm above 5 on these batches"
        );
        assert_eq!(var_bits(&vs_a), var_bits(&vs_b), "bitwise the plain epoch");

        // One NaN pixel in the second batch: the guard applies the first batch, then stops
        // before the bad update, naming the loss.
        let (x, y) = &data[1];
        let bad = x.copy();
        let _ = bad.narrow(0, 3, 1).narrow(2, 4, 1).fill_(f64::NAN);
        let epoch = [
            (data[0].0.shallow_clone(), data[0].1.shallow_clone()),
            (bad, y.shallow_clone()),
        ];
        let err = catch_unwind(AssertUnwindSafe(|| {
            train_epoch(&mut opt_b, &vs_b, &net_b, &epoch)
        }))
        .expect_err("the guard panics on the NaN batch");
        let text = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("non-finite loss in `train_epoch`"), "{text}");
        train_epoch_plain(&mut opt_a, &vs_a, &net_a, &epoch[..1]);
        assert_eq!(var_bits(&vs_a), var_bits(&vs_b), "the first batch only");
        assert!(all_finite(&vs_b));
        // Without the guard the same batch makes every parameter it reaches NaN.
        train_epoch_plain(&mut opt_a, &vs_a, &net_a, &epoch[1..]);
        assert!(!all_finite(&vs_a), "the plain epoch applies the NaN update");
    }
}
