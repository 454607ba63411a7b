// The skip count is written inside `on_nan = skip(..)`.

#[stepguard::guarded_step(on_nan = "skip", max_skips = 5)]
fn old_spelling(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(on_nan(max = 2))]
fn group_without_its_call(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(on_nan = skp(max = 2))]
fn call_typo(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(on_nan = skip(mx = 2, max = -1))]
fn inside_the_group(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(on_nan = "error", max = 2)]
fn max_outside_skip(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) -> Result<(), tch::TchError> {
    opt.backward_step(loss);
    Ok(())
}

fn main() {}
