//! A world of one process through c10d (`STEPGUARD_DIST_C10D=1`): one GPU through NCCL under
//! `STEPGUARD_TEST_DEVICE=cuda` (`scripts/gpu-check.sh`), Gloo on the CPU here. The collectives
//! really run (counted), and the guard's consensus rides on the gradients' last bucket.

use std::path::Path;

use stepguard::dist::{DataParallel, ProcessGroup, ReduceOp};
use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Tensor};

use super::launch::{Ranks, Scratch};
use super::{assert_bitwise, batch, load, mlp, save, vars, LIMIT};

/// The device of this test run: `cuda:0` under `STEPGUARD_TEST_DEVICE=cuda`.
fn device() -> Device {
    match std::env::var("STEPGUARD_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    }
}

#[guarded_step(on_nan = "skip", group = pg)]
fn step(
    pg: &ProcessGroup,
    ddp: &DataParallel,
    opt: &mut nn::Optimizer,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
    nan: bool,
) {
    let _ = pg;
    let mut loss = net.forward(x).mse_loss(y, tch::Reduction::Mean);
    if nan {
        loss += Tensor::from(f32::NAN).to_device(x.device());
    }
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients().unwrap();
    opt.step();
}

/// The role: collectives on the device, then three guarded steps, the second with a NaN loss.
pub fn run(pg: &ProcessGroup, out: &Path) {
    let device = device();
    let mut lines = vec![format!("device {device:?}")];
    let t = Tensor::from_slice(&[1.5f32, f32::NAN]).to_device(device);
    pg.all_reduce(&t, ReduceOp::Sum).unwrap();
    pg.broadcast(&t, 0).unwrap();
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu)).unwrap();
    lines.push(format!("all_reduce {} {}", v[0], v[1].is_nan()));
    lines.push(format!("collectives {}", pg.collectives()));
    tch::manual_seed(3);
    let vs = nn::VarStore::new(device);
    let net = mlp(&vs.root());
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let (x, y) = batch();
    let (x, y) = (x.to_device(device), y.to_device(device));
    for k in 0..3 {
        let before = pg.collectives();
        step(pg, &ddp, &mut opt, &net, &x, &y, k == 1);
        lines.push(format!(
            "step {k}: {} collectives, {} buckets",
            pg.collectives() - before,
            ddp.bucket_count()
        ));
        let after: Vec<_> = vars(&vs)
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu)))
            .collect();
        save(out, &format!("step{k}"), after);
    }
    std::fs::write(out.join("one"), lines.join("\n")).unwrap();
}

#[test]
fn a_world_of_one_through_c10d_runs_its_collectives_and_skips_a_nan_step() {
    let dir = Scratch::new("c10d_one");
    let mut ranks = Ranks::start("c10d_one", &[0], 1, 60.0, &dir.0);
    ranks.wait_all_ok(LIMIT);
    let d = &dir.0;
    let text = std::fs::read_to_string(d.join("one")).unwrap();
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[1], "all_reduce 1.5 true");
    // Through c10d: the all-reduce and the broadcast, then every parameter broadcast in one
    // bucket by DataParallel.
    assert_eq!(lines[2], "collectives 2");
    for (k, l) in lines[3..].iter().enumerate() {
        let buckets: u64 = l
            .rsplit(", ")
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(buckets >= 1, "{l}");
        // The NaN step's first failure is replayed under the ATen observer: its body (the
        // averaging included) runs twice.
        let runs = if k == 1 { 2 } else { 1 };
        assert_eq!(
            *l,
            format!(
                "step {k}: {} collectives, {buckets} buckets",
                runs * buckets
            )
        );
    }
    // The NaN step changed nothing; the steps around it did.
    assert_bitwise(&load(d, "step1"), &load(d, "step0"), "the skipped step");
    let moved = std::panic::catch_unwind(|| {
        assert_bitwise(&load(d, "step2"), &load(d, "step1"), "the next step")
    });
    assert!(moved.is_err(), "the step after the NaN did not train");
}
