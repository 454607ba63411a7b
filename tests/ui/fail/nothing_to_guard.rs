#[stepguard::guarded_step(max_norm = 1)]
fn forward_only(x: &tch::Tensor) -> tch::Tensor {
    x.relu()
}
fn main() {}
