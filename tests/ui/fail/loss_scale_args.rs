// The numbers of dynamic loss scaling: written inside `loss_scale(..)`, each range-checked.

#[stepguard::guarded_step(init_scale = 1024, growth_interval = 10)]
fn old_spelling(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale = "static")]
fn unknown_mode(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale(backoff = 2, growth = 1))]
fn out_of_range(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale(init = 4, min = 8, interval = 0))]
fn min_above_init(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale(inti = 4, init = 8, init = 16))]
fn unknown_and_duplicate_inside(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale = "dynamic", loss_scale(init = 4))]
fn short_and_long_form(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(loss_scale = "dynamic")]
fn backward_only(loss: &tch::Tensor) {
    loss.backward();
}

fn main() {}
