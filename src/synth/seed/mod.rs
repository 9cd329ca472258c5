//! Seed readers: real annotated reports in several formats become
//! normalised [`Record`]s with character offsets and filled-in values.
//!
//! `jsonl` is watchfire's own format and is strict: any bad span stops the
//! stage with the file and line. The public formats (`idrisi`, `safenet`) are
//! repaired where a span can be found again and otherwise lose that span, and
//! the stats say how many.

pub mod idrisi;
pub mod jsonl;
pub mod safenet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::corpus::{CharIndex, Entity, Record};
use crate::schema::EntitySchema;
use crate::stage::StageError;

/// What reading the seed found, written to `stats.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeedStats {
    pub files: Vec<String>,
    pub read: usize,
    pub selected: usize,
    pub scenes: BTreeMap<String, usize>,
    pub entity_types: BTreeMap<String, usize>,
    /// Spans whose offsets were wrong but whose text was found nearby.
    pub repaired: usize,
    /// Spans dropped: text not found, overlapping, or type not in the schema.
    pub dropped: BTreeMap<String, usize>,
    /// Reports skipped: empty text or a repeated id.
    pub skipped: BTreeMap<String, usize>,
}

impl SeedStats {
    pub fn drop_span(&mut self, why: &str) {
        *self.dropped.entry(why.to_string()).or_default() += 1;
    }

    pub fn skip_report(&mut self, why: &str) {
        *self.skipped.entry(why.to_string()).or_default() += 1;
    }

    /// Counts the selected records per scene and entity type.
    pub fn count(&mut self, records: &[Record]) {
        self.selected = records.len();
        for record in records {
            *self.scenes.entry(record.scene.clone()).or_default() += 1;
            for entity in &record.entities {
                *self.entity_types.entry(entity.kind.clone()).or_default() += 1;
            }
        }
    }
}

/// The files to read: `path` itself, or its `*.ext` files in sorted order.
pub fn input_files(path: &Path, ext: &str) -> Result<Vec<PathBuf>, StageError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs_err::read_dir(path)? {
        let file = entry?.path();
        if file.is_file() && file.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)) {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(StageError::data(path, None, format!("no *.{ext} files in this folder")));
    }
    Ok(files)
}

/// Keeps `share` of the records, chosen by a hash of the seed and each id so
/// the choice is stable; the kept records stay in input order.
pub fn select_share(records: Vec<Record>, share: f64, seed: u64) -> Vec<Record> {
    if share >= 1.0 {
        return records;
    }
    let keep = ((records.len() as f64 * share).ceil() as usize).min(records.len());
    let mut ranked: Vec<(blake3::Hash, usize)> = records
        .iter()
        .enumerate()
        .map(|(at, r)| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&seed.to_le_bytes());
            hasher.update(r.id.as_bytes());
            (hasher.finalize(), at)
        })
        .collect();
    ranked.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<usize> = ranked[..keep].iter().map(|(_, at)| *at).collect();
    chosen.sort_unstable();
    let mut records: Vec<Option<Record>> = records.into_iter().map(Some).collect();
    chosen.into_iter().filter_map(|at| records[at].take()).collect()
}

/// Sorts spans, drops those that overlap an earlier one or whose type the
/// schema lacks, and fills in their values. For the lenient readers.
pub fn tidy_spans(
    text: &str,
    mut entities: Vec<Entity>,
    schema: &EntitySchema,
    stats: &mut SeedStats,
) -> Vec<Entity> {
    let index = CharIndex::new(text);
    entities.sort_by_key(|e| (e.start, std::cmp::Reverse(e.end)));
    let mut kept: Vec<Entity> = Vec::with_capacity(entities.len());
    for mut entity in entities {
        if !schema.is_empty() && !schema.contains(&entity.kind) {
            stats.drop_span("type_not_in_schema");
            continue;
        }
        if kept.last().is_some_and(|last| entity.start < last.end) {
            stats.drop_span("overlapping");
            continue;
        }
        let Some(value) = index.slice(text, entity.start, entity.end) else {
            stats.drop_span("out_of_range");
            continue;
        };
        entity.value = Some(value.to_string());
        kept.push(entity);
    }
    kept
}

/// Snake-case form of a category name: `Transport to/from;` -> `transport_to_from`.
pub fn normalise_category(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// Byte ranges of whole-word, ASCII-case-insensitive occurrences of `needle`.
pub fn find_words(haystack: &str, needle: &str) -> Vec<(usize, usize)> {
    if needle.is_empty() {
        return Vec::new();
    }
    let lower_hay = haystack.to_ascii_lowercase();
    let lower_needle = needle.to_ascii_lowercase();
    let is_word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    lower_hay
        .match_indices(&lower_needle)
        .map(|(at, m)| (at, at + m.len()))
        .filter(|&(start, end)| {
            !is_word(haystack[..start].chars().next_back())
                && !is_word(haystack[end..].chars().next())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_normalise() {
        assert_eq!(normalise_category("Transport to/from;"), "transport_to_from");
        assert_eq!(normalise_category("  Line; "), "line");
    }

    #[test]
    fn words_are_found_whole_and_caseless() {
        let text = "Engine 5 and the engines; ENGINE crew";
        assert_eq!(find_words(text, "engine"), [(0, 6), (26, 32)]);
    }

    #[test]
    fn share_is_stable_and_sized() {
        let records: Vec<Record> = (0..50)
            .map(|i| Record {
                id: format!("r{i}"),
                text: "x".into(),
                scene: "s".into(),
                entities: vec![],
                attributes: Default::default(),
                synthetic: false,
                provenance: None,
            })
            .collect();
        let a = select_share(records.clone(), 0.1, 1);
        let b = select_share(records.clone(), 0.1, 1);
        let c = select_share(records, 0.1, 2);
        assert_eq!(a.len(), 5);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
