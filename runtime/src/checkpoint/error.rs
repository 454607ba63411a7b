//! What can go wrong when saving, finding or loading a checkpoint.

use std::fmt;
use std::path::{Path, PathBuf};

/// The error of every checkpoint operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder the operation was about.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint at `path` does not verify against its manifest, or its manifest is unreadable.
    #[error("checkpoint {} is not usable: {reason}", path.display())]
    Corrupt {
        /// The checkpoint folder (or the file inside it).
        path: PathBuf,
        /// What is wrong, e.g. `file model.safetensors: SHA-256 mismatch`.
        reason: String,
    },
    /// The checkpoint has no file of this name.
    #[error("checkpoint {} has no file {name:?}", path.display())]
    NoSuchFile {
        /// The checkpoint folder.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// Saved checkpoints exist under `root` but none of them verifies.
    #[error("no checkpoint under {} verifies: {}", root.display(), list(rejected))]
    NoneValid {
        /// The checkpoint folder.
        root: PathBuf,
        /// Every checkpoint found, newest first, with why it was refused.
        rejected: Vec<Rejected>,
    },
    /// A file name given to [`Checkpoints::save`](super::Checkpoints::save) cannot be stored.
    #[error("file name {name:?} cannot be stored in a checkpoint: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The tensors do not fit the VarStore: every missing name, unexpected name, shape and
    /// dtype difference, one per entry. Nothing was copied.
    #[error("the tensors do not match the VarStore, nothing was loaded: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    /// Bytes that are not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Safetensors(String),
    /// A libtorch operation failed (a device copy, an unsupported dtype).
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// The manifest could not be written as JSON.
    #[error("manifest JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The run is not at a verified point: a pending check failed, or the state to save holds
    /// NaN/Inf. Nothing was written.
    #[error("not saved: {0}")]
    Unverified(Box<crate::GuardError>),
    /// The run is not at a point to save: something observed is not read yet (a loss of a
    /// call without an update). Nothing was written.
    #[error("not saved: {0}")]
    Unread(&'static str),
    /// The checkpoint does not fit this run (another model, a guarded function or a device
    /// this process does not have). Nothing was loaded.
    #[error("the checkpoint does not fit this run, nothing was loaded: {0}")]
    Incompatible(String),
}

impl From<crate::GuardError> for CheckpointError {
    fn from(e: crate::GuardError) -> Self {
        CheckpointError::Unverified(Box::new(e))
    }
}

impl From<crate::TorchError> for CheckpointError {
    fn from(e: crate::TorchError) -> Self {
        CheckpointError::Torch(tch::TchError::Torch(e.message().to_string()))
    }
}

impl CheckpointError {
    /// A [`CheckpointError::Io`] about `path`.
    pub(crate) fn io(path: &Path, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A checkpoint folder that was passed over while looking for the one to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The folder.
    pub path: PathBuf,
    /// Why it was refused, e.g. `manifest missing: the save did not finish`.
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

fn list(rejected: &[Rejected]) -> String {
    let items: Vec<String> = rejected.iter().map(Rejected::to_string).collect();
    items.join("; ")
}
