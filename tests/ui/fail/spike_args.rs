#[stepguard::guarded_step(spike_warmup = 10, spike_window = 1)]
fn tuning_without_spike(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(spike = 0, rollback = 0)]
fn zeros(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(rollback = 100)]
fn rollback_without_skip(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(rollback = 100, on_nan = "skip", sync = "deferred")]
fn rollback_deferred(opt: &mut stepguard::optim::FusedOptimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(max_norm = "adaptve", clip_sigmas = 2)]
fn adaptive_typo(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(max_norm = "adaptive", sync = "deferred")]
fn adaptive_deferred(opt: &mut stepguard::optim::FusedOptimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

fn main() {}
