//! What each rank of a test world does (`rank_main` runs the role named by `ROLE`).

use std::path::Path;
use std::time::{Duration, Instant};

use stepguard::dist::{DataParallel, DistError, ProcessGroup, ReduceOp};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::{batch, mlp, save, sgd_step, vars, LR, STEPS};

pub fn run(role: &str, pg: &ProcessGroup, out: &Path) {
    let r = pg.rank();
    match role {
        "broadcast" => {
            tch::manual_seed(r as i64); // different weights on each rank before the broadcast
            let vs = nn::VarStore::new(Device::Cpu);
            let _net = mlp(&vs.root());
            let buf = vs.root().zeros_no_train("running_mean", &[3]);
            let _ = buf.shallow_clone().fill_(r as f64 + 0.5);
            save(out, &format!("before{r}"), vars(&vs));
            let ddp = DataParallel::new(pg, &vs).unwrap();
            assert_eq!(ddp.names().len(), 4); // the buffer is not trainable
            save(out, &format!("after{r}"), vars(&vs));
            // The small all-reduce (the guard's consensus): sum, max, min, f64, i64,
            // non-contiguous.
            let v = Tensor::from_slice(&[r as f32 + 1.0, -(r as f32), 3.0 * r as f32]);
            let (s, m, n) = (v.copy(), v.copy(), v.copy());
            pg.all_reduce(&s, ReduceOp::Sum).unwrap();
            pg.all_reduce(&m, ReduceOp::Max).unwrap();
            pg.all_reduce(&n, ReduceOp::Min).unwrap();
            let d = Tensor::from_slice(&[0.1f64 * (r as f64 + 1.0)]);
            pg.all_reduce(&d, ReduceOp::Sum).unwrap();
            let i = Tensor::from_slice(&[r as i64 * 7]);
            pg.all_reduce(&i, ReduceOp::Max).unwrap();
            let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]) * (r as f64 + 1.0);
            let t = t.transpose(0, 1);
            pg.all_reduce(&t, ReduceOp::Sum).unwrap();
            pg.barrier().unwrap();
            let named = |n: &str, t: Tensor| (n.to_string(), t);
            save(
                out,
                &format!("reduce{r}"),
                vec![
                    named("sum", s),
                    named("max", m),
                    named("min", n),
                    named("f64", d),
                    named("i64", i),
                    named("t", t),
                ],
            );
        }
        "average" => {
            // Tensors of several shapes and two dtypes, with a tiny bucket size: several buckets,
            // one tensor larger than a bucket, an empty one.
            let mut ts: Vec<Tensor> = [
                vec![3, 5],
                vec![7],
                vec![1000],
                vec![2, 2],
                vec![0],
                vec![64, 16],
            ]
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let n: i64 = s.iter().product();
                (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.013 * (k + 1) as f64)
                    + r as f64 * 1.7)
                    .sin()
                    .view(s.as_slice())
            })
            .collect();
            ts.push(Tensor::from_slice(&[1.0f64, 2.0, 3.0]) * (r as f64 + 0.3));
            ts.push(
                Tensor::arange(12, (Kind::Float, Device::Cpu))
                    .view([3, 4])
                    .transpose(0, 1)
                    * (r as f64 + 1.0),
            );
            let named = |p: &str, ts: &[Tensor]| -> Vec<(String, Tensor)> {
                ts.iter()
                    .enumerate()
                    .map(|(k, t)| (format!("{p}{k:02}"), t.copy()))
                    .collect()
            };
            save(out, &format!("input{r}"), named("t", &ts));
            pg.average_tensors(&ts, 1024).unwrap();
            save(out, &format!("output{r}"), named("t", &ts));
        }
        "sgd" => {
            tch::manual_seed(10 + r as i64);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = mlp(&vs.root());
            // 256-byte buckets: the 4×16 weight alone, the rest in a few more.
            let ddp = DataParallel::with_bucket_bytes(pg, &vs, 256).unwrap();
            assert!(ddp.bucket_count() >= 3, "{}", ddp.bucket_count());
            save(out, &format!("init{r}"), vars(&vs));
            let mut opt = nn::Sgd::default().build(&vs, LR).unwrap();
            let (x, y) = batch();
            let (x, y) = (x.narrow(0, 8 * r as i64, 8), y.narrow(0, 8 * r as i64, 8));
            for _ in 0..STEPS {
                sgd_step(&mut opt, &net, &x, &y);
                ddp.average_gradients().unwrap();
                opt.step();
            }
            save(out, &format!("final{r}"), vars(&vs));
        }
        "killed" | "stalled" => {
            let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
            pg.all_reduce(&t, ReduceOp::Sum).unwrap(); // both ranks are up
            if r == 1 {
                if role == "killed" {
                    std::process::exit(0); // gone before the next collective
                }
                std::thread::sleep(Duration::from_secs(600)); // never comes (the parent kills it)
            }
            let start = Instant::now();
            let e = pg.all_reduce(&t, ReduceOp::Sum).unwrap_err();
            let ms = start.elapsed().as_millis();
            assert_eq!(e.missing_ranks(), vec![1], "{e}");
            assert!(matches!(e, DistError::Unreachable { .. }), "{e:?}");
            std::fs::write(out.join("error"), format!("{ms}\n{e}")).unwrap();
        }
        "bench" => {
            // 25 MiB of f32 gradients in 100 tensors: one bucket (the default size) or 1 MiB
            // buckets; and the guard's kind of all-reduce, 4 floats.
            let ts: Vec<Tensor> = (0..100)
                .map(|_| Tensor::ones([65536], (Kind::Float, Device::Cpu)))
                .collect();
            let mut lines = Vec::new();
            for (what, bytes) in [
                ("1 bucket of 25 MiB", 26 << 20),
                ("26 buckets of 1 MiB", 1 << 20),
            ] {
                pg.average_tensors(&ts, bytes).unwrap(); // warm-up
                let start = Instant::now();
                for _ in 0..10 {
                    pg.average_tensors(&ts, bytes).unwrap();
                }
                lines.push(format!(
                    "{what}: {:.1} ms",
                    start.elapsed().as_secs_f64() * 100.0
                ));
            }
            let flags = Tensor::zeros([4], (Kind::Float, Device::Cpu));
            let start = Instant::now();
            for _ in 0..200 {
                pg.all_reduce(&flags, ReduceOp::Max).unwrap();
            }
            lines.push(format!(
                "4-float all_reduce: {:.3} ms",
                start.elapsed().as_secs_f64() * 5.0
            ));
            if r == 0 {
                std::fs::write(out.join("bench"), lines.join("\n")).unwrap();
            }
        }
        "c10d_one" => super::one::run(pg, out),
        "sparse" => super::sparse::run(pg, out),
        "restart" => super::restart::run(pg, out),
        other => assert!(
            super::consensus::run(other, pg, out) || super::consensus_modes::run(other, pg, out),
            "unknown role {other}"
        ),
    }
}
