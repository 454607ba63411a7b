#[stepguard::guarded_step(max_norm = "5", on_nan = skip(max = 1.5), checks = loss, norm_type = "two")]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
