//! Consistency checks on a finished record, written independently of the
//! generator: they read only the record and the seed, never a template.
//!
//! In order, a record fails with the first reason that applies:
//! - `missing_provenance`: not marked synthetic, or no provenance;
//! - `span_mismatch`: a span is out of range, empty, overlaps another, or does
//!   not slice out exactly its `value`;
//! - `fatality_severity`: a fatality count above zero while severity is not high;
//! - `injured_severity`: more injured than the severity allows (low 2, medium 5);
//! - `injury_contradiction`: injured or fatalities above zero next to a phrase
//!   such as "no injuries" or "no fatalities";
//! - `time_mismatch`: a clock time or a time-of-day word outside entity spans
//!   disagrees with the `time_of_day` attribute, or, without the attribute, a
//!   time word matches none of the record's clock times;
//! - `vehicle_scene`: a vehicle never seen in a seed report of the record's scene.
//!
//! Counts that are not numbers ("several") are not checked.

use std::collections::{BTreeMap, BTreeSet};

use crate::corpus::{CharIndex, Record};
use crate::synth::slot_class::{
    DayPart, NO_FATALITY_PHRASES, NO_INJURY_PHRASES, Severity, SlotClass, parse_clock, parse_count,
    time_word,
};

/// Every reason a record can fail, in the order checks run.
pub const REASONS: &[&str] = &[
    "missing_provenance",
    "span_mismatch",
    "fatality_severity",
    "injured_severity",
    "injury_contradiction",
    "time_mismatch",
    "vehicle_scene",
];

/// What the checks need to know about the seed.
#[derive(Debug, Default)]
pub struct SeedFacts {
    /// Scene -> vehicle values (lowercase) seen in its seed reports.
    vehicles: BTreeMap<String, BTreeSet<String>>,
}

impl SeedFacts {
    pub fn learn(seed: &[Record]) -> Self {
        let mut vehicles: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for record in seed {
            for entity in &record.entities {
                if SlotClass::of(&entity.kind) != SlotClass::Vehicle {
                    continue;
                }
                let value = entity.value.as_deref().or_else(|| record.span_text(entity));
                if let Some(value) = value {
                    vehicles.entry(record.scene.clone()).or_default().insert(value.to_lowercase());
                }
            }
        }
        Self { vehicles }
    }
}

/// A failed check: its reason (one of [`REASONS`]) and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub reason: &'static str,
    pub detail: String,
}

fn violation(reason: &'static str, detail: String) -> Result<(), Violation> {
    Err(Violation { reason, detail })
}

pub fn check(record: &Record, facts: &SeedFacts) -> Result<(), Violation> {
    if !record.synthetic || record.provenance.is_none() {
        return violation("missing_provenance", "not marked as synthetic".into());
    }
    let index = CharIndex::new(&record.text);
    check_spans(record, &index)?;
    check_counts(record)?;
    check_times(record, &index)?;
    check_vehicles(record, facts)
}

fn check_spans(record: &Record, index: &CharIndex) -> Result<(), Violation> {
    let mut spans: Vec<_> = record.entities.iter().collect();
    spans.sort_by_key(|e| (e.start, e.end));
    let mut previous_end = 0;
    for entity in spans {
        let Some(slice) = index.slice(&record.text, entity.start, entity.end) else {
            return violation("span_mismatch", format!("{} span out of range", entity.kind));
        };
        if entity.start >= entity.end || entity.start < previous_end {
            return violation(
                "span_mismatch",
                format!("{} span empty or overlapping", entity.kind),
            );
        }
        if entity.value.as_deref() != Some(slice) {
            return violation("span_mismatch", format!("{} span reads `{slice}`", entity.kind));
        }
        previous_end = entity.end;
    }
    Ok(())
}

fn check_counts(record: &Record) -> Result<(), Violation> {
    let severity = record.attributes.get("severity").and_then(|s| Severity::parse(s));
    let lower = record.text.to_lowercase();
    for entity in &record.entities {
        let class = SlotClass::of(&entity.kind);
        if !class.is_count() {
            continue;
        }
        let Some(n) = entity.value.as_deref().and_then(parse_count) else {
            continue;
        };
        if n == 0 {
            continue;
        }
        if class == SlotClass::Fatalities && severity.is_some_and(|s| s != Severity::High) {
            return violation("fatality_severity", format!("{n} fatalities, severity not high"));
        }
        let limit = match severity {
            Some(Severity::Low) => 2,
            Some(Severity::Medium) => 5,
            _ => u32::MAX,
        };
        if class == SlotClass::Injured && n > limit {
            return violation("injured_severity", format!("{n} injured at {severity:?} severity"));
        }
        let phrases =
            if class == SlotClass::Injured { NO_INJURY_PHRASES } else { NO_FATALITY_PHRASES };
        if let Some(phrase) = phrases.iter().find(|p| lower.contains(*p)) {
            return violation(
                "injury_contradiction",
                format!("{} {n} beside `{phrase}`", entity.kind),
            );
        }
    }
    Ok(())
}

fn check_times(record: &Record, index: &CharIndex) -> Result<(), Violation> {
    let clocks: Vec<DayPart> = record
        .entities
        .iter()
        .filter(|e| SlotClass::of(&e.kind) == SlotClass::Time)
        .filter_map(|e| parse_clock(e.value.as_deref()?))
        .map(DayPart::of_minute)
        .collect();
    let words = time_words_outside_spans(record, index);
    match record.attributes.get("time_of_day").and_then(|v| DayPart::parse(v)) {
        Some(part) => {
            if let Some(clock) = clocks.iter().find(|c| **c != part) {
                return violation(
                    "time_mismatch",
                    format!("clock in {clock:?}, attribute {part:?}"),
                );
            }
            if let Some((word, _)) = words.iter().find(|(_, w)| *w != part) {
                return violation("time_mismatch", format!("`{word}` with attribute {part:?}"));
            }
        }
        None if !clocks.is_empty() => {
            if let Some((word, _)) = words.iter().find(|(_, w)| !clocks.contains(w)) {
                return violation("time_mismatch", format!("`{word}` matches no clock time"));
            }
        }
        None => {}
    }
    Ok(())
}

/// Time-of-day words of the text that are not inside an entity span.
fn time_words_outside_spans(record: &Record, index: &CharIndex) -> Vec<(String, DayPart)> {
    let spans: Vec<(usize, usize)> = record
        .entities
        .iter()
        .filter_map(|e| Some((index.byte(e.start)?, index.byte(e.end)?)))
        .collect();
    let inside = |at: usize| spans.iter().any(|&(s, e)| s <= at && at < e);
    let text = &record.text;
    let mut words = Vec::new();
    let mut start = None;
    for (at, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        if c.is_alphabetic() {
            start.get_or_insert(at);
            continue;
        }
        let Some(from) = start.take() else { continue };
        if let Some(part) = time_word(&text[from..at]).filter(|_| !inside(from)) {
            words.push((text[from..at].to_string(), part));
        }
    }
    words
}

fn check_vehicles(record: &Record, facts: &SeedFacts) -> Result<(), Violation> {
    let known = facts.vehicles.get(&record.scene);
    for entity in &record.entities {
        if SlotClass::of(&entity.kind) != SlotClass::Vehicle {
            continue;
        }
        let value = entity.value.as_deref().unwrap_or_default().to_lowercase();
        if !known.is_some_and(|set| set.contains(&value)) {
            return violation(
                "vehicle_scene",
                format!("`{value}` never seen in scene `{}`", record.scene),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{Entity, Provenance};

    fn record(text: &str, entities: &[(&str, &str)], attributes: &[(&str, &str)]) -> Record {
        let entities = entities
            .iter()
            .map(|(kind, value)| {
                let byte = text.find(value).unwrap();
                let start = text[..byte].chars().count();
                let end = start + value.chars().count();
                Entity { kind: kind.to_string(), start, end, value: Some(value.to_string()) }
            })
            .collect();
        Record {
            id: "x".into(),
            text: text.into(),
            scene: "collision".into(),
            entities,
            attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            synthetic: true,
            provenance: Some(Provenance {
                generator: "test".into(),
                mode: "hierarchical".into(),
                template_id: "t".into(),
                seed_ids: vec![],
                stage_key: "k".into(),
            }),
        }
    }

    fn reason(record: &Record) -> Option<&'static str> {
        let seed = [record_seed()];
        check(record, &SeedFacts::learn(&seed)).err().map(|v| v.reason)
    }

    fn record_seed() -> Record {
        let mut seed = record("A sedan crashed.", &[("vehicle", "sedan")], &[]);
        seed.synthetic = false;
        seed
    }

    #[test]
    fn consistent_record_passes() {
        let r = record(
            "At 08:10 this morning a sedan hit a pole; two people were hurt.",
            &[("time", "08:10"), ("vehicle", "sedan"), ("injured", "two")],
            &[("time_of_day", "morning"), ("severity", "medium")],
        );
        assert_eq!(reason(&r), None);
    }

    #[test]
    fn each_rule_fires() {
        let time = record("At 22:10 this morning.", &[("time", "22:10")], &[]);
        assert_eq!(reason(&time), Some("time_mismatch"));
        let attr = record("At 08:10.", &[("time", "08:10")], &[("time_of_day", "night")]);
        assert_eq!(reason(&attr), Some("time_mismatch"));
        let fatal = record("One person died.", &[("fatalities", "One")], &[("severity", "low")]);
        assert_eq!(reason(&fatal), Some("fatality_severity"));
        let many = record("9 hurt.", &[("injured", "9")], &[("severity", "low")]);
        assert_eq!(reason(&many), Some("injured_severity"));
        let no = record("2 hurt, no injuries reported.", &[("injured", "2")], &[]);
        assert_eq!(reason(&no), Some("injury_contradiction"));
        let truck = record("A fire engine crashed.", &[("vehicle", "fire engine")], &[]);
        assert_eq!(reason(&truck), Some("vehicle_scene"));
        let mut span = record("A sedan crashed.", &[("vehicle", "sedan")], &[]);
        span.entities[0].end += 1;
        assert_eq!(reason(&span), Some("span_mismatch"));
        let mut real = record("A sedan crashed.", &[("vehicle", "sedan")], &[]);
        real.synthetic = false;
        assert_eq!(reason(&real), Some("missing_provenance"));
    }
}
