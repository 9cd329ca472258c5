//! The store interface the scheduler talks to. [`LocalStore`] keeps
//! artifacts on the local file system; it is the only store today. A shared
//! (S3-compatible) store would implement the same trait: lookup, a lock per
//! key, staging, and a commit that makes an artifact appear at once.
//!
//! [`LocalStore`]: super::LocalStore

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::key::{CacheKey, KeyFields};
use super::manifest::Manifest;

/// Errors of the store, each naming the path or key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("bad manifest {path}: {source}")]
    Manifest { path: PathBuf, source: serde_json::Error },
}

/// A stored, verified artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub key: CacheKey,
    /// The folder holding the stage's output files.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What [`Store::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Box<Artifact>),
    Miss,
    /// The artifact existed but its content no longer matched its manifest;
    /// it has been removed and must be rebuilt.
    Corrupt {
        key: CacheKey,
        file: String,
    },
}

/// A stage's scratch folder while it runs; dropped without commit, it is
/// removed.
pub struct Staging {
    pub key: CacheKey,
    pub root: PathBuf,
    /// Where the stage writes its outputs.
    pub out_dir: PathBuf,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.root.exists() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Held while a key is being built; other processes wait on it.
pub trait KeyLock: Send {}

/// The last keys a recipe's instances had, for `plan` to explain changes
/// and for `cache gc` to keep.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecipeRefs {
    pub recipe: String,
    pub instances: BTreeMap<String, RefEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefEntry {
    pub key: String,
    pub fields: KeyFields,
}

/// A content-addressed artifact store.
pub trait Store: Send + Sync {
    /// Finds a complete artifact and checks its files against the manifest
    /// (cheaply: by size and time, hashing only files that changed).
    fn lookup(&self, key: &CacheKey) -> Result<Lookup, StoreError>;
    /// Like `lookup`, but leaves a corrupt artifact where it is: for
    /// commands that only look (`plan`, `show`, `cache gc`).
    fn peek(&self, key: &CacheKey) -> Result<Lookup, StoreError>;
    /// Blocks until this process owns `key`. `on_wait` is called once if it
    /// has to wait, `on_stale` if a dead process's lock was broken.
    fn lock(&self, key: &CacheKey, events: &dyn LockEvents)
    -> Result<Box<dyn KeyLock>, StoreError>;
    /// A fresh, empty folder for a stage to write into. `transient` for
    /// `cache: false` stages, whose outputs are never committed.
    fn begin(&self, key: &CacheKey, transient: bool) -> Result<Staging, StoreError>;
    /// Hashes the staged files, writes the manifest and moves the artifact
    /// into place in one rename.
    fn commit(&self, staging: Staging, manifest: Manifest) -> Result<Artifact, StoreError>;
    /// Every stored manifest that can be read.
    fn list(&self) -> Result<Vec<Manifest>, StoreError>;
    /// The key of every stored artifact, readable or not.
    fn keys(&self) -> Result<Vec<CacheKey>, StoreError>;
    /// Removes an artifact; returns the bytes freed.
    fn remove(&self, key: &CacheKey) -> Result<u64, StoreError>;
    /// Rehashes every file of an artifact; returns the first that differs.
    fn verify(&self, key: &CacheKey) -> Result<Option<String>, StoreError>;
    fn refs(&self, recipe: &Path) -> Result<RecipeRefs, StoreError>;
    fn save_refs(&self, recipe: &Path, refs: &RecipeRefs) -> Result<(), StoreError>;
    /// Removes staging folders left by killed runs; returns bytes freed.
    fn clean_staging(&self) -> Result<u64, StoreError>;
    /// Where the store lives, for messages.
    fn location(&self) -> String;
    /// The local file that remembers input-file hashes between runs.
    fn file_memo(&self) -> PathBuf;
    /// A folder for `key`'s checkpoints that outlives a failed or killed
    /// run, so the next run of the same key resumes; committing the key
    /// removes it. Not created until a stage writes to it.
    fn checkpoints(&self, key: &CacheKey) -> PathBuf;
}

/// Callbacks for lock contention, so the CLI can say what is happening.
pub trait LockEvents {
    fn waiting(&self, key: &CacheKey);
    fn broke_stale(&self, key: &CacheKey, pid: u32);
}
