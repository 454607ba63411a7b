//! The names of the folders under a checkpoint root, and the file-system steps that make a
//! rename durable.

use std::path::{Path, PathBuf};

use super::error::CheckpointError;

/// What a folder under the root is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// `.step-{step}.tmp-{pid}`: a save being written (or one that never finished).
    Temp { step: u64, pid: u32 },
    /// `step-{step}`: a finished save.
    Final { step: u64 },
    /// `.step-{step}.old-{pid}`: a finished save moved aside while the same step is saved again.
    Replaced { step: u64, pid: u32 },
}

impl Slot {
    /// The step the folder holds.
    pub(crate) fn step(self) -> u64 {
        match self {
            Slot::Temp { step, .. } | Slot::Final { step } | Slot::Replaced { step, .. } => step,
        }
    }

    /// Order among folders of the same step, newest attempt first.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Slot::Temp { .. } => 0,
            Slot::Final { .. } => 1,
            Slot::Replaced { .. } => 2,
        }
    }

    /// The folder's name.
    pub(crate) fn name(self) -> String {
        match self {
            Slot::Temp { step, pid } => format!(".step-{step:010}.tmp-{pid}"),
            Slot::Final { step } => format!("step-{step:010}"),
            Slot::Replaced { step, pid } => format!(".step-{step:010}.old-{pid}"),
        }
    }

    /// The folder a name stands for, if it is one of the three forms.
    pub(crate) fn parse(name: &str) -> Option<Slot> {
        if let Some(digits) = name.strip_prefix("step-") {
            return Some(Slot::Final {
                step: number(digits)?,
            });
        }
        let rest = name.strip_prefix(".step-")?;
        let (step, rest) = rest.split_once('.')?;
        let step = number(step)?;
        if let Some(pid) = rest.strip_prefix("tmp-") {
            Some(Slot::Temp {
                step,
                pid: number(pid)?.try_into().ok()?,
            })
        } else {
            let pid = rest.strip_prefix("old-")?;
            Some(Slot::Replaced {
                step,
                pid: number(pid)?.try_into().ok()?,
            })
        }
    }
}

/// A decimal number of ASCII digits only (no sign, no spaces).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The folders under `root` whose names are [`Slot`]s; none when `root` does not exist.
pub(crate) fn slots(root: &Path) -> Result<Vec<(Slot, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CheckpointError::io(root, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io(root, e))?;
        let Some(slot) = entry.file_name().to_str().and_then(Slot::parse) else {
            continue;
        };
        let is_dir = entry
            .file_type()
            .map_err(|e| CheckpointError::io(&entry.path(), e))?
            .is_dir();
        if is_dir {
            out.push((slot, entry.path()));
        }
    }
    Ok(out)
}

/// Whether the process `pid` may still be running. Only where `/proc` lists processes is a
/// process known to be gone; elsewhere every process counts as running.
pub(crate) fn may_be_running(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    pid == std::process::id() || proc.join(pid.to_string()).exists()
}

/// Makes the entries of the folder `dir` (files created, renamed or removed in it) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    {
        let handle = std::fs::File::open(dir).map_err(|e| CheckpointError::io(dir, e))?;
        handle.sync_all().map_err(|e| CheckpointError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
