//! Cache keys: everything that can change a stage's result, hashed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schema::EntitySchema;

/// The version of watchfire, part of every key.
pub const WATCHFIRE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every field that can change what a stage produces. Its JSON form,
/// hashed with blake3, is the stage's cache key; `-vv` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyFields {
    pub kind: String,
    pub kind_version: u32,
    /// Params after interpolation, defaults filled in.
    pub params: Value,
    /// Input slot -> content hash of what is bound to it.
    pub inputs: BTreeMap<String, InputKey>,
    /// The recipe's entity schema, for kinds whose result depends on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<EntitySchema>,
    /// The recipe's global seed.
    pub seed: u64,
    pub watchfire_version: String,
}

/// The content an input slot saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "lowercase")]
pub enum InputKey {
    /// Another stage's artifact, or one file of it (`output`).
    Stage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        hash: String,
    },
    /// A project file or folder.
    File { path: String, hash: String },
}

impl InputKey {
    pub fn hash(&self) -> &str {
        match self {
            Self::Stage { hash, .. } | Self::File { hash, .. } => hash,
        }
    }
}

/// A blake3 digest naming a cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub blake3::Hash);

impl CacheKey {
    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }

    pub fn parse(hex: &str) -> Option<Self> {
        blake3::Hash::from_hex(hex).ok().map(Self)
    }

    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// `value` with the keys of every object in sorted order. Keys hash params
/// as JSON text, so the order must not depend on how a map was built: some
/// dependencies switch on serde_json's `preserve_order`, under which a map
/// keeps insertion (field declaration) order instead of sorting.
pub fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

impl KeyFields {
    pub fn key(&self) -> CacheKey {
        // Serializing plain data into a Vec cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        CacheKey(blake3::hash(&bytes))
    }

    /// The seed a stage's RNG starts from: the recipe seed mixed with the
    /// stage kind, so two kinds never draw the same stream.
    pub fn stage_seed(&self) -> u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.seed.to_le_bytes()).update(self.kind.as_bytes());
        let bytes = hasher.finalize();
        u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or_default())
    }

    /// Why `self` differs from the `old` fields of the same stage, one line
    /// per changed field, such as "param `count` 2 -> 4".
    pub fn changes_since(&self, old: &KeyFields) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind != old.kind || self.kind_version != old.kind_version {
            out.push(format!(
                "kind {} v{} -> {} v{}",
                old.kind, old.kind_version, self.kind, self.kind_version
            ));
        }
        diff_values("param", "", &old.params, &self.params, &mut out);
        for (slot, new) in &self.inputs {
            match (old.inputs.get(slot), new) {
                (None, _) => out.push(format!("input `{slot}` added")),
                (Some(old), new) if old == new => {}
                (Some(InputKey::File { path: was, hash: old }), InputKey::File { path, hash })
                    if old == hash =>
                {
                    out.push(format!("input `{slot}` moved from `{was}` to `{path}`"));
                }
                (Some(_), InputKey::File { path, .. }) => {
                    out.push(format!("file `{path}` changed"))
                }
                (Some(_), InputKey::Stage { .. }) => out.push(format!("input `{slot}` changed")),
            }
        }
        for slot in old.inputs.keys().filter(|slot| !self.inputs.contains_key(*slot)) {
            out.push(format!("input `{slot}` removed"));
        }
        if self.schema != old.schema {
            out.push("entity schema changed".to_string());
        }
        if self.seed != old.seed {
            out.push(format!("seed {} -> {}", old.seed, self.seed));
        }
        if self.watchfire_version != old.watchfire_version {
            out.push(format!("watchfire {} -> {}", old.watchfire_version, self.watchfire_version));
        }
        out
    }
}

fn diff_values(what: &str, path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                let null = Value::Null;
                diff_values(
                    what,
                    &child,
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{what} `{path}` {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_at_every_depth() {
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), json!(1));
        inner.insert("a".into(), json!([{"y": 1, "b": 2}]));
        let mut outer = serde_json::Map::new();
        outer.insert("m".into(), Value::Object(inner));
        outer.insert("c".into(), json!(0));
        let text = serde_json::to_string(&canonical(Value::Object(outer))).unwrap();
        assert_eq!(text, r#"{"c":0,"m":{"a":[{"b":2,"y":1}],"z":1}}"#);
    }

    fn fields() -> KeyFields {
        KeyFields {
            kind: "detail".into(),
            kind_version: 1,
            params: json!({"count": 2, "dp": {"epsilon": 1.0}}),
            inputs: BTreeMap::from([(
                "seed".to_string(),
                InputKey::File { path: "recipes/data/seed.jsonl".into(), hash: "aa".into() },
            )]),
            schema: None,
            seed: 7,
            watchfire_version: WATCHFIRE_VERSION.into(),
        }
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = fields();
        let mut other = fields();
        other.params["count"] = json!(4);
        assert_ne!(base.key(), other.key());
        let mut other = fields();
        other.seed = 8;
        assert_ne!(base.key(), other.key());
        let mut other = fields();
        other.kind_version = 2;
        assert_ne!(base.key(), other.key());
        assert_eq!(base.key(), fields().key());
    }

    #[test]
    fn changes_name_the_field() {
        let old = fields();
        let mut new = fields();
        new.params["count"] = json!(4);
        new.params["dp"]["epsilon"] = json!(2.0);
        new.inputs.insert(
            "seed".into(),
            InputKey::File { path: "recipes/data/seed.jsonl".into(), hash: "bb".into() },
        );
        assert_eq!(
            new.changes_since(&old),
            vec![
                "param `count` 2 -> 4",
                "param `dp.epsilon` 1.0 -> 2.0",
                "file `recipes/data/seed.jsonl` changed",
            ]
        );
    }
}
