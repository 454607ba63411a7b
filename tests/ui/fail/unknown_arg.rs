#[stepguard::guarded_step(max_nrom = 5)]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
