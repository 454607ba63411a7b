struct MyOpt;
impl MyOpt {
    fn zero_grad(&mut self) {}
}
#[stepguard::guarded_step]
fn step(opt: &mut MyOpt, loss: &tch::Tensor) {
    opt.backward_step(loss);
}
fn main() {}
