// Spike detection, rollback and adaptive clipping: grouped numbers, ranges, dependencies.

#[stepguard::guarded_step(spike_warmup = 10, spike_window = 1)]
fn old_spelling(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(spike(warmup = 10, window = 1, windw = 3))]
fn inside_the_group(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(spike = 6, spike(window = 50))]
fn short_and_long_form(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
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

#[stepguard::guarded_step(max_norm = adaptve(sigmas = 2))]
fn adaptive_typo(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(max_norm = adaptive(sigmas = 0, windw = 3), clip_sigmas = 2)]
fn adaptive_inside(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(max_norm = adaptive, sync = "deferred")]
fn adaptive_deferred(opt: &mut stepguard::optim::FusedOptimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

// The statistics start empty: a warm-up of 0 would judge (or clip to) nothing learnt yet.
#[stepguard::guarded_step(spike(warmup = 0), max_norm = adaptive(warmup = 0))]
fn no_warmup(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

fn main() {}
