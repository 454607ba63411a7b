//! Mixed precision under the guard: an autocast forward in bf16 or f16, and a model whose
//! weights are f16, with dynamic loss scaling (`loss_scale = "dynamic"`) where it helps.
//!
//! Loss scaling is for f16: its smallest normal number is 6e-5, so small gradients underflow to
//! zero unless the loss (and with it every gradient) is multiplied by a large scale first. bf16
//! has the exponent range of f32 and needs no scaling: leave `loss_scale` out there (stepguard
//! says so once, as a `tracing` WARN, when a bf16 forward's loss is scaled).
//!
//! A 2-64-64-3 MLP learns three Gaussian blobs, three ways:
//! 1. f32 master weights, forward under [`stepguard::amp::autocast`] in bf16, fused AdamW,
//!    no loss scaling;
//! 2. the same with an f16 forward (`tch::autocast` on CUDA, [`stepguard::amp::autocast`] on
//!    the CPU, where tch's does nothing) and dynamic loss scaling;
//! 3. every weight in f16 (`vs.half()`), tch's SGD: f16 gradients overflow when the scale is
//!    too large, so the scale finds its level: overflow skips, back-off, growth after
//!    `loss_scale(interval)` clean steps (the sawtooth of dynamic loss scaling).
//!
//! Overflow skips are expected: counted apart from failures in `stepguard::report()`, never
//! toward `skip(max = ..)`. The plot `out/stepguard-amp.svg` shows loss and scale per step, with
//! the overflow skips marked. `cargo run --example mixed_precision [-- cuda]`.

use plotters::prelude::*;
use stepguard::guarded_step;
use stepguard::optim::{AdamW, FusedOptimizer};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 300;

fn data(device: Device) -> (Tensor, Tensor) {
    tch::manual_seed(42);
    let n = 600;
    let centers = Tensor::from_slice2(&[[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]]);
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
    let x =
        centers.index_select(0, &labels) + Tensor::randn([n, 2], (Kind::Float, Device::Cpu)) * 0.6;
    (x.to_device(device), labels.to_device(device))
}

fn mlp(vs: &nn::VarStore) -> nn::Sequential {
    let p = vs.root();
    nn::seq()
        .add(nn::linear(&p / "layer1", 2, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "layer2", 64, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "out", 64, 3, Default::default()))
}

/// f32 master weights, forward in bf16; the loss in f32 (as autocast keeps losses). No loss
/// scaling: bf16 has the range of f32.
#[guarded_step]
fn bf16_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let logits = stepguard::amp::autocast(vs.device(), Kind::BFloat16, || net.forward(x))
        .expect("CPU or CUDA");
    let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

/// f32 master weights, forward in f16, which needs the loss scaled.
#[guarded_step(loss_scale(interval = 50))]
fn f16_step(
    opt: &mut FusedOptimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    // tch's own autocast on CUDA (f16); on the CPU, where tch's does nothing, stepguard's.
    let logits = match vs.device() {
        Device::Cuda(_) => tch::autocast(true, || net.forward(x)),
        d => stepguard::amp::autocast(d, Kind::Half, || net.forward(x)).expect("CPU"),
    };
    let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

/// Every weight in f16: the grads are f16 too, and overflow at a large scale.
#[guarded_step(loss_scale(interval = 20), max_norm = 5)]
fn half_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> f64 {
    let loss = net
        .forward(x)
        .to_kind(Kind::Float)
        .cross_entropy_for_logits(y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss.double_value(&[])
}

/// One arm's record, per step.
struct Run {
    name: String,
    loss: Vec<f64>,
    scale: Vec<f64>,
    overflows: Vec<usize>,
}

fn site(name: &str) -> &'static stepguard::registry::Site {
    stepguard::registry()
        .find(|s| s.name() == name)
        .expect("registered")
}

fn accuracy(net: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    let pred = tch::no_grad(|| net.forward(x).argmax(-1, false));
    pred.eq_tensor(y)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// Trains both arms for `steps` steps; returns their records and accuracies.
fn train(device: Device, steps: usize) -> Vec<(Run, f64)> {
    let (x, y) = data(device);
    let mut out = Vec::new();

    type Step = fn(&mut FusedOptimizer, &nn::VarStore, &nn::Sequential, &Tensor, &Tensor) -> f64;
    let autocast_arms: [(&str, &str, Step); 2] = [
        ("autocast bf16, no scaling", "bf16_step", bf16_step),
        ("autocast f16, loss scale", "f16_step", f16_step),
    ];
    for (name, function, step_fn) in autocast_arms {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(device);
        let net = mlp(&vs);
        let mut opt = AdamW::default().build(&vs, 3e-3).expect("AdamW");
        let s = site(function);
        let mut run = Run {
            name: name.into(),
            loss: Vec::new(),
            scale: Vec::new(),
            overflows: Vec::new(),
        };
        for step in 0..steps {
            let before = s.stats().overflow_skips;
            run.loss.push(step_fn(&mut opt, &vs, &net, &x, &y));
            if s.stats().overflow_skips > before {
                run.overflows.push(step);
            }
            // One read per step for the plot; the guard itself reads the scale with its check.
            run.scale
                .push(s.state().read_loss_scale().unwrap_or(f64::NAN));
        }
        out.push((run, accuracy(&net, &x, &y)));
    }

    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(device);
    let net = mlp(&vs);
    vs.half();
    let (xh, s) = (x.to_kind(Kind::Half), site("half_step"));
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.05)
    .expect("SGD");
    let mut run = Run {
        name: "f16 weights".into(),
        loss: Vec::new(),
        scale: Vec::new(),
        overflows: Vec::new(),
    };
    for step in 0..steps {
        let before = s.stats().overflow_skips;
        run.loss.push(half_step(&mut opt, &vs, &net, &xh, &y));
        if s.stats().overflow_skips > before {
            run.overflows.push(step);
        }
        run.scale
            .push(s.state().read_loss_scale().unwrap_or(f64::NAN));
    }
    out.push((run, accuracy(&net, &xh, &y)));
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = match std::env::args().nth(1).as_deref() {
        Some("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    };
    if device == Device::Cpu {
        tch::set_num_threads(1);
    }
    let runs = train(device, STEPS);
    for (r, acc) in &runs {
        let scale = r.scale.last().copied().filter(|s| s.is_finite());
        println!(
            "{:<26} loss {:.4} -> {:.4}, accuracy {acc:.2}, {} overflow skips, final scale {}",
            r.name,
            r.loss[0],
            r.loss.last().copied().unwrap_or(f64::NAN),
            r.overflows.len(),
            scale.map_or_else(|| "none".to_string(), |s| s.to_string())
        );
    }
    println!("\n{}", stepguard::report());
    std::fs::create_dir_all("out")?;
    let path = std::path::Path::new("out/stepguard-amp.svg");
    let runs: Vec<Run> = runs.into_iter().map(|(r, _)| r).collect();
    plot(&runs, path)?;
    println!(
        "loss and loss scale per step: {}",
        std::fs::canonicalize(path)?.display()
    );
    Ok(())
}

fn plot(runs: &[Run], path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    let colors = [BLUE, RGBColor(230, 120, 0), RGBColor(0, 150, 0)];
    type Pick = fn(&Run) -> &Vec<f64>;
    for (panel, (title, pick)) in panels.iter().zip([
        (
            "loss (log scale); x: overflow skip",
            (|r: &Run| &r.loss) as Pick,
        ),
        ("loss scale (log scale)", |r: &Run| &r.scale),
    ]) {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        let all: Vec<f64> = runs
            .iter()
            .flat_map(|r| pick(r).iter().copied())
            .filter(|v| ok(*v))
            .collect();
        let (lo, hi) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        let steps = runs.iter().map(|r| r.loss.len()).max().unwrap_or(1);
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..steps, (lo * 0.5..hi * 2.0).log_scale())?;
        chart.configure_mesh().x_desc("step").draw()?;
        for (run, color) in runs.iter().zip(colors) {
            let pts: Vec<(usize, f64)> = pick(run)
                .iter()
                .enumerate()
                .filter(|(_, v)| ok(**v))
                .map(|(i, v)| (i, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(run.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            let at = |i: &usize| pick(run).get(*i).copied().filter(|v| ok(*v));
            chart.draw_series(
                run.overflows
                    .iter()
                    .filter_map(|i| at(i).map(|v| Cross::new((*i, v), 5, RED.stroke_width(2)))),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arm_learns_scaling_only_in_f16_and_the_f16_weights_overflow() {
        let runs = train(Device::Cpu, 120);
        for (r, acc) in &runs {
            assert!(
                r.loss.last().unwrap() < &(r.loss[0] * 0.5),
                "{}: {:?}",
                r.name,
                (r.loss[0], r.loss.last())
            );
            assert!(*acc > 0.9, "{}: accuracy {acc}", r.name);
        }
        // bf16: no scale at all; the f16 arms scale.
        assert!(runs[0].0.scale.iter().all(|s| s.is_nan()));
        assert_eq!(site("bf16_step").state().read_loss_scale(), None);
        assert!(runs[1].0.scale.iter().all(|s| s.is_finite()));
        let half = &runs[2].0;
        assert!(!half.overflows.is_empty(), "f16 grads overflow at 2^16");
        assert!(half.scale.iter().any(|s| *s < 65536.0));
        assert_eq!(site("half_step").stats().failures, 0);
        assert!(stepguard::report().contains("overflow skips"));
    }
}
