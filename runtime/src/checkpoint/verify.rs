//! The manifest of a checkpoint folder and the check of a folder against it.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::CheckpointError;

/// The name of the manifest inside a checkpoint folder; it is written last.
pub(crate) const MANIFEST: &str = "manifest.json";
/// The `format` field of every manifest.
const FORMAT: &str = "stepguard-checkpoint";
/// The manifest layout this build writes and reads.
pub(crate) const VERSION: u32 = 1;

/// One file of a checkpoint as its manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name inside the checkpoint folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The SHA-256 of its contents, lowercase hex.
    pub sha256: String,
}

/// The contents of `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) format: String,
    pub(crate) version: u32,
    pub(crate) step: u64,
    pub(crate) meta: serde_json::Value,
    pub(crate) files: Vec<FileEntry>,
}

impl Manifest {
    pub(crate) fn new(step: u64, meta: serde_json::Value, files: Vec<FileEntry>) -> Manifest {
        Manifest {
            format: FORMAT.to_string(),
            version: VERSION,
            step,
            meta,
            files,
        }
    }
}

/// A checkpoint folder whose files matched its manifest (size and SHA-256) when it was checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    step: u64,
    meta: serde_json::Value,
    files: Vec<FileEntry>,
}

impl Checkpoint {
    /// The checkpoint just written at `path` with this manifest.
    pub(crate) fn saved(path: PathBuf, manifest: Manifest) -> Checkpoint {
        Checkpoint {
            path,
            step: manifest.step,
            meta: manifest.meta,
            files: manifest.files,
        }
    }

    /// The checkpoint's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The training step it was saved at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The metadata given to [`Checkpoints::save`](super::Checkpoints::save).
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    /// The files of the checkpoint, in the order they were saved.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// The contents of the file `name`, checked once more against the manifest's size and
    /// SHA-256 (a file changed since the checkpoint was verified is refused).
    pub fn read(&self, name: &str) -> Result<Vec<u8>, CheckpointError> {
        let mut file = self.open(name)?;
        let mut bytes = Vec::new();
        let read = file.read_to_end(&mut bytes);
        file.finish()?;
        read.map_err(|e| CheckpointError::io(&self.path.join(name), e))?;
        Ok(bytes)
    }

    /// The file `name` to read in a stream: its size checked against the manifest now, its
    /// SHA-256 by [`CheckedFile::finish`], after the last byte.
    pub(crate) fn open(&self, name: &str) -> Result<CheckedFile, CheckpointError> {
        let entry = self.files.iter().find(|f| f.name == name).ok_or_else(|| {
            CheckpointError::NoSuchFile {
                path: self.path.clone(),
                name: name.to_string(),
            }
        })?;
        let path = self.path.join(name);
        let file = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let len = file
            .metadata()
            .map_err(|e| CheckpointError::io(&path, e))?
            .len();
        if let Some(reason) = mismatch(entry, len, &entry.sha256) {
            return Err(CheckpointError::Corrupt {
                path: self.path.clone(),
                reason,
            });
        }
        Ok(CheckedFile {
            file: Hashing::new(file),
            entry: entry.clone(),
            dir: self.path.clone(),
        })
    }
}

/// A checkpoint's file read in a stream, hashed as it is read (see [`Checkpoint::open`]).
pub(crate) struct CheckedFile {
    file: Hashing,
    entry: FileEntry,
    dir: PathBuf,
}

impl CheckedFile {
    /// Its size in bytes, as the manifest says (and the file had when it was opened).
    pub(crate) fn len(&self) -> u64 {
        self.entry.size
    }

    /// Reads what is left, then checks the whole file against the manifest: a file changed
    /// since the checkpoint was verified is [`CheckpointError::Corrupt`], whatever was made
    /// of its bytes.
    pub(crate) fn finish(self) -> Result<(), CheckpointError> {
        let path = self.dir.join(&self.entry.name);
        let (size, sha256) = self
            .file
            .finish()
            .map_err(|e| CheckpointError::io(&path, e))?;
        match mismatch(&self.entry, size, &sha256) {
            Some(reason) => Err(CheckpointError::Corrupt {
                path: self.dir,
                reason,
            }),
            None => Ok(()),
        }
    }
}

impl Read for CheckedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

/// A file read through a 1 MiB buffer, its bytes counted and hashed (SHA-256) as they pass.
struct Hashing {
    file: std::io::BufReader<File>,
    hasher: Sha256,
    size: u64,
}

impl Hashing {
    fn new(file: File) -> Hashing {
        Hashing {
            file: std::io::BufReader::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Reads what is left: the file's size and SHA-256 (hex).
    fn finish(mut self) -> std::io::Result<(u64, String)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((self.size, hex(&self.hasher.finalize())))
    }
}

impl Read for Hashing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// How thoroughly [`check`] reads the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Depth {
    /// Manifest and file sizes only.
    Sizes,
    /// Sizes, then the SHA-256 of every file.
    Full,
}

/// Checks the folder `dir` against its manifest. `step`: the step its name says, if any.
/// Every way it can fail is a [`CheckpointError::Corrupt`] whose reason says what is wrong.
pub(crate) fn check(
    dir: &Path,
    step: Option<u64>,
    depth: Depth,
) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: dir.to_path_buf(),
        reason,
    };
    let text = match std::fs::read(dir.join(MANIFEST)) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(corrupt(
                "manifest missing: the save did not finish".to_string(),
            ))
        }
        Err(e) => return Err(corrupt(format!("manifest unreadable: {e}"))),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| corrupt(format!("manifest unreadable: {e}")))?;
    if manifest.format != FORMAT {
        return Err(corrupt(format!(
            "manifest format {:?}, expected {FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.version != VERSION {
        return Err(corrupt(format!(
            "manifest version {}, this build reads version {VERSION}",
            manifest.version
        )));
    }
    if let Some(step) = step.filter(|&s| s != manifest.step) {
        return Err(corrupt(format!(
            "manifest is for step {}, the folder's name for step {step}",
            manifest.step
        )));
    }
    // Sizes of all files first: a truncated or missing file is found without hashing.
    for entry in &manifest.files {
        let size = match std::fs::metadata(dir.join(&entry.name)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(corrupt(format!("file {}: missing", entry.name)))
            }
            Err(e) => return Err(corrupt(format!("file {}: unreadable: {e}", entry.name))),
        };
        if let Some(reason) = mismatch(entry, size, &entry.sha256) {
            return Err(corrupt(reason));
        }
    }
    if depth == Depth::Full {
        for entry in &manifest.files {
            let (size, sha256) = hash_file(&dir.join(&entry.name))
                .map_err(|e| corrupt(format!("file {}: unreadable: {e}", entry.name)))?;
            if let Some(reason) = mismatch(entry, size, &sha256) {
                return Err(corrupt(reason));
            }
        }
    }
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        step: manifest.step,
        meta: manifest.meta,
        files: manifest.files,
    })
}

/// Why a file of `size` bytes with this SHA-256 is not the manifest's `entry`, if it is not.
fn mismatch(entry: &FileEntry, size: u64, sha256: &str) -> Option<String> {
    if size != entry.size {
        Some(format!(
            "file {}: {size} bytes, manifest says {}",
            entry.name, entry.size
        ))
    } else if !sha256.eq_ignore_ascii_case(&entry.sha256) {
        Some(format!("file {}: SHA-256 mismatch", entry.name))
    } else {
        None
    }
}

/// The size and SHA-256 (hex) of the file at `path`.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    Hashing::new(File::open(path)?).finish()
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}
