//! The fused optimizer a fixture case (`scripts/gen_optim_fixtures.py`,
//! `scripts/gen_optim_follow_fixtures.py`) describes, shared by the tests that read them.

use serde_json::Value;
use stepguard::optim::{Adam, AdamW, FusedOptimizer, Sgd};
use tch::nn;

/// The optimizer of `case` (`optimizer`, `lr`, `options`) over `vs`.
pub fn build(case: &Value, vs: &nn::VarStore) -> FusedOptimizer {
    let o = &case["options"];
    let f = |k: &str| o[k].as_f64().unwrap();
    let lr = case["lr"].as_f64().unwrap();
    match case["optimizer"].as_str().unwrap() {
        "sgd" => Sgd {
            momentum: f("momentum"),
            dampening: f("dampening"),
            wd: f("weight_decay"),
            nesterov: o["nesterov"].as_bool().unwrap(),
        }
        .build(vs, lr),
        "adam" => Adam {
            beta1: f("beta1"),
            beta2: f("beta2"),
            wd: f("weight_decay"),
            eps: f("eps"),
            amsgrad: o["amsgrad"].as_bool().unwrap(),
        }
        .build(vs, lr),
        _ => AdamW {
            beta1: f("beta1"),
            beta2: f("beta2"),
            wd: f("weight_decay"),
            eps: f("eps"),
            amsgrad: o["amsgrad"].as_bool().unwrap(),
        }
        .build(vs, lr),
    }
    .unwrap()
}
