//! Where a NaN/Inf was born, as a replay of the failed call found it: the result types of
//! [`crate::replay`], carried by [`GuardError::origin`](crate::GuardError), with their
//! `Display` (one or two lines of the error's message).
//!
//! - `finding.rs`: the operator (forward or backward), its inputs, the layer; or the input that
//!   already held the NaN/Inf;
//! - `traced.rs`: what the error says of its replay (found, not reproduced, not replayed).

mod finding;
mod traced;

pub use finding::{Finding, Hint, InputInfo, InputOrigin, NonFinite, OpOrigin, Phase, Source};
pub use traced::Traced;
