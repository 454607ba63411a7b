// The skip count is written inside `on_nan = skip(..)`; a process group needs the step's read.

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

#[stepguard::guarded_step(on_nan = "skip", sync = "deferred", group = pg)]
fn group_deferred(
    pg: &stepguard::dist::ProcessGroup,
    opt: &mut stepguard::optim::FusedOptimizer,
    loss: &tch::Tensor,
) {
    let _ = pg;
    opt.backward_step(loss);
}

fn main() {}
