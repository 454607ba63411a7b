#[stepguard::guarded_step(max_norm = 0, protect(eps = -1e-8), norm_type = -1)]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
