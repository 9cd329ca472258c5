//! Lock files: a versioned record of what a recipe produced.
//!
//! `watchfire run` writes `NAME.lock` beside `NAME.yaml`: for every stage
//! instance its kind, resolved params, input hashes, cache key and output
//! hashes, in a stable order, so that a diff of the lock in code review
//! shows exactly which stages changed and how. `watchfire verify` rebuilds
//! stages from scratch and compares their outputs with the lock; `plan
//! --locked` fails when the recipe or its inputs no longer match it; `run
//! --frozen` refuses to run a stage whose key it does not list.
//!
//! Stages that are not deterministic on purpose (none on the CPU today) are
//! marked `deterministic: false`; verify compares their recorded metrics
//! within [`METRIC_TOLERANCE`] instead of their bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::{Artifact, CacheKey, InputKey, KeyFields, Manifest, WATCHFIRE_VERSION};
use crate::recipe::Recipe;
use crate::schema::EntitySchema;

/// The lock format version.
pub const LOCK_VERSION: u32 = 1;

/// Relative tolerance for the metrics of non-deterministic stages.
pub const METRIC_TOLERANCE: f64 = 0.02;

/// A recipe's lock file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub version: u32,
    /// The watchfire version that wrote it (part of every key).
    pub watchfire: String,
    pub recipe: String,
    pub seed: u64,
    /// Model sources and their pinned hashes, for recipes that fetch models.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
    /// Stage instance -> what it produced, in the recipe's run order.
    pub stages: IndexMap<String, LockEntry>,
}

/// One stage instance in the lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    pub kind: String,
    pub kind_version: u32,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub deterministic: bool,
    pub params: Value,
    pub inputs: BTreeMap<String, InputKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<EntitySchema>,
    pub key: String,
    /// The artifact's combined hash.
    pub output: String,
    /// File -> blake3, so a difference names its first differing file.
    pub files: BTreeMap<String, String>,
    /// Recorded metrics of non-deterministic stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Value>,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl LockEntry {
    pub fn new(fields: &KeyFields, artifact: &Artifact, deterministic: bool) -> Self {
        let manifest = &artifact.manifest;
        let metrics = (!deterministic).then(|| read_metrics(&artifact.dir)).flatten();
        Self {
            kind: fields.kind.clone(),
            kind_version: fields.kind_version,
            deterministic,
            params: fields.params.clone(),
            inputs: fields.inputs.clone(),
            schema: fields.schema.clone(),
            key: fields.key().to_hex(),
            output: manifest.output_hash.clone(),
            files: manifest.files.iter().map(|f| (f.path.clone(), f.hash.clone())).collect(),
            metrics,
        }
    }

    /// The key fields this entry was locked with.
    pub fn fields(&self, lock: &LockFile) -> KeyFields {
        KeyFields {
            kind: self.kind.clone(),
            kind_version: self.kind_version,
            // A lock written by hand or under another serde_json map order
            // still gives the key the recipe's resolved params give.
            params: crate::cache::canonical(self.params.clone()),
            inputs: self.inputs.clone(),
            schema: self.schema.clone(),
            seed: lock.seed,
            watchfire_version: lock.watchfire.clone(),
        }
    }

    /// Stands in for the artifact when computing dependents' keys, so a
    /// lock can be checked with an empty cache.
    pub fn as_artifact(&self, fields: KeyFields) -> Artifact {
        let files = self
            .files
            .iter()
            .map(|(path, hash)| crate::cache::FileEntry {
                path: path.clone(),
                size: 0,
                hash: hash.clone(),
                mtime_ns: 0,
            })
            .collect();
        Artifact {
            key: CacheKey::parse(&self.key).unwrap_or(fields.key()),
            dir: PathBuf::new(),
            manifest: Manifest {
                key: self.key.clone(),
                stage: String::new(),
                fields,
                output_hash: self.output.clone(),
                files,
                started_at: 0,
                duration_ms: 0,
                watchfire_version: WATCHFIRE_VERSION.to_string(),
            },
        }
    }
}

/// `metrics.json` of an artifact, when it has one.
fn read_metrics(dir: &Path) -> Option<Value> {
    let bytes = std::fs::read(dir.join("metrics.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl LockFile {
    pub fn new(recipe: &Recipe) -> Self {
        Self {
            version: LOCK_VERSION,
            watchfire: WATCHFIRE_VERSION.to_string(),
            recipe: recipe.name.clone(),
            seed: recipe.seed,
            models: BTreeMap::new(),
            stages: IndexMap::new(),
        }
    }

    /// `recipes/NAME.yaml` -> `recipes/NAME.lock`.
    pub fn path_for(recipe: &Path) -> PathBuf {
        recipe.with_extension("lock")
    }

    pub fn read(path: &Path) -> Result<Option<Self>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml::from_str(&text)
                .map(Some)
                .map_err(|err| format!("{}: {err}", path.display())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(format!("{}: {err}", path.display())),
        }
    }

    pub fn to_text(&self) -> String {
        let body = serde_yaml::to_string(self).unwrap_or_default();
        format!(
            "# Written by `watchfire run`; commit it. `watchfire verify` rebuilds the\n\
             # stages and checks their outputs against it.\n{body}"
        )
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::cache::write_atomic(path, self.to_text().as_bytes())
    }

    /// Whether the lock lists `key` for stage `name`.
    pub fn has_key(&self, name: &str, key: &CacheKey) -> bool {
        self.stages.get(name).is_some_and(|entry| entry.key == key.to_hex())
    }
}

/// How a rebuilt stage compares with its lock entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Match,
    /// Output bytes differ; the first file that differs.
    Differs {
        file: String,
    },
    /// Non-deterministic stage whose metrics moved more than the tolerance.
    MetricsDiffer {
        metric: String,
        locked: f64,
        found: f64,
    },
    /// Not in the lock.
    Missing,
}

/// Compares a rebuilt artifact with the locked entry.
pub fn compare(entry: Option<&LockEntry>, artifact: &Artifact) -> Verdict {
    let Some(entry) = entry else { return Verdict::Missing };
    if !entry.deterministic {
        let found = read_metrics(&artifact.dir).unwrap_or(Value::Null);
        let locked = entry.metrics.clone().unwrap_or(Value::Null);
        return match metric_difference("", &locked, &found, METRIC_TOLERANCE) {
            Some((metric, locked, found)) => Verdict::MetricsDiffer { metric, locked, found },
            None => Verdict::Match,
        };
    }
    if entry.output == artifact.manifest.output_hash {
        return Verdict::Match;
    }
    let found: BTreeMap<&str, &str> =
        artifact.manifest.files.iter().map(|f| (f.path.as_str(), f.hash.as_str())).collect();
    let names: std::collections::BTreeSet<&str> =
        entry.files.keys().map(String::as_str).chain(found.keys().copied()).collect();
    let file = names
        .into_iter()
        .find(|name| entry.files.get(*name).map(String::as_str) != found.get(name).copied())
        .unwrap_or("?")
        .to_string();
    Verdict::Differs { file }
}

/// The first numeric leaf whose relative difference exceeds `tolerance`.
pub fn metric_difference(
    path: &str,
    locked: &Value,
    found: &Value,
    tolerance: f64,
) -> Option<(String, f64, f64)> {
    match (locked, found) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(key, value)| {
            let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            metric_difference(&child, value, b.get(key).unwrap_or(&Value::Null), tolerance)
        }),
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            let scale = a.abs().max(b.abs()).max(1e-12);
            ((a - b).abs() / scale > tolerance).then(|| (path.to_string(), a, b))
        }
        (Value::Number(a), _) => Some((path.to_string(), a.as_f64().unwrap_or(f64::NAN), f64::NAN)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metrics_within_tolerance_match() {
        let locked = json!({"loss": 1.0, "eval": {"f1": 0.5}});
        assert_eq!(
            metric_difference("", &locked, &json!({"loss": 1.01, "eval": {"f1": 0.505}}), 0.02),
            None
        );
        let far = metric_difference("", &locked, &json!({"loss": 1.0, "eval": {"f1": 0.6}}), 0.02);
        assert_eq!(far, Some(("eval.f1".to_string(), 0.5, 0.6)));
        assert!(metric_difference("", &locked, &json!({}), 0.02).is_some());
    }
}
