//! watchfire's own seed format, one report per line:
//! `{"id"?, "text", "scene", "entities": [{"type", "start", "end", "value"?}], "attributes"?}`
//! with character offsets, end exclusive. Every span is checked; the first
//! bad one stops the stage with its file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use crate::corpus::{CharIndex, Entity, Record, read_lines};
use crate::schema::EntitySchema;
use crate::stage::StageError;
use crate::synth::seed::SeedStats;

#[derive(Deserialize)]
struct Line {
    id: Option<String>,
    text: String,
    scene: String,
    #[serde(default)]
    entities: Vec<LineEntity>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct LineEntity {
    #[serde(rename = "type")]
    kind: String,
    start: usize,
    end: usize,
    value: Option<String>,
}

/// Reads one file, appending to `records`, until `limit` records are held.
pub fn read(
    path: &Path,
    schema: &EntitySchema,
    records: &mut Vec<Record>,
    ids: &mut BTreeSet<String>,
    stats: &mut SeedStats,
    limit: usize,
) -> Result<(), StageError> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    for (number, line) in read_lines(path)? {
        if records.len() >= limit {
            break;
        }
        let fail = |message: String| StageError::data(path, Some(number), message);
        let parsed: Line = serde_json::from_str(&line).map_err(|e| fail(e.to_string()))?;
        let id = parsed.id.clone().unwrap_or_else(|| format!("{stem}-{number}"));
        if !ids.insert(id.clone()) {
            return Err(fail(format!("id `{id}` is used by an earlier report")));
        }
        if parsed.scene.trim().is_empty() {
            return Err(fail("`scene` is empty".to_string()));
        }
        let entities = check_entities(&parsed, schema).map_err(fail)?;
        stats.read += 1;
        records.push(Record {
            id,
            text: parsed.text,
            scene: parsed.scene,
            entities,
            attributes: parsed.attributes,
            synthetic: false,
            provenance: None,
        });
    }
    Ok(())
}

fn check_entities(line: &Line, schema: &EntitySchema) -> Result<Vec<Entity>, String> {
    let index = CharIndex::new(&line.text);
    let mut entities = Vec::with_capacity(line.entities.len());
    for (n, e) in line.entities.iter().enumerate() {
        let name = format!("entity {} (`{}`, {}..{})", n + 1, e.kind, e.start, e.end);
        if !schema.is_empty() && !schema.contains(&e.kind) {
            let known: Vec<&str> = schema.types().map(|(t, _)| t).collect();
            return Err(format!("{name}: type not in the recipe schema ({})", known.join(", ")));
        }
        if e.start >= e.end {
            return Err(format!("{name}: start must be below end"));
        }
        let Some(slice) = index.slice(&line.text, e.start, e.end) else {
            return Err(format!("{name}: past the end of the text ({} characters)", index.len()));
        };
        if e.value.as_deref().is_some_and(|v| v != slice) {
            return Err(format!("{name}: value does not match the text `{slice}`"));
        }
        entities.push((
            n,
            Entity {
                kind: e.kind.clone(),
                start: e.start,
                end: e.end,
                value: Some(slice.to_string()),
            },
        ));
    }
    entities.sort_by_key(|(_, e)| (e.start, e.end));
    for pair in entities.windows(2) {
        let ((a, first), (b, second)) = (&pair[0], &pair[1]);
        if second.start < first.end {
            let (a, b) = ((*a).min(*b) + 1, (*a).max(*b) + 1);
            return Err(format!("entity {a} and entity {b} overlap"));
        }
    }
    Ok(entities.into_iter().map(|(_, e)| e).collect())
}
