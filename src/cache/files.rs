//! Content hashes of input files, remembered by size and modification time
//! so that an unchanged file is not read again on the next run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::manifest::{FileEntry, hash_entries, hash_file, mtime_ns};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Memo {
    size: u64,
    mtime_ns: i128,
    hash: String,
}

/// A memo of file hashes, kept in the store's `files.json`.
pub struct FileHashes {
    path: PathBuf,
    memo: Mutex<(BTreeMap<String, Memo>, bool)>,
    /// Paths a folder's hash leaves out: the cache itself and the recipe's
    /// lock, which change on every run.
    exclude: Vec<PathBuf>,
}

/// A file modified this recently may still change within the same clock
/// tick, so its hash is not remembered (git does the same).
const RACY_NS: i128 = 2_000_000_000;

impl FileHashes {
    /// Loads the memo at `path`; a missing or unreadable memo starts empty.
    pub fn load(path: PathBuf) -> Self {
        Self::with_exclusions(path, Vec::new())
    }

    /// Like [`load`](Self::load), leaving `exclude` out of folder hashes.
    pub fn with_exclusions(path: PathBuf, exclude: Vec<PathBuf>) -> Self {
        let memo = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let exclude = exclude.into_iter().map(|p| p.canonicalize().unwrap_or(p)).collect();
        Self { path, memo: Mutex::new((memo, false)), exclude }
    }

    /// The content hash of a file, or of a folder's files and their paths.
    pub fn hash(&self, path: &Path) -> std::io::Result<String> {
        let meta = fs_err::metadata(path)?;
        if meta.is_file() {
            return self.hash_file(path, &meta);
        }
        let mut entries = Vec::new();
        // Links are followed: a stage reading the folder reads their targets.
        let walk = walkdir::WalkDir::new(path).sort_by_file_name().follow_links(true);
        let walk = walk.into_iter().filter_entry(|e| !self.exclude.iter().any(|x| e.path() == x));
        for entry in walk {
            let entry = entry.map_err(std::io::Error::other)?;
            if !entry.file_type().is_file() {
                continue;
            }
            let meta = entry.metadata().map_err(std::io::Error::other)?;
            let rel = entry.path().strip_prefix(path).map_err(std::io::Error::other)?;
            entries.push(FileEntry {
                path: rel.to_string_lossy().replace('\\', "/"),
                size: meta.len(),
                hash: self.hash_file(entry.path(), &meta)?,
                mtime_ns: 0,
            });
        }
        Ok(hash_entries(&entries))
    }

    fn hash_file(&self, path: &Path, meta: &std::fs::Metadata) -> std::io::Result<String> {
        let name = path.to_string_lossy().to_string();
        let (size, mtime) = (meta.len(), mtime_ns(meta));
        if let Some(memo) = self.lock().0.get(&name)
            && memo.size == size
            && memo.mtime_ns == mtime
        {
            return Ok(memo.hash.clone());
        }
        let hash = hash_file(path)?;
        let now = mtime_ns_now();
        if now - mtime > RACY_NS {
            let mut guard = self.lock();
            guard.0.insert(name, Memo { size, mtime_ns: mtime, hash: hash.clone() });
            guard.1 = true;
        }
        Ok(hash)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeMap<String, Memo>, bool)> {
        self.memo.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the memo back if it learnt anything.
    pub fn save(&self) -> std::io::Result<()> {
        let guard = self.lock();
        if !guard.1 {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&guard.0).map_err(std::io::Error::other)?;
        super::local::write_atomic(&self.path, &bytes)
    }
}

fn mtime_ns_now() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(i128::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_hash_follows_content_and_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), "1").unwrap();
        let hashes = FileHashes::load(tmp.path().join("memo.json"));
        let first = hashes.hash(&dir).unwrap();
        std::fs::write(dir.join("b"), "2").unwrap();
        let second = hashes.hash(&dir).unwrap();
        assert_ne!(first, second);
        std::fs::remove_file(dir.join("b")).unwrap();
        assert_eq!(hashes.hash(&dir).unwrap(), first);
        hashes.save().unwrap();
        let reloaded = FileHashes::load(tmp.path().join("memo.json"));
        assert_eq!(reloaded.hash(&dir).unwrap(), first);
    }
}
