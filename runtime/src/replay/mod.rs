//! Naming the operator where a NaN/Inf was born: a failed step replayed under an ATen observer.
//!
//! `Watch::arm` registers a global `RecordFunction` callback (`csrc/opwatch.cpp`); the step
//! then runs as usual (forward and backward) on the thread that armed it, and
//! `Watch::finish` removes the callback, reads the statistics of every tensor the step's
//! operators wrote (`[min, max, min |x|]` per new floating tensor, computed on its device; one
//! host read, however many operators), and runs the analysis (`analysis.rs`) on the host.
//! Nothing is registered otherwise: a healthy step pays nothing.
//!
//! - `watch.rs`: the calls into the observer, the only `unsafe` here;
//! - `trace.rs`: the observer's record, parsed and checked;
//! - `analysis.rs`: record and statistics in, [`Finding`] out (a pure function);
//! - the result types and their `Display` live in `crate::birth` (the error carries them),
//!   re-exported here.
//!
//! One watch at a time per process: arming a second while one is armed is an error (it does
//! not wait). Recorded: the operators of the arming thread, and on any thread those of the
//! autograd nodes whose forward ran there (CUDA's backward runs on the engine's threads; the
//! CUDA path is written device-agnostic but untested). A replay names what the replayed step
//! did: randomness (dropout) must be replayed by the caller for it to be the failed step.
//!
//! Cost: a replayed failure (the first run, the armed replay, the slow path) is measured in
//! `docs/performance.md` ("The failure path").

use std::marker::PhantomData;

use tch::Tensor;

use crate::error::TorchError;

mod analysis;
mod trace;
#[allow(unsafe_code)]
mod watch;

#[cfg(test)]
mod tests;

pub use crate::birth::{
    Finding, Hint, InputInfo, InputOrigin, NonFinite, OpOrigin, Phase, Source, Traced,
};

/// What a named tensor is to the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A parameter (a `VarStore` name: `fc1.weight`).
    Parameter,
    /// An argument of the step (`x`).
    Argument,
}

/// An armed observer: every operator the arming thread runs until [`Watch::finish`] (or the
/// drop) is recorded. Dropping it without `finish` disarms it, on a panic or an error too.
/// Not `Send`: what it watches is the thread that armed it.
#[derive(Debug)]
pub(crate) struct Watch {
    names: Vec<(String, Role)>,
    _home: PhantomData<*const ()>,
}

impl Watch {
    /// Arms the observer, with the tensors to name (parameters and arguments, known by their
    /// storage: a view of one is named too). An error if a watch is already armed in the
    /// process (it does not wait), or if libtorch refuses the callback.
    pub(crate) fn arm(named: &[(String, &Tensor, Role)]) -> Result<Watch, TorchError> {
        let tensors: Vec<&Tensor> = named.iter().map(|(_, t, _)| *t).collect();
        watch::arm(&tensors)?;
        Ok(Watch {
            names: named.iter().map(|(n, _, r)| (n.clone(), *r)).collect(),
            _home: PhantomData,
        })
    }

    /// Disarms, reads the statistics once and analyses the record: the origin of the NaN/Inf
    /// that the step's last non-finite tensor holds, none when the step made none. An error
    /// when libtorch failed in the observer (the record would be incomplete) or at the read.
    pub(crate) fn finish(self) -> Result<Option<Finding>, TorchError> {
        let (text, stats) = watch::finish()?;
        let stats = match stats {
            Some(t) => crate::sync::read_f64s(&t)?,
            None => Vec::new(),
        };
        #[cfg(test)]
        tests::dump(&text, &stats);
        let trace = trace::Trace::parse(&text)?;
        if let Some(e) = &trace.error {
            return Err(TorchError::new(format!(
                "stepguard: the ATen observer failed during the replay: {e}"
            )));
        }
        if stats.len() % 3 != 0 {
            return Err(TorchError::new(
                "stepguard: the ATen observer's statistics are not rows of 3",
            ));
        }
        trace.check(stats.len() / 3, self.names.len())?;
        Ok(analysis::analyse(&trace, &stats, &self.names))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // After `finish` this finds nothing registered and nothing recorded.
        watch::disarm();
    }
}

/// Whether the observer's callback is registered (a watch is armed).
pub(crate) fn armed() -> bool {
    watch::armed()
}
