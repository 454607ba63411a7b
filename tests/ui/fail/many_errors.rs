// All the errors of one attribute are reported together, and the function itself still
// compiles (no error about `step` below, and `main` can call it).
#[stepguard::guarded_step(max_nrom = 5, eps = 0, on_nan = "ignore", checks = "params,lose")]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {
    let _ = step;
}
