//! Counting of device-to-host reads.
//!
//! The runtime's reads of values the device may still be computing (`read_i64s`, `read_f64s`)
//! go through this module and are counted, so "at most one host sync per step" is something a
//! test can assert rather than a promise; `read_f64s_deferred` reads an earlier step's values
//! without counting. The runtime's other reads (the deferred mode's pinned copies in
//! `shim::host_copy`, a checkpoint being loaded, CPU tensors on the fast path) are listed in
//! docs/internals.md, "Host reads". The count is per thread: a training loop runs its steps on
//! one thread, and tests running in parallel do not see each other's reads.

use std::cell::Cell;
use tch::Tensor;

thread_local! {
    static HOST_READS: Cell<u64> = const { Cell::new(0) };
}

/// Number of device-to-host reads stepguard has made on this thread so far.
///
/// On CUDA each of these is a stream synchronisation; on CPU it is a plain read, counted all
/// the same so that the sync budget is tested on every device.
#[cfg(feature = "test-hooks")]
pub fn host_reads() -> u64 {
    HOST_READS.with(Cell::get)
}

/// Runs `f` and returns its result with the number of host reads stepguard made meanwhile on
/// this thread.
#[cfg(feature = "test-hooks")]
pub fn count_host_reads<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = host_reads();
    let r = f();
    (r, host_reads() - before)
}

fn bump() {
    HOST_READS.with(|c| c.set(c.get() + 1));
}

/// Reads a 1-d tensor as `Vec<i64>` (one counted host read).
pub(crate) fn read_i64s(t: &Tensor) -> Result<Vec<i64>, tch::TchError> {
    bump();
    Vec::<i64>::try_from(
        t.f_to_kind(tch::Kind::Int64)?
            .f_to_device(tch::Device::Cpu)?,
    )
}

/// Reads a 1-d tensor as `Vec<f64>` (one counted host read).
pub(crate) fn read_f64s(t: &Tensor) -> Result<Vec<f64>, tch::TchError> {
    bump();
    Vec::<f64>::try_from(
        t.f_to_kind(tch::Kind::Double)?
            .f_to_device(tch::Device::Cpu)?,
    )
}

/// Reads a 1-d tensor as `Vec<f64>` without counting it: the verdict of an earlier step
/// (`sync = "deferred"`), whose values were computed a step ago, so that the device has long
/// moved on. On CUDA this is a copy of values already computed, not a wait for the step.
pub(crate) fn read_f64s_deferred(t: &Tensor) -> Result<Vec<f64>, tch::TchError> {
    Vec::<f64>::try_from(
        t.f_to_kind(tch::Kind::Double)?
            .f_to_device(tch::Device::Cpu)?,
    )
}
