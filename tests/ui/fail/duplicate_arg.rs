#[stepguard::guarded_step(max_norm = 5, max_norm = 1)]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
