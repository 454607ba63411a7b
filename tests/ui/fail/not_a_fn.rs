#[stepguard::guarded_step]
struct Model;
fn main() {}
