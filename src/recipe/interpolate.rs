//! `${params.NAME}` interpolation, applied before anything is hashed.
//!
//! A string that is exactly one reference takes the param's value with its
//! type (`count: ${params.n}` stays a number); a reference inside a longer
//! string is replaced by the value's text.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use serde_json::Value;

/// A reference that names nothing, with its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownReference {
    pub reference: String,
}

/// Resolves references against `params`; records every param it reads.
pub struct Interpolator<'a> {
    pub params: &'a IndexMap<String, Value>,
    pub used: BTreeSet<String>,
}

impl<'a> Interpolator<'a> {
    pub fn new(params: &'a IndexMap<String, Value>) -> Self {
        Self { params, used: BTreeSet::new() }
    }

    /// Interpolates every string inside `value`, recursively. On error,
    /// returns the path below `value` of the bad string too.
    pub fn value(&mut self, value: &Value) -> Result<Value, (Vec<String>, UnknownReference)> {
        match value {
            Value::String(text) => self.string(text).map_err(|err| (Vec::new(), err)),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.value(item).map_err(|(p, e)| (prepend(i.to_string(), p), e)))
                .collect::<Result<_, _>>()
                .map(Value::Array),
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (key, item) in map {
                    let item = self.value(item).map_err(|(p, e)| (prepend(key.clone(), p), e))?;
                    out.insert(key.clone(), item);
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    /// Interpolates one string.
    pub fn string(&mut self, text: &str) -> Result<Value, UnknownReference> {
        if !text.contains("${") {
            return Ok(Value::String(text.to_string()));
        }
        let trimmed = text.trim();
        if let Some(inner) = whole_reference(trimmed) {
            return self.lookup(inner).cloned();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(UnknownReference { reference: rest[start..].to_string() });
            };
            match self.lookup(&after[..end])? {
                Value::String(s) => out.push_str(s),
                other => out.push_str(&other.to_string()),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Value::String(out))
    }

    fn lookup(&mut self, inner: &str) -> Result<&'a Value, UnknownReference> {
        let unknown = || UnknownReference { reference: format!("${{{inner}}}") };
        let name = inner.trim().strip_prefix("params.").ok_or_else(unknown)?;
        let value = self.params.get(name).ok_or_else(unknown)?;
        self.used.insert(name.to_string());
        Ok(value)
    }
}

/// The inside of `${...}` when `text` is exactly one reference.
fn whole_reference(text: &str) -> Option<&str> {
    let inner = text.strip_prefix("${")?.strip_suffix('}')?;
    (!inner.contains('}') && !inner.contains("${")).then_some(inner)
}

fn prepend(head: String, mut tail: Vec<String>) -> Vec<String> {
    tail.insert(0, head);
    tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params() -> IndexMap<String, Value> {
        IndexMap::from([("n".to_string(), json!(4)), ("name".to_string(), json!("fire"))])
    }

    #[test]
    fn whole_reference_keeps_type() {
        let params = params();
        let mut interp = Interpolator::new(&params);
        assert_eq!(interp.string("${params.n}").unwrap(), json!(4));
        assert_eq!(interp.used.iter().collect::<Vec<_>>(), vec!["n"]);
    }

    #[test]
    fn embedded_reference_becomes_text() {
        let params = params();
        let mut interp = Interpolator::new(&params);
        let out = interp.string("scene-${params.name}-${params.n}").unwrap();
        assert_eq!(out, json!("scene-fire-4"));
    }

    #[test]
    fn unknown_names_are_errors() {
        let params = params();
        let mut interp = Interpolator::new(&params);
        let err = interp.value(&json!({"a": ["x", "${params.m}"]})).unwrap_err();
        assert_eq!(err.0, vec!["a", "1"]);
        assert_eq!(err.1.reference, "${params.m}");
        assert!(interp.string("${env.HOME}").is_err());
        assert!(interp.string("${params.n").is_err());
    }
}
