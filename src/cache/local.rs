//! The local file-system store.
//!
//! Layout under the cache folder (`store-v1` is the format version):
//!
//! ```text
//! store-v1/artifacts/KEY/manifest.json   complete artifacts, one rename each
//! store-v1/artifacts/KEY/out/...         the stage's output files
//! store-v1/staging/KEY.PID.N/            stages at work; never read
//! store-v1/locks/KEY.lock                one advisory lock per key
//! store-v1/refs/RECIPE.json              last keys of each recipe's stages
//! store-v1/files.json                    hashes of input files by size and time
//! ```
//!
//! An artifact appears only by renaming a fully written staging folder, so a
//! process killed at any point leaves either a complete artifact or none.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::key::CacheKey;
use super::manifest::{Manifest, hash_entries, hash_file, mtime_ns, scan_dir};
use super::store::{Artifact, KeyLock, LockEvents, Lookup, RecipeRefs, Staging, Store, StoreError};

/// The cache format version, part of the folder name.
pub const FORMAT: &str = "store-v1";

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) the store inside `cache_dir`.
    pub fn open(cache_dir: &Path) -> Result<Self, StoreError> {
        let root = cache_dir.join(FORMAT);
        for sub in ["artifacts", "staging", "locks", "refs"] {
            fs_err::create_dir_all(root.join(sub))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn artifact_dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join("artifacts").join(key.to_hex())
    }

    fn refs_path(&self, recipe: &Path) -> PathBuf {
        let id = blake3::hash(recipe.to_string_lossy().as_bytes()).to_hex();
        self.root.join("refs").join(format!("{}.json", &id[..24]))
    }

    fn read_manifest(&self, dir: &Path) -> Result<Found, StoreError> {
        let path = dir.join("manifest.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
            Err(err) => return Err(fs_err_io(err, &path)),
        };
        Ok(serde_json::from_slice(&bytes)
            .map_or(Found::Unreadable, |m| Found::Manifest(Box::new(m))))
    }

    /// Moves an artifact out of `artifacts/` in one rename, then deletes it.
    /// Another process discarding it first is fine.
    fn discard(&self, dir: &Path) -> Result<(), StoreError> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let trash = self.root.join("staging").join(format!("trash.{}.{n}", std::process::id()));
        match std::fs::rename(dir, &trash) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(fs_err_io(err, dir)),
        }
        fs_err::remove_dir_all(&trash)?;
        Ok(())
    }

    /// Finds an artifact; a corrupt one is removed when `discard` is set.
    fn find(&self, key: &CacheKey, discard: bool) -> Result<Lookup, StoreError> {
        let dir = self.artifact_dir(key);
        let problem = match self.read_manifest(&dir)? {
            Found::Missing => return Ok(Lookup::Miss),
            Found::Unreadable => "manifest.json".to_string(),
            Found::Manifest(manifest) => match self.check_files(&dir, &manifest)? {
                Some(file) => file,
                None => {
                    let artifact =
                        Artifact { key: *key, dir: dir.join("out"), manifest: *manifest };
                    return Ok(Lookup::Hit(Box::new(artifact)));
                }
            },
        };
        if discard {
            self.discard(&dir)?;
        }
        Ok(Lookup::Corrupt { key: *key, file: problem })
    }

    /// Checks files by size and time; hashes those that changed.
    fn check_files(&self, dir: &Path, manifest: &Manifest) -> Result<Option<String>, StoreError> {
        let out = dir.join("out");
        for entry in &manifest.files {
            let path = out.join(&entry.path);
            let Ok(meta) = std::fs::metadata(&path) else {
                return Ok(Some(entry.path.clone()));
            };
            if meta.len() == entry.size && mtime_ns(&meta) == entry.mtime_ns {
                continue;
            }
            if meta.len() != entry.size || hash_file(&path)? != entry.hash {
                return Ok(Some(entry.path.clone()));
            }
        }
        Ok(None)
    }
}

fn fs_err_io(err: std::io::Error, path: &Path) -> StoreError {
    StoreError::Io(std::io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}

struct FileLock {
    file: File,
}

impl KeyLock for FileLock {}

impl Drop for FileLock {
    fn drop(&mut self) {
        // An empty lock file means "released cleanly"; a pid left in it means
        // its owner died holding it.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// Whether a process with this id is running (on this machine).
fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Store for LocalStore {
    fn lookup(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        self.find(key, true)
    }

    fn peek(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        self.find(key, false)
    }

    fn lock(
        &self,
        key: &CacheKey,
        events: &dyn LockEvents,
    ) -> Result<Box<dyn KeyLock>, StoreError> {
        let path = self.root.join("locks").join(format!("{}.lock", key.to_hex()));
        let mut file = fs_err::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?
            .into_parts()
            .0;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                events.waiting(key);
                file.lock().map_err(|err| fs_err_io(err, &path))?;
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(fs_err_io(err, &path)),
        }
        let mut previous = String::new();
        file.read_to_string(&mut previous).map_err(|err| fs_err_io(err, &path))?;
        if let Ok(pid) = previous.trim().parse::<u32>()
            && pid != std::process::id()
            && !process_alive(pid)
        {
            events.broke_stale(key, pid);
        }
        // Whatever a dead owner left in staging for this key is garbage now.
        let prefix = format!("{}.", key.to_hex());
        for entry in fs_err::read_dir(self.root.join("staging"))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        file.set_len(0).map_err(|err| fs_err_io(err, &path))?;
        file.rewind().map_err(|err| fs_err_io(err, &path))?;
        write!(file, "{}", std::process::id()).map_err(|err| fs_err_io(err, &path))?;
        file.sync_all().map_err(|err| fs_err_io(err, &path))?;
        Ok(Box::new(FileLock { file }))
    }

    fn begin(&self, key: &CacheKey, transient: bool) -> Result<Staging, StoreError> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Builders of a key hold its lock and clear `KEY.*` leftovers; a
        // transient stage holds no lock, so its folder has another prefix.
        let prefix = if transient { "transient." } else { "" };
        let name = format!("{prefix}{}.{}.{n}", key.to_hex(), std::process::id());
        let root = self.root.join("staging").join(name);
        let out_dir = root.join("out");
        fs_err::create_dir_all(&out_dir)?;
        Ok(Staging { key: *key, root, out_dir })
    }

    fn commit(&self, staging: Staging, mut manifest: Manifest) -> Result<Artifact, StoreError> {
        let files = scan_dir(&staging.out_dir)?;
        for entry in &files {
            File::open(staging.out_dir.join(&entry.path))?.sync_all()?;
        }
        manifest.output_hash = hash_entries(&files);
        manifest.files = files;
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|source| StoreError::Manifest { path: staging.root.clone(), source })?;
        let manifest_path = staging.root.join("manifest.json");
        let mut file = fs_err::File::create(&manifest_path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        File::open(&staging.out_dir)?.sync_all()?;

        let dest = self.artifact_dir(&staging.key);
        if dest.exists() {
            self.discard(&dest)?;
        }
        fs_err::rename(&staging.root, &dest)?;
        File::open(self.root.join("artifacts"))?.sync_all()?;
        let checkpoints = self.checkpoints(&staging.key);
        if checkpoints.exists() {
            let _ = fs_err::remove_dir_all(&checkpoints);
        }
        Ok(Artifact { key: staging.key, dir: dest.join("out"), manifest })
    }

    fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for key in self.keys()? {
            if let Found::Manifest(manifest) = self.read_manifest(&self.artifact_dir(&key))? {
                out.push(*manifest);
            }
        }
        out.sort_by(|a, b| a.stage.cmp(&b.stage).then(a.key.cmp(&b.key)));
        Ok(out)
    }

    fn keys(&self) -> Result<Vec<CacheKey>, StoreError> {
        let mut keys = Vec::new();
        for entry in fs_err::read_dir(self.root.join("artifacts"))? {
            if let Some(key) = entry?.file_name().to_str().and_then(CacheKey::parse) {
                keys.push(key);
            }
        }
        keys.sort_by_key(CacheKey::to_hex);
        Ok(keys)
    }

    fn remove(&self, key: &CacheKey) -> Result<u64, StoreError> {
        let dir = self.artifact_dir(key);
        let size = folder_size(&dir);
        if dir.exists() {
            self.discard(&dir)?;
        }
        Ok(size)
    }

    fn verify(&self, key: &CacheKey) -> Result<Option<String>, StoreError> {
        let dir = self.artifact_dir(key);
        let Found::Manifest(manifest) = self.read_manifest(&dir)? else {
            return Ok(Some("manifest.json".to_string()));
        };
        let found = scan_dir(&dir.join("out"))?;
        for entry in &manifest.files {
            match found.iter().find(|f| f.path == entry.path) {
                Some(f) if f.hash == entry.hash => {}
                _ => return Ok(Some(entry.path.clone())),
            }
        }
        Ok(found.iter().find(|f| manifest.file(&f.path).is_none()).map(|f| f.path.clone()))
    }

    fn refs(&self, recipe: &Path) -> Result<RecipeRefs, StoreError> {
        let path = self.refs_path(recipe);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::Manifest { path, source }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Ok(RecipeRefs { recipe: recipe.display().to_string(), ..RecipeRefs::default() })
            }
            Err(err) => Err(fs_err_io(err, &path)),
        }
    }

    fn save_refs(&self, recipe: &Path, refs: &RecipeRefs) -> Result<(), StoreError> {
        let path = self.refs_path(recipe);
        let bytes = serde_json::to_vec_pretty(refs)
            .map_err(|source| StoreError::Manifest { path: path.clone(), source })?;
        write_atomic(&path, &bytes)?;
        Ok(())
    }

    fn clean_staging(&self) -> Result<u64, StoreError> {
        let mut freed = 0;
        for entry in fs_err::read_dir(self.root.join("staging"))? {
            let path = entry?.path();
            let owner = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.split('.').nth(1))
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(process_alive) {
                continue;
            }
            freed += folder_size(&path);
            let _ = fs_err::remove_dir_all(&path);
        }
        Ok(freed)
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn file_memo(&self) -> PathBuf {
        self.root.join("files.json")
    }

    fn checkpoints(&self, key: &CacheKey) -> PathBuf {
        self.root.join("checkpoints").join(key.to_hex())
    }
}

/// What is in an artifact's `manifest.json`.
enum Found {
    Missing,
    Unreadable,
    Manifest(Box<Manifest>),
}

/// Bytes of the files under `dir`.
fn folder_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Writes a file by writing a sibling temp file and renaming it over.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|err| err.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::{KeyFields, WATCHFIRE_VERSION};
    use std::cell::Cell;

    struct Events {
        stale: Cell<Option<u32>>,
    }

    impl LockEvents for Events {
        fn waiting(&self, _key: &CacheKey) {}
        fn broke_stale(&self, _key: &CacheKey, pid: u32) {
            self.stale.set(Some(pid));
        }
    }

    fn manifest(key: &CacheKey) -> Manifest {
        Manifest {
            key: key.to_hex(),
            stage: "demo".into(),
            fields: KeyFields {
                kind: "demo".into(),
                kind_version: 1,
                params: serde_json::json!({}),
                inputs: Default::default(),
                schema: None,
                seed: 0,
                watchfire_version: WATCHFIRE_VERSION.into(),
            },
            output_hash: String::new(),
            files: Vec::new(),
            started_at: 0,
            duration_ms: 0,
            watchfire_version: WATCHFIRE_VERSION.into(),
        }
    }

    fn store_with_artifact() -> (tempfile::TempDir, LocalStore, CacheKey) {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let key = CacheKey(blake3::hash(b"k"));
        let staging = store.begin(&key, false).unwrap();
        std::fs::write(staging.out_dir.join("a.txt"), "hello").unwrap();
        store.commit(staging, manifest(&key)).unwrap();
        (tmp, store, key)
    }

    #[test]
    fn committed_artifacts_are_found() {
        let (_tmp, store, key) = store_with_artifact();
        let Lookup::Hit(artifact) = store.lookup(&key).unwrap() else { panic!("expected a hit") };
        assert_eq!(artifact.manifest.files.len(), 1);
        assert_eq!(std::fs::read_to_string(artifact.dir.join("a.txt")).unwrap(), "hello");
        assert_eq!(store.verify(&key).unwrap(), None);
    }

    #[test]
    fn tampered_artifacts_are_detected_and_removed() {
        let (_tmp, store, key) = store_with_artifact();
        let Lookup::Hit(artifact) = store.lookup(&key).unwrap() else { panic!("expected a hit") };
        std::fs::write(artifact.dir.join("a.txt"), "HELLO").unwrap();
        assert_eq!(store.verify(&key).unwrap(), Some("a.txt".to_string()));
        match store.lookup(&key).unwrap() {
            Lookup::Corrupt { file, .. } => assert_eq!(file, "a.txt"),
            other => panic!("expected corruption, got {other:?}"),
        }
        assert!(matches!(store.lookup(&key).unwrap(), Lookup::Miss));
    }

    #[test]
    fn uncommitted_staging_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let key = CacheKey(blake3::hash(b"k"));
        let staging = store.begin(&key, false).unwrap();
        std::fs::write(staging.out_dir.join("a.txt"), "partial").unwrap();
        drop(staging);
        assert!(matches!(store.lookup(&key).unwrap(), Lookup::Miss));
        assert_eq!(std::fs::read_dir(store.root().join("staging")).unwrap().count(), 0);
    }

    #[test]
    fn a_dead_owner_lock_is_reported_as_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let key = CacheKey(blake3::hash(b"k"));
        // A pid that cannot be running: above the kernel's pid_max.
        let dead = 4_194_304 + 17;
        std::fs::write(store.root().join("locks").join(format!("{key}.lock")), dead.to_string())
            .unwrap();
        let events = Events { stale: Cell::new(None) };
        let lock = store.lock(&key, &events).unwrap();
        assert_eq!(events.stale.get(), Some(dead));
        drop(lock);
        let events = Events { stale: Cell::new(None) };
        let _lock = store.lock(&key, &events).unwrap();
        assert_eq!(events.stale.get(), None);
    }
}
