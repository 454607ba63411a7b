use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

// Clip the global grad norm to 5; on NaN/Inf skip the batch (the update is not applied).
#[guarded_step(max_norm = 5, on_nan = "skip")]
fn train_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore, // names the parameters in messages
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward(); // the loss is checked here, on the device
    opt.step(); // clip, check the grads and parameters, then step (or skip)
    loss.double_value(&[])
}

/// Each batch's loss; `None` for a batch the guard skipped.
fn train(steps: usize) -> Vec<Option<f64>> {
    tch::manual_seed(0);
    let device = Device::cuda_if_available();
    let vs = nn::VarStore::new(device);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "hidden", 2, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "out", 32, 2, Default::default()));
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let mut losses = Vec::new();
    for step in 0..steps {
        // Synthetic data: is the point inside the circle of radius 1.2?
        let x = Tensor::randn([64, 2], (Kind::Float, device));
        let y = x
            .norm_scalaropt_dim(2, [1], false)
            .lt(1.2)
            .to_kind(Kind::Int64);
        if step == 30 {
            let _ = x.get(0).fill_(f64::NAN); // one corrupted batch
        }
        let loss = train_step(&mut opt, &vs, &net, &x, &y);
        // Ask the guard what it decided for this call: a skipped batch's loss stays out.
        let skipped = stepguard::last_outcome().is_some_and(|o| o.skipped());
        losses.push((!skipped).then_some(loss));
    }
    losses
}

fn main() {
    let losses: Vec<f64> = train(200).into_iter().flatten().collect(); // the applied batches
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    let (first, last, n) = (losses[0], losses[losses.len() - 1], losses.len());
    println!("loss {first:.3} -> {last:.3}, mean {mean:.3} over {n} batches");
    println!("{}", stepguard::report());
}

#[cfg(test)]
mod tests {
    #[test]
    fn skips_the_nan_batch_and_keeps_learning() {
        let losses = super::train(120);
        assert_eq!(
            losses[30], None,
            "the planted batch was skipped, and said so"
        );
        let applied: Vec<f64> = losses.iter().flatten().copied().collect();
        assert_eq!(applied.len(), 119, "{losses:?}");
        assert!(applied.iter().all(|l| l.is_finite()), "{losses:?}");
        assert!(applied[118] < applied[0] / 2.0, "{losses:?}");
        let site = stepguard::registry()
            .find(|s| s.name() == "train_step")
            .unwrap();
        assert_eq!((site.stats().calls, site.stats().skipped), (120, 1));
    }
}
