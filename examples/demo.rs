//! The stepguard demo: one model, one fault, trained three ways side by side.
//!
//! A 2-32-32-3 MLP learns three Gaussian blobs with a hand-written cross-entropy,
//! `-(onehot * softmax(logits).log())`. At step 20 a learning-rate spike (x10000, a broken
//! warm-up schedule) drives the logits apart until the softmax underflows to exact zeros:
//! `log(0)` is `-inf`, `0 * -inf` is NaN. Later, at steps 120, 121 and 160, the data pipeline
//! delivers a batch with a NaN row.
//!
//! 1. unguarded: the loss turns NaN and the weights are ruined;
//! 2. `#[guarded_step]` with `on_nan = "panic"`, epsilon protection off: stops at the first bad
//!    step and says which check, which tensor, and what to try;
//! 3. `#[guarded_step(max_norm = 5, on_nan = "skip")]` with epsilon protection: finishes.
//!
//! It ends with `stepguard::report()` and an SVG of loss and grad norm per step for each run.

use std::panic::{catch_unwind, AssertUnwindSafe};

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const STEPS: i64 = 200;
const SPIKE: std::ops::Range<i64> = 20..25;
const CORRUPT: [i64; 3] = [120, 121, 160];

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(42);
    let n = 300;
    let centers = Tensor::from_slice2(&[[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]]);
    let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
    let x =
        centers.index_select(0, &labels) + Tensor::randn([n, 2], (Kind::Float, Device::Cpu)) * 0.6;
    (x, labels)
}

fn model() -> (nn::VarStore, nn::Sequential, nn::Optimizer) {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let net = nn::seq()
        .add(nn::linear(&p / "layer1", 2, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "layer2", 32, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "out", 32, 3, Default::default()));
    let opt = nn::Sgd::default().build(&vs, 0.05).unwrap();
    (vs, net, opt)
}

fn lr(step: i64) -> f64 {
    if SPIKE.contains(&step) {
        500.0
    } else {
        0.05
    }
}

/// The step as people write it. The same body three times: plain, and under two attributes.
macro_rules! step_fn {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        fn $name(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Sequential, x: &Tensor, onehot: &Tensor) -> f64 {
            let _ = vs; // names parameters in error messages
            let p = net.forward(x).softmax(-1, Kind::Float);
            let loss = -(onehot * p.log()).sum_dim_intlist(-1, false, None).mean(None);
            opt.zero_grad();
            loss.backward();
            opt.step();
            f64::try_from(&loss).unwrap()
        }
    };
}

step_fn!(train_step_unguarded);
step_fn!(
    #[guarded_step(protect = "none")]
    train_step_checked
);
step_fn!(
    #[guarded_step(max_norm = 5, on_nan = "skip", max_skips = 10)]
    train_step
);

/// What one run recorded, per step.
#[derive(Default)]
struct Run {
    name: &'static str,
    loss: Vec<f64>,
    grad_norm: Vec<f64>,
    clipped: Vec<usize>,
    skipped: Vec<usize>,
}

/// The batch of step `step`: the data, or a copy with a NaN row when the pipeline glitches.
fn batch(x: &Tensor, step: i64) -> Tensor {
    if CORRUPT.contains(&step) {
        let bad = x.copy();
        let _ = bad.narrow(0, step % 7, 1).fill_(f64::NAN);
        bad
    } else {
        x.shallow_clone()
    }
}

fn accuracy(net: &nn::Sequential, x: &Tensor, y: &Tensor) -> f64 {
    let pred = tch::no_grad(|| net.forward(x).argmax(-1, false));
    f64::try_from(pred.eq_tensor(y).to_kind(Kind::Float).mean(Kind::Float)).unwrap()
}

fn finite_tensors(vs: &nn::VarStore) -> usize {
    vs.variables()
        .values()
        .filter(|t| bool::try_from(t.isfinite().all()).unwrap())
        .count()
}

fn bar(name: &str) -> ProgressBar {
    let pb = ProgressBar::new(STEPS as u64).with_prefix(name.to_string());
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos:>3}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb
}

fn site(name: &str) -> &'static stepguard::Site {
    stepguard::registry()
        .find(|s| s.name() == name)
        .expect("registered")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(1);
    let (x, y) = data();
    let onehot = y.one_hot(3).to_kind(Kind::Float);
    let mut runs = Vec::new();

    println!("== 1. unguarded ==");
    let (vs, net, mut opt) = model();
    let mut run = Run {
        name: "unguarded",
        ..Run::default()
    };
    let pb = bar("unguarded");
    for step in 0..STEPS {
        opt.set_lr(lr(step));
        let loss = train_step_unguarded(&mut opt, &vs, &net, &batch(&x, step), &onehot);
        let g = f64::try_from(stepguard::grad_norm(opt.trainable_variables(), 2)?)?;
        run.loss.push(loss);
        run.grad_norm.push(g);
        pb.set_message(format!("loss {loss:.4}  |g| {g:.3}"));
        pb.inc(1);
    }
    pb.finish();
    let unguarded_accuracy = accuracy(&net, &x, &y);
    match run.loss.iter().position(|l| !l.is_finite()) {
        Some(s) => println!(
            "loss became NaN at step {s}; {} of {} weight tensors are ruined; accuracy {:.2}",
            vs.variables().len() - finite_tensors(&vs),
            vs.variables().len(),
            unguarded_accuracy
        ),
        None => println!("no NaN; accuracy {unguarded_accuracy:.2}"),
    }
    runs.push(run);

    println!("\n== 2. #[guarded_step(protect = \"none\")]: stop at the first bad step ==");
    let (vs, net, mut opt) = model();
    let mut run = Run {
        name: "guarded, panic",
        ..Run::default()
    };
    let pb = bar("panic");
    std::panic::set_hook(Box::new(|_| {})); // the message is printed below, once
    let r = catch_unwind(AssertUnwindSafe(|| {
        for step in 0..STEPS {
            opt.set_lr(lr(step));
            let loss = train_step_checked(&mut opt, &vs, &net, &batch(&x, step), &onehot);
            let g = site("train_step_checked")
                .stats()
                .last_grad_norm
                .unwrap_or(f64::NAN);
            run.loss.push(loss);
            run.grad_norm.push(g);
            pb.set_message(format!("loss {loss:.4}  |g| {g:.3}"));
            pb.inc(1);
        }
    }));
    let _ = std::panic::take_hook();
    pb.abandon();
    if let Err(e) = r {
        println!(
            "{}",
            e.downcast_ref::<String>().cloned().unwrap_or_default()
        );
    }
    println!(
        "stopped; weights all finite: {}",
        finite_tensors(&vs) == vs.variables().len()
    );
    runs.push(run);

    println!("\n== 3. #[guarded_step(max_norm = 5, on_nan = \"skip\")], epsilon-protected log ==");
    let (vs, net, mut opt) = model();
    let mut run = Run {
        name: "guarded, skip + clip",
        ..Run::default()
    };
    let pb = bar("skip+clip");
    let s = site("train_step");
    for step in 0..STEPS {
        opt.set_lr(lr(step));
        let before = s.stats();
        let loss = train_step(&mut opt, &vs, &net, &batch(&x, step), &onehot);
        let after = s.stats();
        if after.clipped > before.clipped {
            run.clipped.push(step as usize);
        }
        if after.skipped > before.skipped {
            run.skipped.push(step as usize);
        }
        let g = after.last_grad_norm.unwrap_or(f64::NAN);
        run.loss.push(loss);
        run.grad_norm.push(g);
        pb.set_message(format!("loss {loss:.4}  |g| {g:.3}"));
        pb.inc(1);
    }
    pb.finish();
    println!(
        "finished: final loss {:.4}, accuracy {:.2} (unguarded: {:.2}); {} steps clipped, {} skipped",
        run.loss.last().unwrap(),
        accuracy(&net, &x, &y),
        unguarded_accuracy,
        run.clipped.len(),
        run.skipped.len()
    );
    runs.push(run);

    println!("\n{}", stepguard::report());
    std::fs::create_dir_all("out")?;
    let path = std::path::Path::new("out/stepguard-demo.svg");
    plot(&runs, path)?;
    println!(
        "loss and grad norm per step: {}",
        std::fs::canonicalize(path)?.display()
    );
    Ok(())
}

fn plot(runs: &[Run], path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    let colors = [RED, BLUE, RGBColor(0, 150, 0)];
    for (panel, (title, pick)) in panels.iter().zip([
        (
            "loss (log scale)",
            (|r: &Run| &r.loss) as fn(&Run) -> &Vec<f64>,
        ),
        ("total grad norm (log scale)", |r: &Run| &r.grad_norm),
    ]) {
        let finite = |v: f64| v.is_finite() && v > 0.0;
        let all: Vec<f64> = runs
            .iter()
            .flat_map(|r| pick(r).iter().copied())
            .filter(|v| finite(*v))
            .collect();
        let (lo, hi) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0..STEPS as usize, (lo * 0.5..hi * 2.0).log_scale())?;
        chart.configure_mesh().x_desc("step").draw()?;
        for (run, color) in runs.iter().zip(colors) {
            let pts: Vec<(usize, f64)> = pick(run)
                .iter()
                .enumerate()
                .filter(|(_, v)| finite(**v))
                .map(|(i, v)| (i, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(run.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            let at = |i: &usize| pick(run).get(*i).copied().filter(|v| finite(*v));
            chart.draw_series(
                run.clipped
                    .iter()
                    .filter_map(|i| at(i).map(|v| Circle::new((*i, v), 4, color.filled()))),
            )?;
            chart.draw_series(
                run.skipped
                    .iter()
                    .filter_map(|i| at(i).map(|v| Cross::new((*i, v), 6, BLACK.stroke_width(2)))),
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
