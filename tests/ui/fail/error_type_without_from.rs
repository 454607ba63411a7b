#[derive(Debug)]
struct MyError;

#[stepguard::guarded_step(on_nan = "error")]
fn step(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) -> Result<(), MyError> {
    opt.backward_step(loss);
    Ok(())
}
fn main() {}
