//! Checkpoints that are either complete and verified, or passed over.
//!
//! [`Checkpoints`] keeps a folder of `step-{step:010}/` checkpoints. A save writes every file
//! and then a `manifest.json` with each file's size and SHA-256 into a temporary folder,
//! syncs them, and renames the folder into place: a process killed at any point leaves the
//! previous checkpoints intact. [`Checkpoints::latest`] returns the newest checkpoint that
//! verifies against its manifest and says why each newer one was passed over.
//!
//! ```no_run
//! use stepguard::checkpoint::{CheckpointError, Checkpoints};
//!
//! # fn main() -> Result<(), CheckpointError> {
//! let store = Checkpoints::new("checkpoints").keep(3);
//! store.save(100, vec![("state.bin".into(), vec![1, 2, 3].into())], serde_json::json!({"lr": 0.1}))?;
//! if let Some(found) = store.latest()? {
//!     for r in &found.rejected {
//!         eprintln!("passed over {r}");
//!     }
//!     let _state = found.checkpoint.read("state.bin")?;
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod layout;
mod store;
mod verify;

pub use self::error::{CheckpointError, Rejected};
pub use self::store::{load, Checkpoints, Contents, FileWriter, Latest};
pub use self::verify::{Checkpoint, FileEntry};

#[cfg(test)]
mod tests;
