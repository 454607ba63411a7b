//! What `#[guarded_step]` expands to calls. Not a public API: paths here may change.
//!
//! - `ctx`: the state of one call (the per-call guard, skips, restoring buffers);
//! - `dispatch`: autoref specialisation, picking the guarded or the plain operation by the
//!   operand's type;
//! - `escalate`: how a failure leaves a function that returns `Result`;
//! - `replay`: a failed call run once more under the ATen observer.

mod ctx;
mod dispatch;
mod escalate;
mod replay;

pub use inventory;

pub use crate::amp::LossScale;
pub use crate::config::{Checks, Config, Diagnose, OnNan, SyncMode};
pub use crate::registry::{Registration, Site, CHECKS_ENABLED};
pub use crate::sources::{DeviceSkipOptimizer, GuardedOptimizer, ParamSource};
pub use crate::spike::{AdaptiveClip, Spike};
pub use crate::state::GuardState;
pub use crate::NormType;

pub use ctx::{fail, Ctx, Outcome, PlainStep, Verdict};
pub use dispatch::*;
pub use escalate::*;
pub use replay::{replay, Replay};
