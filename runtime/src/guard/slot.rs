//! The step's verdicts by name: one [`Slot`] per check, the one definition of their order (the
//! order of the step's one read), of the columns of the ranks' verdict matrix, of which of them
//! are the same on every rank, and of what a failure seen on another rank is called.

use crate::error::Check;

/// One verdict of an update, in the order things happen in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The previous update's parameters check, read with this update.
    Pending,
    /// This update's parameters before it.
    ParamsBefore,
    /// The losses and the tensors bound in the forward pass.
    Forward,
    /// The grads (their total norm).
    Grads,
    /// Loss scaling: the grads did not overflow at the scale.
    Overflow,
    /// Spike detection: the loss and the grad norm are within their running statistics.
    Spike,
}

impl Slot {
    /// Every slot, in step order.
    pub(crate) const ALL: [Slot; 6] = [
        Slot::Pending,
        Slot::ParamsBefore,
        Slot::Forward,
        Slot::Grads,
        Slot::Overflow,
        Slot::Spike,
    ];

    /// The verdicts that travel between the ranks of a process group, in the order of the
    /// columns of a rank's row: all but spike detection, which is judged afterwards from values
    /// that are then the same on every rank.
    pub(crate) const SHARED: [Slot; 5] = [
        Slot::Pending,
        Slot::ParamsBefore,
        Slot::Forward,
        Slot::Grads,
        Slot::Overflow,
    ];

    /// Its place in [`Slot::ALL`].
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// Its column in a rank's row of the verdict matrix (`None`: it does not travel).
    pub(crate) fn column(self) -> Option<usize> {
        Slot::SHARED.iter().position(|s| *s == self)
    }

    /// Whether its tensors are the same on every rank under data-parallel training (the
    /// averaged grads): the verdicts folded into the gradients' last bucket leave it out.
    pub(crate) const fn replicated(self) -> bool {
        matches!(self, Slot::Grads | Slot::Overflow)
    }

    /// What its failure on another rank is called: the check, and a short text. `loss`: that
    /// rank's mean loss, when it had one (a non-finite loss names the loss, not the forward
    /// pass).
    pub(crate) fn failure(self, loss: Option<f64>) -> (Check, String) {
        match self {
            Slot::Pending | Slot::ParamsBefore => (Check::Params, "parameters non-finite".into()),
            Slot::Forward => match loss.filter(|l| !l.is_finite()) {
                Some(l) => (
                    Check::Loss,
                    format!("loss {}", if l.is_nan() { "NaN" } else { "Inf" }),
                ),
                None => (
                    Check::Forward,
                    "non-finite value in the forward pass".into(),
                ),
            },
            Slot::Grads => (Check::Grads, "grads non-finite".into()),
            Slot::Overflow => (Check::Grads, "grads overflowed".into()),
            Slot::Spike => (Check::Spike, "loss spike".into()),
        }
    }
}

/// The column of a rank's mean loss, after its verdicts.
pub(crate) const LOSS: usize = Slot::SHARED.len();
/// The column that says whether the rank had a loss.
pub(crate) const HAS_LOSS: usize = LOSS + 1;
/// Columns of a rank's row: the verdicts of [`Slot::SHARED`], its mean loss, and whether it
/// had one.
pub(crate) const COLS: usize = LOSS + 2;
