//! # stepguard
//!
//! Make [`tch`] training steps survive NaN and Inf. The runtime clips the global gradient norm
//! on the tensors' own device without a host sync, folds the finiteness of the loss, the
//! gradients and the parameters into one device-side flag read once per step, and only when
//! that flag says something went wrong, finds the offending tensors by name and diagnoses the
//! cause.
//!
//! Most programs only need the attribute, on the step function they already have:
//!
//! ```no_run
//! use stepguard::guarded_step;
//! use tch::nn::{self, Module};
//! use tch::Tensor;
//!
//! #[guarded_step(max_norm = 5, on_nan = "skip")]
//! fn train_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &nn::Linear, x: &Tensor, y: &Tensor) {
//!     let _ = vs; // names parameters in error messages
//!     let loss = net.forward(x).cross_entropy_for_logits(y);
//!     opt.backward_step(&loss);
//! }
//! ```
//!
//! The same machinery is available by hand, for loops the attribute cannot rewrite:
//!
//! ```no_run
//! use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
//! use stepguard::{Config, GuardState, StepGuard};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root() / "layer1", 4, 2, Default::default());
//! let mut opt = nn::Sgd::default().build(&vs, 1e-2).unwrap();
//! let config = Config::DEFAULT.with_max_norm(5.0);
//! let state = GuardState::new();
//! let (x, y) = (Tensor::randn([8, 4], (Kind::Float, Device::Cpu)), Tensor::zeros([8], (Kind::Int64, Device::Cpu)));
//!
//! let params = opt.trainable_variables();
//! let mut guard = StepGuard::begin(&config, "train_step", &state).with_names(&vs);
//! let loss = net.forward(&x).cross_entropy_for_logits(&y);
//! guard.loss(&loss);
//! opt.zero_grad();
//! loss.backward();
//! guard.before_update(&params).expect("step is finite"); // clip + the one host read
//! opt.step();
//! guard.after_update(&params); // read with the next update, or by `state.flush()`
//! guard.finish();
//! state.flush().expect("the last update left finite parameters");
//! ```

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
// `unsafe` lives in four modules only, each with its preconditions written down: `shim` (the
// ATen calls), `dist::ffi` (the c10d calls), `host_view` (the CPU fast path's reads and writes
// of tensor memory) and `replay::watch` (the ATen observer's calls).
#![deny(unsafe_code)]
// A `GuardError` (~220 bytes) travels only on the cold path, once per failed step.
#![allow(clippy::result_large_err)]

pub mod amp;
mod birth;
pub mod checkpoint;
mod clip;
mod config;
mod diagnose;
pub mod dist;
mod error;
mod events;
mod flag;
mod guard;
#[allow(unsafe_code)]
mod host_view;
mod norm;
pub mod optim;
mod outcome;
pub mod registry;
pub mod replay;
pub mod report;
mod rollback;
pub mod safe;
#[allow(unsafe_code)]
mod shim;
mod sources;
mod spike;
mod state;
mod sync;
mod values;

#[doc(hidden)]
#[path = "private/mod.rs"]
pub mod __private;

pub use stepguard_macros::guarded_step;

pub use clip::{clip_grad_norm, grad_norm, ClipError};
pub use config::{Checks, Config, Diagnose, OnNan, SyncMode};
pub use error::{Check, ConfigError, Diagnosis, GuardError, TorchError};
pub use flag::FiniteFlag;
pub use guard::{Decision, StepGuard};
pub use norm::NormType;
pub use outcome::{last_outcome, Outcome};
pub use registry::{flush, registry, report, report_data, CHECKS_ENABLED};
pub use sources::{NameSource, ParamSource};
pub use spike::{AdaptiveClip, Spike};
pub use state::GuardState;

// Paths the crate's own modules use for items whose public home is a module.
pub(crate) use sources::GuardedOptimizer;

/// What the policy decided about a checked update ([`StepGuard::decide`]).
pub mod policy {
    pub use crate::guard::{Decision, SkipReason, Skipped};
}

/// Hooks for tests and benchmarks (cargo feature `test-hooks`): counters of what a step
/// dispatches and reads, and switches between the runtime's code paths on this thread.
#[cfg(feature = "test-hooks")]
pub mod testing {
    pub use crate::host_view::set_cpu_fast_path;
    pub use crate::shim::{count_aten_ops, set_multi_tensor};
    pub use crate::state::locks as state_locks;
    pub use crate::sync::{count_host_reads, host_reads};
}
