//! A character-level LSTM with `backward_step_clip`, guarded, skipping bad batches.
//!
//! Learns to continue "stepguard keeps training alive. "; `cargo run --example char_rnn`.

use stepguard::guarded_step;
use tch::nn::{self, Module, OptimizerConfig, RNN};
use tch::{Device, Tensor};

const TEXT: &str = "stepguard keeps training alive. ";

struct CharRnn {
    embed: nn::Embedding,
    lstm: nn::LSTM,
    out: nn::Linear,
}

impl CharRnn {
    fn new(vs: &nn::Path, vocab: i64) -> Self {
        CharRnn {
            embed: nn::embedding(vs / "embed", vocab, 16, Default::default()),
            lstm: nn::lstm(vs / "lstm", 16, 64, Default::default()),
            out: nn::linear(vs / "out", 64, vocab, Default::default()),
        }
    }
    fn logits(&self, x: &Tensor) -> Tensor {
        let (h, _) = self.lstm.seq(&self.embed.forward(x));
        self.out.forward(&h)
    }
}

#[guarded_step(on_nan = "skip")]
fn train_step(
    opt: &mut nn::Optimizer,
    vs: &nn::VarStore,
    model: &CharRnn,
    x: &Tensor,
    y: &Tensor,
    vocab: i64,
) -> f64 {
    let _ = vs;
    let logits = model.logits(x);
    let loss = logits
        .view([-1, vocab])
        .cross_entropy_for_logits(&y.view([-1]));
    opt.backward_step_clip(&loss, 0.5);
    f64::try_from(&loss).unwrap()
}

/// Trains for `steps`; returns the first and last loss.
pub fn run(steps: usize) -> (f64, f64) {
    tch::manual_seed(0);
    let chars: Vec<char> = {
        let mut c: Vec<char> = TEXT.chars().collect();
        c.sort();
        c.dedup();
        c
    };
    let vocab = chars.len() as i64;
    let ids: Vec<i64> = TEXT
        .repeat(4)
        .chars()
        .map(|c| chars.binary_search(&c).unwrap() as i64)
        .collect();
    let data = Tensor::from_slice(&ids);
    let n = (ids.len() - 1) as i64;
    let (x, y) = (
        data.narrow(0, 0, n).view([1, n]),
        data.narrow(0, 1, n).view([1, n]),
    );
    let vs = nn::VarStore::new(Device::Cpu);
    let model = CharRnn::new(&vs.root(), vocab);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let losses: Vec<f64> = (0..steps)
        .map(|_| train_step(&mut opt, &vs, &model, &x, &y, vocab))
        .collect();
    (losses[0], *losses.last().unwrap())
}

fn main() {
    let (first, last) = run(60);
    println!(
        "char-rnn: loss {first:.4} -> {last:.4}\n\n{}",
        stepguard::report()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use stepguard_suite::{all_finite, serial, var_bits};

    /// `train_step` without the attribute: the same body.
    fn train_step_plain(
        opt: &mut nn::Optimizer,
        vs: &nn::VarStore,
        model: &CharRnn,
        x: &Tensor,
        y: &Tensor,
        vocab: i64,
    ) -> f64 {
        let _ = vs;
        let logits = model.logits(x);
        let loss = logits
            .view([-1, vocab])
            .cross_entropy_for_logits(&y.view([-1]));
        opt.backward_step_clip(&loss, 0.5);
        f64::try_from(&loss).unwrap()
    }

    #[test]
    fn learns_under_the_guard() {
        let _serial = serial(); // `run` seeds and draws from tch's global generator
        let (first, last) = super::run(10);
        assert!(last.is_finite() && last < first, "{first} -> {last}");
    }

    /// Three copies of one model: `a` plain, `b` guarded, `c` plain and given the fault.
    #[test]
    fn guarded_step_is_the_plain_one_and_skips_a_poisoned_embedding() {
        let _serial = serial();
        tch::manual_seed(5); // the initial weights (held by `serial`: no other test draws)
        let vocab = 12;
        let ids: Vec<i64> = (0..24).map(|i| (i * 5) % vocab).collect();
        let data = Tensor::from_slice(&ids);
        let (x, y) = (
            data.narrow(0, 0, 23).view([1, 23]),
            data.narrow(0, 1, 23).view([1, 23]),
        );
        let make = || {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = CharRnn::new(&vs.root(), vocab);
            (vs, model)
        };
        let ((vs_a, m_a), (mut vs_b, m_b), (mut vs_c, m_c)) = (make(), make(), make());
        vs_b.copy(&vs_a).unwrap();
        vs_c.copy(&vs_a).unwrap();
        let adam = |vs: &nn::VarStore| nn::Adam::default().build(vs, 1e-2).unwrap();
        let (mut opt_a, mut opt_b, mut opt_c) = (adam(&vs_a), adam(&vs_b), adam(&vs_c));
        for _ in 0..3 {
            let a = train_step_plain(&mut opt_a, &vs_a, &m_a, &x, &y, vocab);
            let b = train_step(&mut opt_b, &vs_b, &m_b, &x, &y, vocab);
            let c = train_step_plain(&mut opt_c, &vs_c, &m_c, &x, &y, vocab);
            assert_eq!(
                (a.to_bits(), a.to_bits()),
                (b.to_bits(), c.to_bits()),
                "same loss"
            );
        }
        assert_eq!(var_bits(&vs_a), var_bits(&vs_b), "bitwise the plain step");

        // An infinite row in the embedding of a character the batch uses: the loss is NaN.
        let poison = |vs: &nn::VarStore| {
            tch::no_grad(|| {
                let _ = vs.variables()["embed.weight"]
                    .narrow(0, ids[3], 1)
                    .fill_(f64::INFINITY);
            })
        };
        let saved = vs_b.variables()["embed.weight"].copy();
        poison(&vs_b);
        poison(&vs_c);
        let site = stepguard::registry()
            .find(|s| s.name() == "train_step")
            .expect("registered");
        let skipped = site.stats().skipped;
        let before = var_bits(&vs_b);
        let loss = train_step(&mut opt_b, &vs_b, &m_b, &x, &y, vocab);
        assert!(loss.is_nan(), "the step saw the NaN loss: {loss}");
        assert_eq!(site.stats().skipped, skipped + 1, "skipped");
        assert_eq!(before, var_bits(&vs_b), "the skipped step changed nothing");
        train_step_plain(&mut opt_c, &vs_c, &m_c, &x, &y, vocab);
        assert!(
            !all_finite(&vs_c)
                && !bool::try_from(vs_c.variables()["lstm.weight_ih_l0"].isfinite().all()).unwrap(),
            "without the guard the NaN reaches the LSTM's weights"
        );

        // The row repaired, training goes on exactly where the plain copy is: the skipped
        // step left Adam's state alone too.
        tch::no_grad(|| {
            vs_b.variables()["embed.weight"]
                .shallow_clone()
                .copy_(&saved)
        });
        let a = train_step_plain(&mut opt_a, &vs_a, &m_a, &x, &y, vocab);
        let b = train_step(&mut opt_b, &vs_b, &m_b, &x, &y, vocab);
        assert_eq!(a.to_bits(), b.to_bits());
        assert_eq!(var_bits(&vs_a), var_bits(&vs_b));
    }
}
