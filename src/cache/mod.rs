//! The artifact cache: keys, manifests and stores.

mod files;
mod key;
mod local;
mod manifest;
mod store;

pub use files::FileHashes;
pub use key::{CacheKey, InputKey, KeyFields, WATCHFIRE_VERSION, canonical};
pub use local::{FORMAT, LocalStore, write_atomic};
pub use manifest::{FileEntry, Manifest, hash_entries, hash_file, scan_dir};
pub use store::{
    Artifact, KeyLock, LockEvents, Lookup, RecipeRefs, RefEntry, Staging, Store, StoreError,
};
