//! Delexicalisation: a seed report becomes sentences of literal text and
//! typed slots, each sentence with a role.
//!
//! Slots: every entity span becomes `{type}`; within one report the same
//! type and value (compared case-insensitively) get the same slot index, so
//! "the sedan ... the sedan" stays one slot. Sentences end at `.`, `!` or `?`
//! followed by whitespace, and at line breaks; spans never split a sentence
//! because they are slots by then.
//!
//! Role of a sentence, first rule that matches:
//! 1. the first sentence of a report is `opening`;
//! 2. a count slot (injured, fatalities) makes it `casualty`;
//! 3. a vehicle, plate or suspect slot makes it `subject`;
//! 4. a hazard or weapon slot makes it `hazard`;
//! 5. a witness or bystander slot makes it `witness`;
//! 6. a weather slot makes it `conditions`;
//! 7. the last sentence of a report is `closing`;
//! 8. any other slot makes it `detail`;
//! 9. otherwise it is `narrative`.

use std::collections::BTreeMap;

use crate::corpus::{CharIndex, Record};
use crate::synth::slot_class::{SlotClass, parse_clock, parse_count};
use crate::synth::template::{ClockStyle, Piece, Shape};

/// One delexicalised sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sentence {
    pub pieces: Vec<Piece>,
    pub role: &'static str,
}

/// A delexicalised report: its sentences and the shape of each slot's value.
#[derive(Debug, Clone)]
pub struct DelexReport {
    pub sentences: Vec<Sentence>,
    /// (type, index) -> shape of the slot's first value.
    pub shapes: BTreeMap<(String, u32), Shape>,
}

pub fn delexicalise(record: &Record) -> DelexReport {
    let index = CharIndex::new(&record.text);
    let district = record.attributes.get("district").map(String::as_str);
    let mut entities: Vec<_> = record.entities.iter().collect();
    entities.sort_by_key(|e| (e.start, e.end));

    let mut pieces = Vec::new();
    let mut shapes = BTreeMap::new();
    let mut slot_of: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut next_index: BTreeMap<String, u32> = BTreeMap::new();
    let mut at = 0;
    for entity in entities {
        let (Some(start), Some(end)) = (index.byte(entity.start), index.byte(entity.end)) else {
            continue;
        };
        if start < at || start >= end {
            continue;
        }
        push_text(&mut pieces, &record.text[at..start]);
        let value = &record.text[start..end];
        let key = (entity.kind.clone(), value.to_lowercase());
        let slot = *slot_of.entry(key).or_insert_with(|| {
            let next = next_index.entry(entity.kind.clone()).or_insert(0);
            *next += 1;
            *next
        });
        shapes
            .entry((entity.kind.clone(), slot))
            .or_insert_with(|| shape_of(SlotClass::of(&entity.kind), value, district));
        pieces.push(Piece::Slot { kind: entity.kind.clone(), index: slot });
        at = end;
    }
    push_text(&mut pieces, &record.text[at..]);
    DelexReport { sentences: split_sentences(pieces), shapes }
}

fn push_text(pieces: &mut Vec<Piece>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Piece::Text(last)) = pieces.last_mut() {
        last.push_str(text);
    } else {
        pieces.push(Piece::Text(text.to_string()));
    }
}

/// Splits pieces into sentences and gives each its role.
fn split_sentences(pieces: Vec<Piece>) -> Vec<Sentence> {
    let mut sentences: Vec<Vec<Piece>> = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Slot { .. } => current.push(piece),
            Piece::Text(text) => {
                let mut rest = text.as_str();
                while let Some(cut) = sentence_end(rest) {
                    push_text(&mut current, &rest[..cut]);
                    sentences.push(std::mem::take(&mut current));
                    rest = &rest[cut..];
                }
                push_text(&mut current, rest);
            }
        }
    }
    sentences.push(current);

    let mut sentences: Vec<Vec<Piece>> = sentences.into_iter().filter_map(trim).collect();
    let last = sentences.len().saturating_sub(1);
    sentences
        .drain(..)
        .enumerate()
        .map(|(at, pieces)| {
            let role = role_of(&pieces, at == 0, at == last);
            Sentence { pieces, role }
        })
        .collect()
}

/// Byte offset just after the first sentence end in `text`.
fn sentence_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    for (at, &b) in bytes.iter().enumerate() {
        let next_is_space = bytes.get(at + 1).is_some_and(|n| n.is_ascii_whitespace());
        if b == b'\n' || (matches!(b, b'.' | b'!' | b'?') && next_is_space) {
            return Some(at + 1);
        }
    }
    None
}

/// Trims whitespace at both ends of a sentence and collapses inner runs;
/// `None` when nothing but whitespace and punctuation is left.
fn trim(mut pieces: Vec<Piece>) -> Option<Vec<Piece>> {
    for piece in &mut pieces {
        if let Piece::Text(text) = piece {
            *text = collapse_whitespace(text);
        }
    }
    if let Some(Piece::Text(text)) = pieces.first_mut() {
        *text = text.trim_start().to_string();
    }
    if let Some(Piece::Text(text)) = pieces.last_mut() {
        *text = text.trim_end().to_string();
    }
    pieces.retain(|p| !matches!(p, Piece::Text(t) if t.is_empty()));
    let has_words = pieces.iter().any(|p| match p {
        Piece::Slot { .. } => true,
        Piece::Text(t) => t.chars().any(char::is_alphanumeric),
    });
    has_words.then_some(pieces)
}

fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    out
}

fn role_of(pieces: &[Piece], first: bool, last: bool) -> &'static str {
    let kinds: Vec<&str> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Slot { kind, .. } => Some(kind.as_str()),
            Piece::Text(_) => None,
        })
        .collect();
    let any = |test: &dyn Fn(&str) -> bool| kinds.iter().any(|k| test(&k.to_ascii_lowercase()));
    if first {
        "opening"
    } else if any(&|k| SlotClass::of(k).is_count()) {
        "casualty"
    } else if any(&|k| matches!(SlotClass::of(k), SlotClass::Vehicle | SlotClass::Plate))
        || any(&|k| k.contains("suspect"))
    {
        "subject"
    } else if any(&|k| k.contains("hazard") || k.contains("weapon")) {
        "hazard"
    } else if any(&|k| k.contains("witness") || k.contains("bystander")) {
        "witness"
    } else if any(&|k| k.contains("weather")) {
        "conditions"
    } else if last {
        "closing"
    } else if !kinds.is_empty() {
        "detail"
    } else {
        "narrative"
    }
}

/// The shape of a seed value, so generated values of the slot read alike.
pub fn shape_of(class: SlotClass, value: &str, district: Option<&str>) -> Shape {
    match class {
        SlotClass::Injured | SlotClass::Fatalities => match parse_count(value) {
            Some(n) => Shape::Count {
                words: !value.trim().starts_with(|c: char| c.is_ascii_digit()),
                plural: n != 1,
            },
            None => Shape::Plain,
        },
        SlotClass::Time => clock_shape(value).unwrap_or(Shape::Plain),
        SlotClass::Location => location_shape(value, district),
        SlotClass::Plate => Shape::Pattern { pattern: plate_pattern(value) },
        SlotClass::Vehicle | SlotClass::Categorical => Shape::Plain,
    }
}

fn clock_shape(value: &str) -> Option<Shape> {
    parse_clock(value)?;
    let digits_end = value
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == ':'))
        .map_or(value.len(), |(at, _)| at);
    let (digits, suffix) = value.split_at(digits_end);
    let style = if !digits.contains(':') {
        ClockStyle::Compact
    } else if suffix.trim().is_empty() {
        ClockStyle::H24
    } else {
        ClockStyle::H12
    };
    Some(Shape::Clock { style, suffix: suffix.to_string() })
}

fn location_shape(value: &str, district: Option<&str>) -> Shape {
    let has_district = district.is_some_and(|d| !d.is_empty() && value.ends_with(d));
    let lower = value.to_ascii_lowercase();
    if value.starts_with(|c: char| c.is_ascii_digit()) && value.contains(' ') {
        Shape::Address { district: has_district }
    } else if lower.contains(" and ") || lower.contains(" & ") {
        Shape::Intersection { district: has_district }
    } else {
        Shape::Plain
    }
}

fn plate_pattern(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            c if c.is_ascii_alphabetic() => 'A',
            c if c.is_ascii_digit() => '9',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Entity;

    fn entity(kind: &str, text: &str, value: &str, nth: usize) -> Entity {
        let byte = text.match_indices(value).nth(nth).unwrap().0;
        let start = text[..byte].chars().count();
        Entity { kind: kind.into(), start, end: start + value.chars().count(), value: None }
    }

    #[test]
    fn same_value_shares_a_slot_and_roles_follow_the_rules() {
        let text = "At 14:05 a sedan hit a van. The sedan driver fled.\nTwo people were hurt. \
                    Units cleared.";
        let record = Record {
            id: "r1".into(),
            text: text.into(),
            scene: "collision".into(),
            entities: vec![
                entity("time", text, "14:05", 0),
                entity("vehicle", text, "sedan", 0),
                entity("vehicle", text, "van", 0),
                entity("vehicle", text, "sedan", 1),
                entity("injured", text, "Two", 0),
            ],
            attributes: Default::default(),
            synthetic: false,
            provenance: None,
        };
        let report = delexicalise(&record);
        let texts: Vec<String> =
            report.sentences.iter().map(|s| crate::synth::template::render(&s.pieces)).collect();
        assert_eq!(
            texts,
            [
                "At {time} a {vehicle} hit a {vehicle#2}.",
                "The {vehicle} driver fled.",
                "{injured} people were hurt.",
                "Units cleared."
            ]
        );
        let roles: Vec<&str> = report.sentences.iter().map(|s| s.role).collect();
        assert_eq!(roles, ["opening", "subject", "casualty", "closing"]);
        assert_eq!(
            report.shapes[&("injured".to_string(), 1)],
            Shape::Count { words: true, plural: true }
        );
        assert_eq!(
            report.shapes[&("time".to_string(), 1)],
            Shape::Clock { style: ClockStyle::H24, suffix: String::new() }
        );
    }

    #[test]
    fn shapes_read_values() {
        assert_eq!(
            shape_of(SlotClass::Location, "1200 Oak St, Eastside", Some("Eastside")),
            Shape::Address { district: true }
        );
        assert_eq!(
            shape_of(SlotClass::Location, "Oak St and 5th Ave", None),
            Shape::Intersection { district: false }
        );
        assert_eq!(
            shape_of(SlotClass::Plate, "7ABC-123", None),
            Shape::Pattern { pattern: "9AAA-999".into() }
        );
        assert_eq!(
            shape_of(SlotClass::Time, "2:35 PM", None),
            Shape::Clock { style: ClockStyle::H12, suffix: " PM".into() }
        );
        assert_eq!(
            shape_of(SlotClass::Time, "0640 hours", None),
            Shape::Clock { style: ClockStyle::Compact, suffix: " hours".into() }
        );
    }
}
