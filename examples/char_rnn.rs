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
    #[test]
    fn learns_under_the_guard() {
        let (first, last) = super::run(10);
        assert!(last.is_finite() && last < first, "{first} -> {last}");
    }
}
