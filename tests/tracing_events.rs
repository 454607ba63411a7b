//! stepguard's `tracing` events reach the program's own subscriber: failures at ERROR,
//! skipped steps at WARN, clipping at DEBUG, with structured fields.

use std::io::Write;
use std::sync::{Arc, Mutex};

use stepguard::{guarded_step, GuardError};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[guarded_step(max_norm = 1e-6, on_nan = "skip", max_skips = 1)]
fn step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    net: &nn::Sequential,
    x: &Tensor,
    y: &Tensor,
) -> Result<(), GuardError> {
    let _ = vs;
    let loss = net.forward(x).cross_entropy_for_logits(y);
    opt.backward_step(&loss);
    Ok(())
}

#[test]
fn events_carry_function_step_check_and_tensors() {
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let d = stepguard_suite::test_device();
    let vs = nn::VarStore::new(d);
    let net = stepguard_suite::mlp(&vs.root(), 1, 8);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let x = Tensor::randn([4, 64], (Kind::Float, d));
    let y = Tensor::randint(10, [4], (Kind::Int64, d));
    let bad = x.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::NAN);
    tracing::subscriber::with_default(subscriber, || {
        step(&mut opt, &vs, &net, &x, &y).unwrap(); // clipped (max_norm is tiny)
        step(&mut opt, &vs, &net, &bad, &y).unwrap(); // skipped
        assert!(step(&mut opt, &vs, &net, &bad, &y).is_err()); // escalated
    });
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line = |level: &str, what: &str| {
        log.lines()
            .find(|l| l.contains(level) && l.contains(what))
            .unwrap_or_else(|| panic!("no {level} {what} in:\n{log}"))
            .to_string()
    };
    let clip = line("DEBUG", "clipped gradients");
    assert!(
        clip.contains("function=\"step\"") && clip.contains("max_norm=1e-6"),
        "{clip}"
    );
    let skip = line("WARN", "skipped step 1");
    assert!(
        skip.contains("check=\"loss\"")
            && skip.contains("tensors=loss")
            && skip.contains("consecutive=1"),
        "{skip}"
    );
    let fail = line("ERROR", "non-finite loss");
    assert!(fail.contains("step=2") && fail.contains("cause="), "{fail}");
}
