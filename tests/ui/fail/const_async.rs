#[stepguard::guarded_step]
const fn konst() {}

#[stepguard::guarded_step]
async fn later(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
