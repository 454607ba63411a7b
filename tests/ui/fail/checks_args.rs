// `checks(list = .., diagnose = ..)`: its members and their values.

#[stepguard::guarded_step(checks(diagnose = "maybe"))]
fn unknown_diagnose(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(checks(lst = "loss", diagnose = "of"))]
fn unknown_member(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(checks(list = "loss,grad", diagnose = off))]
fn bad_values(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

#[stepguard::guarded_step(checks = "loss", checks(diagnose = "off"))]
fn both_forms(opt: &mut tch::nn::Optimizer, loss: &tch::Tensor) {
    opt.backward_step(loss);
}

fn main() {}
