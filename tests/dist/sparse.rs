//! A sparse gradient (an embedding built with `sparse: true`): `average_gradients` refuses it
//! with an error naming the parameter, before any collective, so no gradient is half-averaged
//! and the ranks stay in step.

use std::path::Path;

use stepguard::dist::{DataParallel, ProcessGroup, ReduceOp};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::launch::{Ranks, Scratch};
use super::{assert_bitwise, bits, load, save, LIMIT};

/// The dense gradients of `vs`, copied, by name.
fn dense_grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.grad()))
        .filter(|(_, g)| g.defined() && !g.is_sparse())
        .map(|(n, g)| (n, g.copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The role: a linear layer ("a", whose buckets come first) after a sparse embedding, and a
/// layer the step does not use ("b"), each tensor a bucket of its own; a backward with this
/// rank's data, then `average_gradients`.
pub fn run(pg: &ProcessGroup, out: &Path) {
    let r = pg.rank();
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let lin = nn::linear(&root / "a", 4, 3, Default::default());
    let config = nn::EmbeddingConfig {
        sparse: true,
        ..Default::default()
    };
    let emb = nn::embedding(&root / "emb", 10, 4, config);
    let _unused = nn::linear(&root / "b", 2, 2, Default::default());
    let ddp = DataParallel::with_bucket_bytes(pg, &vs, 16).unwrap();
    assert_eq!(ddp.bucket_count(), 5);
    let ids = Tensor::from_slice(&[r as i64, 3, 7]);
    let loss = lin.forward(&emb.forward(&ids)).sum(Kind::Float) * (r as f64 + 1.0);
    loss.backward();
    assert!(vs.variables()["emb.weight"].grad().is_sparse());
    save(out, &format!("before{r}"), dense_grads(&vs));
    let collectives = pg.collectives();
    let e = ddp.average_gradients().unwrap_err();
    assert_eq!(pg.collectives(), collectives, "a collective was issued");
    // Not even a zero gradient for the unused layer.
    assert!(!vs.variables()["b.weight"].grad().defined());
    save(out, &format!("after{r}"), dense_grads(&vs));
    // Both ranks refused alike: the next collective pairs up.
    let t = Tensor::ones([1], (Kind::Float, Device::Cpu));
    pg.all_reduce(&t, ReduceOp::Sum).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [2.0]);
    std::fs::write(out.join(format!("error{r}")), e.to_string()).unwrap();
}

#[test]
fn a_sparse_gradient_is_a_clear_error_and_nothing_is_averaged() {
    let dir = Scratch::new("sparse");
    let mut ranks = Ranks::start("sparse", &[0, 1], 2, 60.0, &dir.0);
    ranks.wait_all_ok(LIMIT);
    let d = &dir.0;
    let (before0, before1) = (load(d, "before0"), load(d, "before1"));
    assert_eq!(before0.len(), 2, "a.bias, a.weight");
    assert!(
        bits(&before0[1].1) != bits(&before1[1].1),
        "equal gradients: vacuous"
    );
    assert_bitwise(&load(d, "after0"), &before0, "rank 0's gradients");
    assert_bitwise(&load(d, "after1"), &before1, "rank 1's gradients");
    for r in 0..2 {
        let e = std::fs::read_to_string(d.join(format!("error{r}"))).unwrap();
        eprintln!("{e}");
        assert!(
            e.contains("average_gradients")
                && e.contains("emb.weight")
                && e.contains("sparse gradients are not supported"),
            "{e}"
        );
    }
}
