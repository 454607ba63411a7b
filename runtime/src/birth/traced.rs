//! What the replay of a failed call said: where its NaN/Inf was born, or why it could not say.

use std::fmt;

use super::Finding;

/// What the replay of a failed call found ([`GuardError::origin`](crate::GuardError)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Traced {
    /// The call ran once more under the ATen observer, failed the same way, and the observer
    /// found where the NaN/Inf was born.
    Found {
        /// The operator (or the input) it came from.
        finding: Box<Finding>,
        /// With a process group: the rank whose replay found it.
        rank: Option<usize>,
    },
    /// The replay failed the same way, but its observer saw no operator make the NaN/Inf and no
    /// input hold one (it came from an operator libtorch does not record).
    Unseen,
    /// The replay did not fail the same way (the body draws its own data, or something in it
    /// is not deterministic): nothing is guessed.
    NotReproduced,
    /// There was no replay, and why.
    NotReplayed(String),
}

impl fmt::Display for Traced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Traced::Found {
                finding,
                rank: Some(r),
            } => write!(f, "origin (replayed on rank {r}): {finding}"),
            Traced::Found {
                finding,
                rank: None,
            } => write!(f, "origin (replayed): {finding}"),
            Traced::Unseen => f.write_str(
                "origin: the replay failed the same way, but no recorded operator made the NaN/Inf",
            ),
            Traced::NotReproduced => f.write_str(
                "origin: not reproduced on replay (run again, the call did not fail the same way: \
                 it draws its own data, or something in it is not deterministic)",
            ),
            Traced::NotReplayed(why) => write!(f, "origin: not replayed ({why})"),
        }
    }
}
