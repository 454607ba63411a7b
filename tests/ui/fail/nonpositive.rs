#[stepguard::guarded_step(max_norm = 0, protect(eps = -1e-8), norm_type = -1)]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

// Zero or subnormal in f32: the clipping coefficient would be 0 and zero the gradients.
#[stepguard::guarded_step(max_norm = 5e-324)]
fn subnormal(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

fn main() {}
