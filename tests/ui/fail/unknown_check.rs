#[stepguard::guarded_step(checks = "loss,grad", protect = "dvi", on_nan = "skpi")]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
