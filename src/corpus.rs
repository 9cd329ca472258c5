//! Annotated report records and their JSONL form.
//!
//! A [`Record`] is one report: its text, its scene category, typed entity
//! spans and free-form attributes. Offsets are counted in Unicode scalar
//! values (Rust `char`s), end exclusive, so they agree with Python string
//! indices and with the tools that annotate reports; [`CharIndex`] converts
//! them to byte offsets for slicing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::stage::StageError;

/// One report, real or synthetic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub text: String,
    pub scene: String,
    pub entities: Vec<Entity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Set on every generated report so it cannot pass as a real one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub synthetic: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// A typed span of a record's text, in character offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    #[serde(rename = "type")]
    pub kind: String,
    pub start: usize,
    pub end: usize,
    /// The text the span covers; always present in records watchfire writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Where a synthetic record came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub generator: String,
    pub mode: String,
    pub template_id: String,
    pub seed_ids: Vec<String>,
    pub stage_key: String,
}

impl Record {
    /// The text under `entity`, or `None` when its offsets do not fit the text.
    pub fn span_text(&self, entity: &Entity) -> Option<&str> {
        CharIndex::new(&self.text).slice(&self.text, entity.start, entity.end)
    }
}

/// Character offset -> byte offset table for one text.
pub struct CharIndex {
    /// Byte offset of every char, plus the text length at the end.
    bytes: Vec<usize>,
}

impl CharIndex {
    pub fn new(text: &str) -> Self {
        let mut bytes: Vec<usize> = text.char_indices().map(|(at, _)| at).collect();
        bytes.push(text.len());
        Self { bytes }
    }

    /// Number of chars in the text.
    pub fn len(&self) -> usize {
        self.bytes.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Byte offset of char offset `at`, if it is inside the text or at its end.
    pub fn byte(&self, at: usize) -> Option<usize> {
        self.bytes.get(at).copied()
    }

    /// Char offset of byte offset `at`; `at` must be a char boundary.
    pub fn char_at_byte(&self, at: usize) -> Option<usize> {
        self.bytes.binary_search(&at).ok()
    }

    /// The chars `start..end` of `text` (which must be the indexed text).
    pub fn slice<'t>(&self, text: &'t str, start: usize, end: usize) -> Option<&'t str> {
        if start > end {
            return None;
        }
        Some(&text[self.byte(start)?..self.byte(end)?])
    }
}

/// Reads a JSONL file of records, naming the 1-based line of any bad one.
pub fn read_records(path: &Path) -> Result<Vec<Record>, StageError> {
    read_jsonl(path)
}

/// Reads one JSON value per non-blank line, naming the 1-based line of any bad one.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StageError> {
    let mut items = Vec::new();
    for (number, line) in read_lines(path)? {
        let item = serde_json::from_str(&line)
            .map_err(|err| StageError::data(path, Some(number), err.to_string()))?;
        items.push(item);
    }
    Ok(items)
}

/// The non-blank lines of a text file with their 1-based numbers.
pub fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, StageError> {
    let file = fs_err::File::open(path)?;
    let mut lines = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|err| StageError::data(path, Some(index + 1), err.to_string()))?;
        if !line.trim().is_empty() {
            lines.push((index + 1, line));
        }
    }
    Ok(lines)
}

/// Writes one JSON value per line.
pub fn write_jsonl<'a, T: Serialize + 'a>(
    path: &Path,
    items: impl IntoIterator<Item = &'a T>,
) -> Result<(), StageError> {
    let mut out = BufWriter::new(fs_err::File::create(path)?);
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Writes a pretty-printed JSON document with a final newline.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    fs_err::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_index_slices_multibyte_text() {
        let text = "Café fire at 9:40 — Zürich";
        let index = CharIndex::new(text);
        assert_eq!(index.len(), text.chars().count());
        assert_eq!(index.slice(text, 0, 4), Some("Café"));
        assert_eq!(index.slice(text, 20, 26), Some("Zürich"));
        assert_eq!(index.slice(text, 20, 27), None);
        assert_eq!(index.char_at_byte(text.find("Zürich").unwrap()), Some(20));
    }
}
