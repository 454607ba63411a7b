//! Undoing a step: the buffers saved at the start of a call (restored when its update is
//! skipped) and `rollback = N`'s snapshot of a good update (restored on a failure a skip cannot
//! undo). The policy that decides when lives with the guard's ([`Decision`](crate::Decision)).

mod buffers;
mod snapshot;

pub(crate) use buffers::Buffers;
pub(crate) use snapshot::Snapshot;
