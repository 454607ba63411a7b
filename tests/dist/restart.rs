//! torchrun restarts a data-parallel group whose rank was killed (`--max-restarts`), and the
//! run, resumed from its checkpoints, ends bitwise as an uninterrupted one: the replicated
//! state written once by rank 0 (`Checkpoints::save_run_ranks`), every rank resumes from the
//! same step (`Checkpoints::resume_run_ranks`), and a restarted group rendezvous under keys of
//! its own in the agent's store.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stepguard::checkpoint::Checkpoints;
use stepguard::dist::{DataParallel, DistError, ProcessGroup};
use stepguard::guarded_step;
use stepguard::optim::{FusedOptimizer, Sgd};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::launch::{free_port, Scratch, OUT, ROLE};
use super::{save, vars};

const STEPS: u64 = 12;
/// Rank 1 of the first start kills itself (SIGKILL) after this update (its last save was 9).
const KILL_AFTER: u64 = 10;
const KILL: &str = "STEPGUARD_DIST_TEST_KILL";

fn net(vs: &nn::VarStore) -> nn::Sequential {
    let p = vs.root();
    nn::seq()
        .add(nn::linear(&p / "l1", 8, 32, Default::default()))
        .add_fn(|x| x.relu().dropout(0.2, true))
        .add(nn::linear(&p / "l2", 32, 3, Default::default()))
}

#[guarded_step(max_norm = 1, on_nan = "skip", spike(sigmas = 6, warmup = 2), group = pg)]
fn step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    model: &nn::Sequential,
    ddp: &DataParallel,
    pg: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), DistError> {
    let _ = vs;
    let loss = model.forward(x).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    ddp.average_gradients()?;
    opt.step();
    Ok(())
}

/// One rank's run: resume (every rank from the same step), train, save every 3 updates.
pub fn run(pg: &ProcessGroup, out: &Path) {
    let r = pg.rank();
    let attempt: u32 = std::env::var("TORCHELASTIC_RESTART_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    tch::manual_seed(100 + r as i64); // each rank's own batches and dropout masks
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let ddp = DataParallel::new(pg, &vs).unwrap();
    let mut opt = Sgd {
        momentum: 0.9,
        ..Sgd::default()
    }
    .build(&vs, 0.05)
    .unwrap();
    let store = Checkpoints::new(out.join("checkpoints")).keep(3);
    let resumed = store
        .resume_run_ranks::<u64>(pg, &vs, Some(&mut opt))
        .unwrap();
    let mut next = resumed.as_ref().map_or(0, |r| r.position);
    std::fs::write(
        out.join(format!("attempt{attempt}.rank{r}")),
        format!("resumed at {next}"),
    )
    .unwrap();
    while next < STEPS {
        let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
        if next == 5 && r == 1 {
            let _ = x.get(0).get(0).fill_(f64::NAN); // skipped on both ranks
        }
        step(&mut opt, &vs, &model, &ddp, pg, &x, &y).unwrap();
        next += 1;
        if next % 3 == 0 {
            store
                .save_run_ranks(pg, next, &vs, Some(&opt), &next)
                .unwrap();
        }
        if next == KILL_AFTER && r == 1 && attempt == 0 && std::env::var(KILL).is_ok() {
            let _ = Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    save(out, &format!("final{r}"), vars(&vs));
    save(out, &format!("moments{r}"), opt.state());
}

/// `torchrun --nproc-per-node 2 --max-restarts 3` of this test binary's "restart" role; the
/// scratch folder and torchrun's output.
fn torchrun(kill: bool) -> (Scratch, String) {
    let dir = Scratch::new(if kill {
        "restart-killed"
    } else {
        "restart-plain"
    });
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("torchrun");
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "3",
        "--monitor-interval",
        "0.2",
    ])
    .arg(format!("--master-port={}", free_port()))
    .arg("--no-python")
    .arg(&exe)
    .args(["--exact", "rank_main", "--nocapture", "--test-threads=1"])
    .env(ROLE, "restart")
    .env(OUT, &dir.0)
    .env("STEPGUARD_DIST_TIMEOUT", "60")
    .env("OMP_NUM_THREADS", "1")
    .stdin(Stdio::null());
    if kill {
        cmd.env(KILL, "1");
    }
    let start = Instant::now();
    let output = cmd
        .output()
        .expect("torchrun (installed with torch by scripts/env.sh)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "torchrun failed after {:?}:\n{text}",
        start.elapsed()
    );
    (dir, text)
}

#[test]
fn torchrun_restarts_a_killed_rank_and_the_run_ends_bitwise_as_an_uninterrupted_one() {
    let (plain, _) = torchrun(false);
    let (killed, log) = torchrun(true);
    let replicated = killed.0.join("checkpoints/replicated/step-0000000009");
    assert!(
        replicated.join("model.safetensors").exists(),
        "rank 0 wrote the model once"
    );
    for r in 0..2 {
        let resumed = std::fs::read_to_string(killed.0.join(format!("attempt1.rank{r}")))
            .unwrap_or_else(|_| panic!("no second start of rank {r}:\n{log}"));
        assert_eq!(resumed, "resumed at 9", "rank {r}");
        let own = killed.0.join(format!("checkpoints/rank{r}"));
        assert!(
            own.join("step-0000000009/generators.safetensors").exists(),
            "{own:?}"
        );
        for name in ["final", "moments"] {
            let a = super::load(&plain.0, &format!("{name}{r}"));
            let b = super::load(&killed.0, &format!("{name}{r}"));
            super::assert_bitwise(&a, &b, &format!("{name} of rank {r}"));
        }
    }
}
