//! The manifest stored beside every artifact.

use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::key::KeyFields;

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the artifact, with `/` separators.
    pub path: String,
    pub size: u64,
    pub hash: String,
    /// Modification time when the artifact was stored, in nanoseconds: a
    /// file whose size and time still match is not hashed again.
    pub mtime_ns: i128,
}

/// What a stored artifact is and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    /// The stage instance that produced it (for `cache ls`).
    pub stage: String,
    pub fields: KeyFields,
    /// blake3 over the files' paths and hashes.
    pub output_hash: String,
    pub files: Vec<FileEntry>,
    /// Unix time the stage started, in seconds.
    pub started_at: u64,
    pub duration_ms: u64,
    pub watchfire_version: String,
}

impl Manifest {
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|entry| entry.path == path)
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|entry| entry.size).sum()
    }
}

/// Hashes one file with blake3.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(fs_err::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The combined hash of a set of files (sorted by path).
pub fn hash_entries(entries: &[FileEntry]) -> String {
    let mut hasher = blake3::Hasher::new();
    for entry in entries {
        hasher
            .update(entry.path.as_bytes())
            .update(&[0])
            .update(entry.hash.as_bytes())
            .update(&[0]);
    }
    hasher.finalize().to_hex().to_string()
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Lists and hashes every file under `dir`, sorted by relative path.
pub fn scan_dir(dir: &Path) -> std::io::Result<Vec<FileEntry>> {
    let mut entries = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(std::io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).map_err(std::io::Error::other)?;
        let meta = entry.metadata().map_err(std::io::Error::other)?;
        entries.push(FileEntry {
            path: rel.to_string_lossy().replace('\\', "/"),
            size: meta.len(),
            hash: hash_file(entry.path())?,
            mtime_ns: mtime_ns(&meta),
        });
    }
    Ok(entries)
}
