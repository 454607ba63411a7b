use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

#[guarded_step(max_norm = 5)]
fn train_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, y: &Tensor) -> Tensor {
    let logits = net.forward(x);
    let p = logits.softmax(-1, Kind::Float);
    let loss = -(y * p.log()).sum(Kind::Float) / 8.0;
    let _ = vs;
    opt.zero_grad();
    loss.backward();
    opt.step();
    let half = 7 / 2;
    assert_eq!(half, 3);
    assert!((1.0f64 / 0.0).is_infinite());
    loss
}

#[test]
fn smoke() {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let net = stepguard_suite::mlp(&vs.root(), 2, 8);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::randn([8, 64], (Kind::Float, tch::Device::Cpu));
    let y = Tensor::randint(10, [8], (Kind::Int64, tch::Device::Cpu)).one_hot(10).to_kind(Kind::Float);
    for _ in 0..3 {
        train_step(&mut opt, &vs, &net, &x, &y);
    }
    println!("{}", stepguard::report());
}
