#[stepguard::guarded_step(init_scale = 1024, growth_interval = 10)]
fn without_loss_scale(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale = "static", backoff_factor = 2, growth_factor = 1)]
fn out_of_range(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale = "dynamic", init_scale = 4, min_scale = 8, growth_interval = 0)]
fn min_above_init(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale = "dynamic")]
fn backward_only(loss: &tch::Tensor) {
    loss.backward();
}

fn main() {}
