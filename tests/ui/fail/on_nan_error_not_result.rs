#[stepguard::guarded_step(on_nan = "error")]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) -> f64 {
    opt.backward_step(loss);
    0.0
}
fn main() {}
