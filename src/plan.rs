//! `watchfire plan`: what a run would do, and why, without running anything.

use crate::cache::{Artifact, CacheKey, KeyFields, Lookup, Store, StoreError};
use crate::lock::LockFile;
use crate::recipe::Recipe;
use crate::scheduler::{file_hashes, key_fields};

/// What would happen to one stage instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Its key is in the cache.
    Cached,
    /// It would run; each reason names a changed key field.
    Run(Vec<String>),
    /// Its key depends on a stage that would run first.
    Waits(String),
}

/// How an instance compares with the recipe's lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    Matches,
    /// The key differs from the locked one; why, field by field.
    Stale(Vec<String>),
    NotInLock,
    /// Its key cannot be known because a dependency is stale.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct PlanEntry {
    pub name: String,
    pub kind: String,
    pub decision: Decision,
    /// Known when every input is known.
    pub key: Option<CacheKey>,
    pub fields: Option<KeyFields>,
    /// Set when planning against a lock file.
    pub lock: Option<LockState>,
}

/// Plans every instance of `recipe` against `store`.
pub fn plan(recipe: &Recipe, store: &dyn Store) -> Result<Vec<PlanEntry>, StoreError> {
    plan_locked(recipe, store, None)
}

/// Plans against `store` and compares every key with `lock`. Outputs the
/// lock records stand in for missing artifacts, so a lock can be checked
/// with an empty cache.
pub fn plan_locked(
    recipe: &Recipe,
    store: &dyn Store,
    lock: Option<&LockFile>,
) -> Result<Vec<PlanEntry>, StoreError> {
    let files = file_hashes(recipe, store);
    let refs = store.refs(&recipe.path)?;
    let mut known: Vec<Option<Artifact>> = vec![None; recipe.instances.len()];
    let mut out = Vec::with_capacity(recipe.instances.len());
    for (index, instance) in recipe.instances.iter().enumerate() {
        let kind = instance.kind.kind().to_string();
        let pending = instance.deps.iter().find(|&&d| known[d].is_none());
        if let Some(&dep) = pending {
            let waits = Decision::Waits(recipe.instances[dep].name.clone());
            out.push(PlanEntry {
                name: instance.name.clone(),
                kind,
                decision: waits,
                key: None,
                fields: None,
                lock: lock.map(|_| LockState::Unknown),
            });
            continue;
        }
        let (fields, _) = key_fields(recipe, instance, &known, &files)
            .map_err(|err| StoreError::Io(std::io::Error::other(err)))?;
        let key = fields.key();
        let decision = match (instance.cache, store.peek(&key)?) {
            (true, Lookup::Hit(artifact)) => {
                known[index] = Some(*artifact);
                Decision::Cached
            }
            (true, Lookup::Corrupt { file, .. }) => {
                Decision::Run(vec![format!("artifact corrupt (`{file}` changed); rebuilding")])
            }
            (false, _) => Decision::Run(vec!["not cached (`cache: false`)".to_string()]),
            (true, Lookup::Miss) => Decision::Run(match refs.instances.get(&instance.name) {
                None => vec!["first run".to_string()],
                Some(old) if old.key == key.to_hex() => {
                    vec!["artifact missing from the cache".to_string()]
                }
                Some(old) => {
                    let changes = fields.changes_since(&old.fields);
                    if changes.is_empty() { vec!["key changed".to_string()] } else { changes }
                }
            }),
        };
        let lock_state = lock.map(|lock| match lock.stages.get(&instance.name) {
            None => LockState::NotInLock,
            Some(entry) if entry.key == key.to_hex() => {
                if known[index].is_none() {
                    known[index] = Some(entry.as_artifact(fields.clone()));
                }
                LockState::Matches
            }
            Some(entry) => LockState::Stale(fields.changes_since(&entry.fields(lock))),
        });
        out.push(PlanEntry {
            name: instance.name.clone(),
            kind,
            decision,
            key: Some(key),
            fields: Some(fields),
            lock: lock_state,
        });
    }
    files.save().map_err(StoreError::Io)?;
    Ok(out)
}
