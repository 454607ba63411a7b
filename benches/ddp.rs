//! One data-parallel training step (SGD, the MLPs of `benches/torch_reference.py`), in every
//! rank of a `torchrun` launch: unguarded, guarded, and guarded with the ranks' consensus.
//!
//! Run by `scripts/bench-ddp.sh` (with PyTorch DDP, `benches/torch_ddp.py`, in interleaved
//! launches):
//! `torchrun --standalone --nproc-per-node 2 --no-python <this bench binary> --bench`.
//! Environment: `STEPGUARD_BENCH_SHAPES` (`layers x width x batch`, the batch per rank),
//! `STEPGUARD_BENCH_STEPS` (steps per variant and round), `STEPGUARD_BENCH_ROUNDS`,
//! `STEPGUARD_BENCH_WARMUP`, `STEPGUARD_BENCH_DEVICE=cuda` (each rank on `cuda:LOCAL_RANK`,
//! NCCL; with `STEPGUARD_DIST_C10D=1` a single GPU runs a world of one through NCCL). Rank 0
//! prints one JSON line per shape, variant and round, then one with each variant's counts.
//! Without `torchrun` (and under `cargo test --all-targets`) it runs as a world of one.

use std::time::Instant;

use stepguard::dist::{DataParallel, ProcessGroup};
use stepguard::guarded_step;
use stepguard_suite::mlp;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

struct Model {
    vs: nn::VarStore,
    net: nn::Sequential,
    opt: nn::Optimizer,
    ddp: DataParallel,
}

#[derive(Clone, Copy)]
enum Variant {
    Plain,
    Guarded,
    Consensus,
}

const VARIANTS: [(Variant, &str); 3] = [
    (Variant::Plain, "unguarded"),
    (Variant::Guarded, "#[guarded_step(max_norm = 5)]"),
    (
        Variant::Consensus,
        "#[guarded_step(max_norm = 5, group = pg)] (consensus)",
    ),
];

fn plain(m: &mut Model, x: &Tensor, y: &Tensor) {
    let loss = m.net.forward(x).cross_entropy_for_logits(y);
    m.opt.zero_grad();
    loss.backward();
    m.ddp.average_gradients().unwrap();
    m.opt.step();
}

#[guarded_step(max_norm = 5)]
fn guarded(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    ddp: &DataParallel,
    x: &Tensor,
    y: &Tensor,
) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients().unwrap();
    opt.step();
}

#[guarded_step(max_norm = 5, group = pg)]
#[allow(clippy::too_many_arguments)]
fn consensus(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    ddp: &DataParallel,
    pg: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
) {
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients().unwrap();
    opt.step();
}

fn step(m: &mut Model, v: Variant, pg: &ProcessGroup, x: &Tensor, y: &Tensor) {
    match v {
        Variant::Plain => plain(m, x, y),
        Variant::Guarded => guarded(&mut m.opt, &m.vs, &m.net, &m.ddp, x, y),
        Variant::Consensus => consensus(&mut m.opt, &m.vs, &m.net, &m.ddp, pg, x, y),
    }
}

fn main() {
    tch::set_num_threads(1);
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let steps = env("STEPGUARD_BENCH_STEPS", if smoke { 2 } else { 40 });
    let rounds = env("STEPGUARD_BENCH_ROUNDS", if smoke { 1 } else { 5 });
    let warmup = env("STEPGUARD_BENCH_WARMUP", if smoke { 1 } else { 10 });
    let shapes = std::env::var("STEPGUARD_BENCH_SHAPES").unwrap_or_else(|_| "8x256x64".into());
    let pg = ProcessGroup::from_env().expect("a process group from torchrun's environment");
    let device = match std::env::var("STEPGUARD_BENCH_DEVICE").as_deref() {
        Ok("cuda") => pg.device(),
        _ => Device::Cpu,
    };
    let settle = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for shape in shapes.split(',') {
        let v: Vec<i64> = shape
            .split('x')
            .map(|n| n.trim().parse().expect("layers x width x batch"))
            .collect();
        let (layers, width, batch) = (v[0] as usize, v[1], v[2]);
        // Each rank its own batch of the same size (as PyTorch's reference).
        tch::manual_seed(1 + pg.rank() as i64);
        let x = Tensor::randn([batch, 64], (Kind::Float, device));
        let y = Tensor::randint(10, [batch], (Kind::Int64, device));
        let mut models: Vec<Model> = VARIANTS
            .iter()
            .map(|_| {
                let vs = nn::VarStore::new(device);
                let net = mlp(&vs.root(), layers, width);
                let opt = nn::Sgd::default().build(&vs, 1e-3).unwrap();
                let ddp = DataParallel::new(&pg, &vs).unwrap();
                Model { vs, net, opt, ddp }
            })
            .collect();
        for (m, (v, _)) in models.iter_mut().zip(VARIANTS) {
            (0..warmup).for_each(|_| step(m, v, &pg, &x, &y));
        }
        settle();
        for round in 0..rounds {
            for (m, (v, name)) in models.iter_mut().zip(VARIANTS) {
                pg.barrier().unwrap();
                let t = Instant::now();
                (0..steps).for_each(|_| step(m, v, &pg, &x, &y));
                settle();
                let rate = steps as f64 / t.elapsed().as_secs_f64();
                if pg.is_main() {
                    println!(
                        "{{\"shape\": \"{shape}\", \"variant\": \"{}\", \"round\": {round}, \"steps_per_s\": {rate:.3}, \"world\": {}}}",
                        name.replace('"', "\\\""),
                        pg.world_size()
                    );
                }
            }
        }
        // One more step of each, counted: collectives issued and ATen operators dispatched.
        for (m, (v, name)) in models.iter_mut().zip(VARIANTS) {
            let before = pg.collectives();
            let ((), ops) = stepguard::testing::count_aten_ops(|| step(m, v, &pg, &x, &y));
            let collectives = pg.collectives() - before;
            if pg.is_main() {
                println!(
                    "{{\"shape\": \"{shape}\", \"variant\": \"{}\", \"collectives\": {collectives}, \"aten_ops\": {ops}, \"buckets\": {}}}",
                    name.replace('"', "\\\""),
                    m.ddp.bucket_count()
                );
            }
        }
    }
}
