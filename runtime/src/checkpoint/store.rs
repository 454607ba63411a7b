//! A folder of step checkpoints: atomic saves, keep-last-K, and the search for the newest one
//! that verifies.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{CheckpointError, Rejected};
use super::layout::{may_be_running, slots, sync_dir, Slot};
use super::verify::{check, hex, Checkpoint, Depth, FileEntry, Manifest, MANIFEST};

/// The checkpoints kept by default.
const DEFAULT_KEEP: usize = 3;

/// A function that writes one file of a checkpoint (see [`Contents::writer`]).
pub type FileWriter = Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + Send>;

/// What one file of a checkpoint holds: bytes already in memory, or a function that writes them.
pub enum Contents {
    /// The file's bytes.
    Bytes(Vec<u8>),
    /// Writes the file (buffered); an error aborts the save.
    Writer(FileWriter),
}

impl Contents {
    /// Contents produced by `write` when the checkpoint is saved.
    pub fn writer(
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static,
    ) -> Self {
        Contents::Writer(Box::new(write))
    }
}

impl From<Vec<u8>> for Contents {
    fn from(bytes: Vec<u8>) -> Self {
        Contents::Bytes(bytes)
    }
}

impl fmt::Debug for Contents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Contents::Bytes(b) => write!(f, "Contents::Bytes({} bytes)", b.len()),
            Contents::Writer(_) => f.write_str("Contents::Writer(..)"),
        }
    }
}

/// The checkpoint to resume from, found by [`Checkpoints::latest`].
#[derive(Debug, Clone)]
pub struct Latest {
    /// The newest checkpoint that verifies.
    pub checkpoint: Checkpoint,
    /// The newer folders passed over, newest first, each with the reason.
    pub rejected: Vec<Rejected>,
}

/// A folder of checkpoints `root/step-{step:010}/`, each a set of files and a `manifest.json`
/// holding the size and SHA-256 of every file.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
    keep: usize,
}

impl Checkpoints {
    /// Checkpoints under `root` (created by the first save), keeping the last 3.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Checkpoints {
            root: root.into(),
            keep: DEFAULT_KEEP,
        }
    }

    /// Keeps the last `k` complete checkpoints after each save (at least 1).
    pub fn keep(mut self, k: usize) -> Self {
        self.keep = k.max(1);
        self
    }

    /// Checkpoints in the folder `name` under this root, kept as these are.
    pub(crate) fn under(&self, name: &str) -> Checkpoints {
        Checkpoints {
            root: self.root.join(name),
            keep: self.keep,
        }
    }

    /// The folder the checkpoints are in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Saves `files` and `meta` as the checkpoint of `step`, in `root/step-{step:010}/`.
    ///
    /// The files are written into a temporary folder, each synced to disk, then the manifest
    /// last; the folder is renamed into place only when all of it is on disk, so a crash at
    /// any point leaves either the complete checkpoint or a folder [`Checkpoints::latest`]
    /// passes over. A checkpoint of the same step is replaced: it is moved aside first and
    /// removed once the new one is in place. Then the checkpoints beyond the last `k` complete
    /// ones and the temporary folders of processes that are gone are removed.
    pub fn save(
        &self,
        step: u64,
        files: Vec<(String, Contents)>,
        meta: serde_json::Value,
    ) -> Result<Checkpoint, CheckpointError> {
        check_names(&files)?;
        if !self.root.is_dir() {
            std::fs::create_dir_all(&self.root).map_err(|e| CheckpointError::io(&self.root, e))?;
            // The new root's own entry in its parent.
            match self.root.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
                _ => sync_dir(Path::new("."))?,
            }
        }
        let pid = std::process::id();
        let tmp = self.root.join(Slot::Temp { step, pid }.name());
        if tmp.exists() {
            remove_dir(&tmp)?;
        }
        std::fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
        let mut cleanup = RemoveOnDrop(Some(tmp.clone()));

        let mut entries = Vec::with_capacity(files.len());
        for (name, contents) in files {
            let path = tmp.join(&name);
            let (size, sha256) = write_file(&path, contents)?;
            entries.push(FileEntry { name, size, sha256 });
        }
        let manifest = Manifest::new(step, meta, entries);
        let json = serde_json::to_vec_pretty(&manifest)?;
        write_file(&tmp.join(MANIFEST), Contents::Bytes(json))?;
        sync_dir(&tmp)?;

        let target = self.root.join(Slot::Final { step }.name());
        let aside = self.root.join(Slot::Replaced { step, pid }.name());
        let replaced = target.exists();
        if replaced {
            if aside.exists() {
                remove_dir(&aside)?;
            }
            rename(&target, &aside)?;
        }
        if let Err(e) = rename(&tmp, &target) {
            if replaced {
                // Put the previous checkpoint back; the error of the save is the one reported.
                let _ = std::fs::rename(&aside, &target);
            }
            return Err(e);
        }
        cleanup.0 = None;
        sync_dir(&self.root)?;
        if replaced {
            // A leftover is removed by a later save (see `tidy`).
            let _ = std::fs::remove_dir_all(&aside);
        }
        self.tidy();
        Ok(Checkpoint::saved(target, manifest))
    }

    /// The newest checkpoint whose manifest and files verify (every file present, with the
    /// manifest's size and SHA-256), and the newer folders passed over with the reason (an
    /// unfinished save, a truncated or altered file). `Ok(None)` when no save ever finished
    /// under `root`; [`CheckpointError::NoneValid`] when saves finished but none verifies.
    pub fn latest(&self) -> Result<Option<Latest>, CheckpointError> {
        self.latest_up_to(u64::MAX)
    }

    /// [`Checkpoints::latest`] among the checkpoints of steps up to `limit`.
    pub(crate) fn latest_up_to(&self, limit: u64) -> Result<Option<Latest>, CheckpointError> {
        let mut found = slots(&self.root)?;
        found.retain(|(s, _)| s.step() <= limit);
        let finals = finished_steps(&found);
        // A folder moved aside is a candidate only if the save replacing it never got in place.
        found.retain(|(s, _)| !matches!(s, Slot::Replaced { step, .. } if finals.contains(step)));
        found.sort_by(|(a, pa), (b, pb)| (b.step(), a.rank(), pa).cmp(&(a.step(), b.rank(), pb)));
        let mut rejected = Vec::new();
        let mut any_finished = false;
        for (slot, path) in found {
            if let Slot::Temp { .. } = slot {
                rejected.push(Rejected {
                    path,
                    reason: "temporary folder: the save did not finish".to_string(),
                });
                continue;
            }
            any_finished = true;
            match check(&path, Some(slot.step()), Depth::Full) {
                Ok(checkpoint) => {
                    return Ok(Some(Latest {
                        checkpoint,
                        rejected,
                    }))
                }
                Err(CheckpointError::Corrupt { path, reason }) => {
                    rejected.push(Rejected { path, reason })
                }
                Err(e) => return Err(e),
            }
        }
        if any_finished {
            Err(CheckpointError::NoneValid {
                root: self.root.clone(),
                rejected,
            })
        } else {
            Ok(None)
        }
    }

    /// Removes the checkpoints older than the last `keep` complete ones (manifest readable,
    /// every file at its size), and the folders left by saves of processes that are gone.
    /// Failures are left for the next save: the checkpoint just saved is in place already.
    fn tidy(&self) {
        let Ok(mut found) = slots(&self.root) else {
            return;
        };
        found.sort_by(|(a, _), (b, _)| (b.step(), a.rank()).cmp(&(a.step(), b.rank())));
        let finals = finished_steps(&found);
        let mut complete = 0;
        for (slot, path) in &found {
            match *slot {
                Slot::Temp { pid, .. } if !may_be_running(pid) => {
                    let _ = std::fs::remove_dir_all(path);
                }
                Slot::Replaced { step, pid }
                    if pid == std::process::id() || !may_be_running(pid) =>
                {
                    if finals.contains(&step) {
                        let _ = std::fs::remove_dir_all(path);
                    } else {
                        // Its replacement never got in place: it is the checkpoint of `step`.
                        let target = self.root.join(Slot::Final { step }.name());
                        let _ = std::fs::rename(path, target);
                    }
                }
                Slot::Final { .. } if complete >= self.keep => {
                    let _ = std::fs::remove_dir_all(path);
                }
                Slot::Final { step } => {
                    if check(path, Some(step), Depth::Sizes).is_ok() {
                        complete += 1;
                    }
                }
                Slot::Temp { .. } | Slot::Replaced { .. } => {}
            }
        }
        let _ = sync_dir(&self.root);
    }
}

/// The steps that have a `step-*` folder.
fn finished_steps(found: &[(Slot, PathBuf)]) -> HashSet<u64> {
    found
        .iter()
        .filter(|(s, _)| matches!(s, Slot::Final { .. }))
        .map(|(s, _)| s.step())
        .collect()
}

/// Verifies the checkpoint folder `path` against its manifest (see [`Checkpoints::latest`]).
pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint, CheckpointError> {
    let path = path.as_ref();
    let name = path.file_name().and_then(|n| n.to_str());
    match name.and_then(Slot::parse) {
        Some(Slot::Temp { .. }) => Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: "temporary folder: the save did not finish".to_string(),
        }),
        Some(slot) => check(path, Some(slot.step()), Depth::Full),
        None => check(path, None, Depth::Full),
    }
}

/// Refuses names that are not plain, distinct file names, or that are the manifest's.
fn check_names(files: &[(String, Contents)]) -> Result<(), CheckpointError> {
    let mut seen = HashSet::new();
    for (name, _) in files {
        let reason = if name.is_empty() {
            Some("empty")
        } else if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
            Some("not a plain file name")
        } else if name == MANIFEST {
            Some("reserved for the checkpoint's manifest")
        } else if !seen.insert(name.as_str()) {
            Some("given twice")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(CheckpointError::InvalidName {
                name: name.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// Writes `contents` to a new file at `path`, flushed and synced; returns its size and SHA-256.
fn write_file(path: &Path, contents: Contents) -> Result<(u64, String), CheckpointError> {
    let io = |e| CheckpointError::io(path, e);
    let file = File::create_new(path).map_err(io)?;
    let mut out = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        size: 0,
    };
    match contents {
        Contents::Bytes(bytes) => out.write_all(&bytes).map_err(io)?,
        Contents::Writer(write) => write(&mut out).map_err(io)?,
    }
    out.flush().map_err(io)?;
    let file = out.inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok((out.size, hex(&out.hasher.finalize())))
}

/// A writer that counts and hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Removes the temporary folder of a save that did not finish (an error, a panic in a writer).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    std::fs::rename(from, to).map_err(|e| CheckpointError::io(to, e))
}

fn remove_dir(path: &Path) -> Result<(), CheckpointError> {
    std::fs::remove_dir_all(path).map_err(|e| CheckpointError::io(path, e))
}
