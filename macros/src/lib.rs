//! The `#[guarded_step]` attribute of stepguard. Use it through the `stepguard` crate.
