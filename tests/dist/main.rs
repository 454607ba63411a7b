//! `stepguard::dist` with two processes on localhost (Gloo, CPU). This test binary runs itself
//! as the ranks (`launch.rs`); each rank writes its tensors to a scratch directory and the
//! parent test compares them.

mod consensus;
mod consensus_modes;
mod launch;
mod one;
mod rendezvous;
mod restart;
mod roles;
mod sparse;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use launch::{Ranks, Scratch, OUT, ROLE};
use stepguard::dist::{DataParallel, Launch, ProcessGroup, ReduceOp, MAX_TIMEOUT};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Bound on any two-rank run here (CI: two shared cores).
const LIMIT: Duration = Duration::from_secs(120);
const STEPS: usize = 5;
const LR: f64 = 0.1;

fn mlp(vs: &nn::Path) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs / "l1", 4, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs / "l2", 16, 2, Default::default()))
}

/// The full batch: 16 rows; rank r of 2 takes rows 8r..8r+8.
fn batch() -> (Tensor, Tensor) {
    let x = (Tensor::arange(64, (Kind::Float, Device::Cpu)).view([16, 4]) * 0.37).sin();
    let y = (Tensor::arange(32, (Kind::Float, Device::Cpu)).view([16, 2]) * 0.91).cos();
    (x, y)
}

fn sgd_step(opt: &mut nn::Optimizer, net: &nn::Sequential, x: &Tensor, y: &Tensor) {
    opt.zero_grad();
    net.forward(x).mse_loss(y, tch::Reduction::Mean).backward();
}

fn save(dir: &Path, name: &str, ts: Vec<(String, Tensor)>) {
    Tensor::save_multi(&ts, dir.join(name)).unwrap();
}

fn load(dir: &Path, name: &str) -> Vec<(String, Tensor)> {
    let mut v = Tensor::load_multi(dir.join(name)).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous().view([-1]);
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn assert_bitwise(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{what}");
        assert_eq!(ta.size(), tb.size(), "{what}: {na}");
        assert!(bits(ta) == bits(tb), "{what}: {na} differs:\n{ta}\n{tb}");
    }
}

/// A rank's body: runs the role named by `ROLE` (nothing in the parent's own run).
#[test]
fn rank_main() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    tch::set_num_threads(1);
    let out = PathBuf::from(std::env::var(OUT).unwrap());
    let start = Instant::now();
    let pg = match ProcessGroup::from_env() {
        Ok(pg) => pg,
        Err(e) => {
            // The "rendezvous" role expects this (rendezvous.rs).
            std::fs::write(
                out.join("error"),
                format!("{}\n{e}", start.elapsed().as_millis()),
            )
            .unwrap();
            return;
        }
    };
    roles::run(&role, &pg, &out);
}

fn run_two(role: &str, timeout_s: f64) -> Scratch {
    let dir = Scratch::new(role);
    let mut ranks = Ranks::start(role, &[0, 1], 2, timeout_s, &dir.0);
    ranks.wait_all_ok(LIMIT);
    dir
}

#[test]
fn broadcast_makes_parameters_and_buffers_bitwise_equal_and_all_reduce_reduces() {
    let dir = run_two("broadcast", 60.0);
    let d = &dir.0;
    let (before0, before1) = (load(d, "before0"), load(d, "before1"));
    assert!(
        bits(&before0[0].1) != bits(&before1[0].1),
        "the ranks started equal: vacuous"
    );
    assert_bitwise(&load(d, "after0"), &before0, "rank 0 after");
    assert_bitwise(&load(d, "after1"), &before0, "rank 1 after");
    let (r0, r1) = (load(d, "reduce0"), load(d, "reduce1"));
    assert_bitwise(&r0, &r1, "all_reduce results");
    let get = |n: &str| r0.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let f32s = |n: &str| Vec::<f32>::try_from(get(n).reshape([-1])).unwrap();
    assert_eq!(f32s("sum"), [3.0, -1.0, 3.0]);
    assert_eq!(f32s("max"), [2.0, 0.0, 3.0]);
    assert_eq!(f32s("min"), [1.0, -1.0, 0.0]);
    assert_eq!(Vec::<f64>::try_from(get("f64")).unwrap(), [0.1 + 0.2]);
    assert_eq!(Vec::<i64>::try_from(get("i64")).unwrap(), [7]);
    assert_eq!(f32s("t"), [3.0, 9.0, 6.0, 12.0]); // the transposed view, written back
}

#[test]
fn bucketed_average_is_the_mean_bitwise_on_both_ranks() {
    let dir = run_two("average", 60.0);
    let d = &dir.0;
    let (in0, in1) = (load(d, "input0"), load(d, "input1"));
    let expected: Vec<(String, Tensor)> = in0
        .iter()
        .zip(&in1)
        .map(|((n, a), (_, b))| (n.clone(), (a + b) / 2.0))
        .collect();
    assert!(bits(&in0[2].1) != bits(&in1[2].1), "equal inputs: vacuous");
    assert_bitwise(&load(d, "output0"), &expected, "rank 0's average");
    assert_bitwise(&load(d, "output1"), &expected, "rank 1's average");
}

#[test]
fn data_parallel_sgd_is_one_process_on_the_whole_batch() {
    let dir = run_two("sgd", 60.0);
    let d = &dir.0;
    let (final0, final1) = (load(d, "final0"), load(d, "final1"));
    assert_bitwise(&final0, &final1, "the ranks' parameters after training");
    // One process, the concatenated batch, rank 0's initial parameters.
    let init = load(d, "init0");
    assert_bitwise(&init, &load(d, "init1"), "the broadcast parameters");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            t.copy_(&init.iter().find(|(n, _)| *n == name).unwrap().1);
        }
    });
    let mut opt = nn::Sgd::default().build(&vs, LR).unwrap();
    let (x, y) = batch();
    for _ in 0..STEPS {
        sgd_step(&mut opt, &net, &x, &y);
        opt.step();
    }
    let single = vars(&vs);
    let mut moved = 0.0f64;
    for ((n, a), (_, b)) in single.iter().zip(&final0) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{n}: {diff}");
        moved += (a - &init.iter().find(|(k, _)| k == n).unwrap().1)
            .abs()
            .max()
            .double_value(&[]);
    }
    assert!(moved > 1e-3, "training did not move the parameters");
}

fn peer_lost(role: &str) -> (u128, String) {
    let dir = Scratch::new(role);
    let timeout_s = 5.0;
    let mut ranks = Ranks::start(role, &[0, 1], 2, timeout_s, &dir.0);
    let status = ranks.wait(0, LIMIT);
    let logs = ranks.logs();
    ranks.kill_all();
    assert!(status.success(), "rank 0: {status}\n{logs}");
    let text = std::fs::read_to_string(dir.0.join("error")).unwrap();
    let (ms, e) = text.split_once('\n').unwrap();
    eprintln!("{role}: after {ms} ms: {e}");
    (ms.parse().unwrap(), e.to_string())
}

#[test]
fn a_killed_peer_is_a_clear_error_naming_it_within_the_timeout() {
    let (ms, e) = peer_lost("killed");
    assert!(ms < 5_000 + 2_000, "{ms} ms: {e}");
    assert!(
        e.contains("all_reduce") && e.contains("no answer from rank 1"),
        "{e}"
    );
}

#[test]
fn a_stalled_peer_is_a_timeout_naming_it() {
    let (ms, e) = peer_lost("stalled");
    assert!((4_000..5_000 + 5_000).contains(&ms), "{ms} ms: {e}");
    assert!(
        e.contains("no answer from rank 1 within 5s (timeout)"),
        "{e}"
    );
}

#[test]
fn world_size_one_needs_no_launcher_and_changes_nothing() {
    let launch = Launch::from_lookup(|_| None).unwrap();
    assert_eq!(launch.world_size, 1);
    let pg = ProcessGroup::new(launch).unwrap();
    assert_eq!((pg.rank(), pg.world_size()), (0, 1));
    let t = Tensor::from_slice(&[1.5f32, f32::NAN]);
    pg.all_reduce(&t, ReduceOp::Sum).unwrap();
    pg.broadcast(&t, 0).unwrap();
    pg.average_tensors(&[t.shallow_clone()], 1024).unwrap();
    pg.barrier().unwrap();
    let v = Vec::<f32>::try_from(&t).unwrap();
    assert!(v[0] == 1.5 && v[1].is_nan());
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mlp(&vs.root());
    let before = vars(&vs);
    let ddp = DataParallel::new(&pg, &vs).unwrap();
    let (x, y) = batch();
    net.forward(&x)
        .mse_loss(&y, tch::Reduction::Mean)
        .backward();
    let grads: Vec<_> = before
        .iter()
        .map(|(n, _)| (n.clone(), vs.variables()[n].grad().copy()))
        .collect();
    ddp.average_gradients().unwrap();
    let after: Vec<_> = before
        .iter()
        .map(|(n, _)| (n.clone(), vs.variables()[n].grad()))
        .collect();
    assert_bitwise(&grads, &after, "gradients");
    assert_bitwise(&before, &vars(&vs), "parameters");
}

#[test]
fn a_timeout_past_the_maximum_is_cut_to_it() {
    let pg = ProcessGroup::new(Launch::single().with_timeout(Duration::MAX)).unwrap();
    assert_eq!(pg.timeout(), MAX_TIMEOUT);
}

/// Timings (`cargo test --release --test dist -- --ignored --nocapture bench`).
#[test]
#[ignore = "prints timings and asserts nothing about them; run by hand, in release"]
fn bench_bucketed_all_reduce() {
    let dir = run_two("bench", 60.0);
    println!("{}", std::fs::read_to_string(dir.0.join("bench")).unwrap());
}
