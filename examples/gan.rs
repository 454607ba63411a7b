//! A GAN with two VarStores and two optimizers, one guarded step for both updates.
//!
//! The generator learns a 1-d Gaussian (mean 3, std 0.5); `cargo run --example gan`.

use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn mlp(vs: nn::Path, i: i64, o: i64) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(&vs / "l1", i, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&vs / "l2", 16, o, Default::default()))
}

/// Both updates of one GAN step. `log` is epsilon-protected: a saturated discriminator
/// (`sigmoid` = 1 exactly) would otherwise give `log(0)`.
#[guarded_step(max_norm = 1)]
#[allow(clippy::too_many_arguments)]
fn gan_step(
    g: &nn::Sequential,
    d: &nn::Sequential,
    g_vs: &nn::VarStore,
    d_vs: &nn::VarStore,
    g_opt: &mut nn::Optimizer,
    d_opt: &mut nn::Optimizer,
    z: &Tensor,
    real: &Tensor,
) -> (f64, f64) {
    let _ = (g_vs, d_vs);
    let fake = g.forward(z);
    let d_real = d.forward(real).sigmoid();
    let d_fake = d.forward(&fake.detach()).sigmoid();
    let d_loss = -(d_real.log() + (1.0f64 - d_fake).log()).mean(Kind::Float);
    d_opt.backward_step(&d_loss);
    let g_loss = -d.forward(&fake).sigmoid().log().mean(Kind::Float);
    g_opt.zero_grad();
    g_loss.backward();
    g_opt.step();
    (
        f64::try_from(&d_loss).unwrap(),
        f64::try_from(&g_loss).unwrap(),
    )
}

/// Trains for `steps`; returns the mean of generated samples.
pub fn run(steps: usize) -> f64 {
    tch::manual_seed(0);
    let (g_vs, d_vs) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let (g, d) = (
        mlp(g_vs.root() / "gen", 4, 1),
        mlp(d_vs.root() / "disc", 1, 1),
    );
    let mut g_opt = nn::Adam::default().build(&g_vs, 2e-3).unwrap();
    let mut d_opt = nn::Adam::default().build(&d_vs, 2e-3).unwrap();
    for _ in 0..steps {
        let z = Tensor::randn([64, 4], (Kind::Float, Device::Cpu));
        let real = Tensor::randn([64, 1], (Kind::Float, Device::Cpu)) * 0.5 + 3.0;
        gan_step(&g, &d, &g_vs, &d_vs, &mut g_opt, &mut d_opt, &z, &real);
    }
    let z = Tensor::randn([1000, 4], (Kind::Float, Device::Cpu));
    f64::try_from(tch::no_grad(|| g.forward(&z).mean(Kind::Float))).unwrap()
}

fn main() {
    let mean = run(1500);
    println!(
        "gan: generated mean {mean:.3} (target 3.0)\n\n{}",
        stepguard::report()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use stepguard_suite::{all_finite, serial, var_bits};

    /// `gan_step` without the attribute, with the clipping it asks for (`max_norm = 1`)
    /// written out when `clip` is set: each optimizer's global grad norm clipped to 1 before
    /// its step.
    #[allow(clippy::too_many_arguments)]
    fn gan_step_plain(
        clip: bool,
        g: &nn::Sequential,
        d: &nn::Sequential,
        g_vs: &nn::VarStore,
        d_vs: &nn::VarStore,
        g_opt: &mut nn::Optimizer,
        d_opt: &mut nn::Optimizer,
        z: &Tensor,
        real: &Tensor,
    ) -> (f64, f64) {
        let _ = (g_vs, d_vs);
        let fake = g.forward(z);
        let d_real = d.forward(real).sigmoid();
        let d_fake = d.forward(&fake.detach()).sigmoid();
        let d_loss = -(d_real.log() + (1.0f64 - d_fake).log()).mean(Kind::Float);
        d_opt.zero_grad();
        d_loss.backward();
        if clip {
            let _ = stepguard::clip_grad_norm(d_opt.trainable_variables(), 1.0, 2).unwrap();
        }
        d_opt.step();
        let g_loss = -d.forward(&fake).sigmoid().log().mean(Kind::Float);
        g_opt.zero_grad();
        g_loss.backward();
        if clip {
            let _ = stepguard::clip_grad_norm(g_opt.trainable_variables(), 1.0, 2).unwrap();
        }
        g_opt.step();
        (
            f64::try_from(&d_loss).unwrap(),
            f64::try_from(&g_loss).unwrap(),
        )
    }

    #[test]
    fn generator_moves_towards_the_data() {
        let _serial = serial(); // `run` seeds and draws from tch's global generator
        let start = super::run(0);
        let trained = super::run(300);
        assert!(
            (trained - 3.0).abs() < (start - 3.0).abs(),
            "{start} -> {trained}"
        );
    }

    struct Gan {
        g: nn::Sequential,
        d: nn::Sequential,
        g_vs: nn::VarStore,
        d_vs: nn::VarStore,
        g_opt: nn::Optimizer,
        d_opt: nn::Optimizer,
    }

    fn gan(like: Option<&Gan>) -> Gan {
        let (mut g_vs, mut d_vs) = (
            nn::VarStore::new(Device::Cpu),
            nn::VarStore::new(Device::Cpu),
        );
        let (g, d) = (
            mlp(g_vs.root() / "gen", 4, 1),
            mlp(d_vs.root() / "disc", 1, 1),
        );
        if let Some(o) = like {
            g_vs.copy(&o.g_vs).unwrap();
            d_vs.copy(&o.d_vs).unwrap();
        }
        let g_opt = nn::Adam::default().build(&g_vs, 2e-3).unwrap();
        let d_opt = nn::Adam::default().build(&d_vs, 2e-3).unwrap();
        Gan {
            g,
            d,
            g_vs,
            d_vs,
            g_opt,
            d_opt,
        }
    }

    /// Step `i`'s noise and real samples, from fixed values.
    fn inputs(i: usize) -> (Tensor, Tensor) {
        let k = 0.37 + i as f64 * 0.01;
        let ramp = |n: i64| Tensor::arange(n, (Kind::Float, Device::Cpu));
        let z = (ramp(64 * 4) * k).sin().reshape([64, 4]);
        let real = (ramp(64) * (k + 0.5)).sin().reshape([64, 1]) * 0.5 + 3.0;
        (z, real)
    }

    #[test]
    fn guarded_step_is_the_plain_one_and_refuses_a_nan_batch() {
        let _serial = serial();
        tch::manual_seed(5); // the initial weights (held by `serial`: no other test draws)
        let mut a = gan(None);
        let mut b = gan(Some(&a));
        let mut c = gan(Some(&a));
        let site = stepguard::registry()
            .find(|s| s.name() == "gan_step")
            .expect("registered");
        let clipped = site.stats().clipped;
        for i in 0..4 {
            let (z, real) = inputs(i);
            let la = gan_step_plain(
                true,
                &a.g,
                &a.d,
                &a.g_vs,
                &a.d_vs,
                &mut a.g_opt,
                &mut a.d_opt,
                &z,
                &real,
            );
            let lb = gan_step(
                &b.g,
                &b.d,
                &b.g_vs,
                &b.d_vs,
                &mut b.g_opt,
                &mut b.d_opt,
                &z,
                &real,
            );
            gan_step_plain(
                false,
                &c.g,
                &c.d,
                &c.g_vs,
                &c.d_vs,
                &mut c.g_opt,
                &mut c.d_opt,
                &z,
                &real,
            );
            assert_eq!(
                (la.0.to_bits(), la.1.to_bits()),
                (lb.0.to_bits(), lb.1.to_bits())
            );
        }
        // The discriminator's grads exceed 1 here: the guard clips, exactly as written out.
        assert!(site.stats().clipped > clipped, "clipping engaged");
        assert_eq!(
            var_bits(&a.g_vs),
            var_bits(&b.g_vs),
            "generator: bitwise plain + clip"
        );
        assert_eq!(
            var_bits(&a.d_vs),
            var_bits(&b.d_vs),
            "discriminator: bitwise plain + clip"
        );
        assert_ne!(
            var_bits(&c.d_vs),
            var_bits(&b.d_vs),
            "unclipped, the plain step differs"
        );

        // A NaN among the real samples: refused before either update.
        let (z, real) = inputs(4);
        let _ = real.narrow(0, 10, 1).fill_(f64::NAN);
        let before = (var_bits(&b.g_vs), var_bits(&b.d_vs));
        let err = catch_unwind(AssertUnwindSafe(|| {
            gan_step(
                &b.g,
                &b.d,
                &b.g_vs,
                &b.d_vs,
                &mut b.g_opt,
                &mut b.d_opt,
                &z,
                &real,
            )
        }))
        .expect_err("the guard panics on the NaN batch");
        let text = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            text.contains("non-finite loss in `gan_step`") && text.contains("d_loss"),
            "{text}"
        );
        assert_eq!(
            before,
            (var_bits(&b.g_vs), var_bits(&b.d_vs)),
            "nothing applied"
        );
        // Without the guard the discriminator takes the NaN update.
        gan_step_plain(
            true,
            &a.g,
            &a.d,
            &a.g_vs,
            &a.d_vs,
            &mut a.g_opt,
            &mut a.d_opt,
            &z,
            &real,
        );
        assert!(!all_finite(&a.d_vs), "the plain step applies it");
    }
}
