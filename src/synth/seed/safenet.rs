//! SAFENET wildland-fire safety reports: CSV with a free-text `Narrative`
//! and structured fields. Each row with a narrative becomes a record:
//!
//! - scene: the first `Event Incident Activity` item in snake case
//!   (`line`, `support`, `transport_to_from`, ...), else the first
//!   `Event Incident Type` item, else `unspecified`;
//! - entities: whole-word, ASCII-case-insensitive occurrences in the
//!   narrative of the state (code or full name, type `state`), the incident
//!   name (and its part before a parenthesis, type `incident_name`) and each
//!   listed resource (type `resource`);
//! - attributes: `state`, `jurisdiction`, `incident_type`, `stage`, `year`.
//!
//! Header names are trimmed of spaces and quotes, since the files write
//! `"ID", "SAFENET ID"`; text that is not UTF-8 is read lossily.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::corpus::{CharIndex, Entity, Record};
use crate::schema::EntitySchema;
use crate::stage::StageError;
use crate::synth::seed::{SeedStats, find_words, normalise_category, tidy_spans};

/// Resource list items too generic to mark in a narrative.
const GENERIC_RESOURCES: &[&str] = &["all", "none", "n/a", "na", "other", "unknown"];

/// Reads one file, appending to `records`, until `limit` records are held.
pub fn read(
    path: &Path,
    schema: &EntitySchema,
    records: &mut Vec<Record>,
    ids: &mut BTreeSet<String>,
    stats: &mut SeedStats,
    limit: usize,
) -> Result<(), StageError> {
    let file = fs_err::File::open(path)?;
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let headers: Vec<String> = reader
        .byte_headers()
        .map_err(|e| StageError::data(path, Some(1), e.to_string()))?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().trim_matches('"').to_string())
        .collect();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let narrative = column("Narrative")
        .ok_or_else(|| StageError::data(path, Some(1), "no `Narrative` column"))?;

    for row in reader.byte_records() {
        if records.len() >= limit {
            break;
        }
        let row = row.map_err(|e| {
            StageError::data(path, e.position().map(|p| p.line() as usize), e.to_string())
        })?;
        let line = row.position().map_or(0, |p| p.line() as usize);
        let field = |name: &str| {
            column(name)
                .and_then(|at| row.get(at))
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .unwrap_or_default()
        };
        let text = row.get(narrative).map(|b| String::from_utf8_lossy(b).trim().to_string());
        let Some(text) = text.filter(|t| !t.is_empty()) else {
            stats.skip_report("empty_text");
            continue;
        };
        let id = [field("SAFENET ID"), field("ID")]
            .into_iter()
            .find(|id| !id.is_empty())
            .unwrap_or_else(|| format!("safenet-{line}"));
        if !ids.insert(id.clone()) {
            stats.skip_report("repeated_id");
            continue;
        }
        let entities = entities(&text, &field);
        stats.read += 1;
        records.push(Record {
            id,
            entities: tidy_spans(&text, entities, schema, stats),
            scene: scene(&field("Event Incident Activity"), &field("Event Incident Type")),
            attributes: attributes(&field),
            text,
            synthetic: false,
            provenance: None,
        });
    }
    Ok(())
}

fn first_item(list: &str) -> Option<String> {
    list.split(';').map(normalise_category).find(|item| !item.is_empty())
}

fn scene(activity: &str, incident_type: &str) -> String {
    first_item(activity)
        .or_else(|| first_item(incident_type))
        .unwrap_or_else(|| "unspecified".to_string())
}

fn attributes(field: &dyn Fn(&str) -> String) -> BTreeMap<String, String> {
    let mut attributes = BTreeMap::new();
    let mut put = |key: &str, value: Option<String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            attributes.insert(key.to_string(), value);
        }
    };
    put("state", Some(field("Event State")));
    put("jurisdiction", Some(field("Event Jurisdiction")));
    put("incident_type", first_item(&field("Event Incident Type")));
    put("stage", first_item(&field("Event Incident Stage")));
    let date = field("Event Start Date");
    put("year", date.split([' ', '/']).find(|p| p.len() == 4).map(str::to_string));
    attributes
}

/// Occurrences of the structured fields' values in the narrative.
fn entities(text: &str, field: &dyn Fn(&str) -> String) -> Vec<Entity> {
    let mut needles: Vec<(&str, String)> = Vec::new();
    let state = field("Event State");
    if let Some(name) = state_name(&state) {
        needles.push(("state", name.to_string()));
    }
    if state.len() == 2 {
        needles.push(("state", state));
    }
    let incident = field("Incident Name");
    if let Some((head, _)) = incident.split_once('(') {
        needles.push(("incident_name", head.trim().to_string()));
    }
    needles.push(("incident_name", incident));
    for resource in field("Event Resources").split([',', ';']).map(str::trim) {
        if resource.len() >= 3
            && !GENERIC_RESOURCES.contains(&resource.to_ascii_lowercase().as_str())
        {
            needles.push(("resource", resource.to_string()));
        }
    }

    let index = CharIndex::new(text);
    let mut seen = BTreeSet::new();
    let mut entities = Vec::new();
    for (kind, needle) in needles {
        // A two-letter state code only counts in capitals, so "in" is not Indiana.
        let exact_case = kind == "state" && needle.len() == 2;
        for (start, end) in find_words(text, &needle) {
            if exact_case && text[start..end] != needle {
                continue;
            }
            let (Some(s), Some(e)) = (index.char_at_byte(start), index.char_at_byte(end)) else {
                continue;
            };
            if seen.insert((s, e)) {
                entities.push(Entity { kind: kind.to_string(), start: s, end: e, value: None });
            }
        }
    }
    entities
}

fn state_name(code: &str) -> Option<&'static str> {
    const STATES: &[(&str, &str)] = &[
        ("AK", "Alaska"),
        ("AL", "Alabama"),
        ("AR", "Arkansas"),
        ("AZ", "Arizona"),
        ("CA", "California"),
        ("CO", "Colorado"),
        ("CT", "Connecticut"),
        ("DE", "Delaware"),
        ("FL", "Florida"),
        ("GA", "Georgia"),
        ("HI", "Hawaii"),
        ("IA", "Iowa"),
        ("ID", "Idaho"),
        ("IL", "Illinois"),
        ("IN", "Indiana"),
        ("KS", "Kansas"),
        ("KY", "Kentucky"),
        ("LA", "Louisiana"),
        ("MA", "Massachusetts"),
        ("MD", "Maryland"),
        ("ME", "Maine"),
        ("MI", "Michigan"),
        ("MN", "Minnesota"),
        ("MO", "Missouri"),
        ("MS", "Mississippi"),
        ("MT", "Montana"),
        ("NC", "North Carolina"),
        ("ND", "North Dakota"),
        ("NE", "Nebraska"),
        ("NH", "New Hampshire"),
        ("NJ", "New Jersey"),
        ("NM", "New Mexico"),
        ("NV", "Nevada"),
        ("NY", "New York"),
        ("OH", "Ohio"),
        ("OK", "Oklahoma"),
        ("OR", "Oregon"),
        ("PA", "Pennsylvania"),
        ("RI", "Rhode Island"),
        ("SC", "South Carolina"),
        ("SD", "South Dakota"),
        ("TN", "Tennessee"),
        ("TX", "Texas"),
        ("UT", "Utah"),
        ("VA", "Virginia"),
        ("VT", "Vermont"),
        ("WA", "Washington"),
        ("WI", "Wisconsin"),
        ("WV", "West Virginia"),
        ("WY", "Wyoming"),
        ("PR", "Puerto Rico"),
    ];
    STATES.iter().find(|(c, _)| c.eq_ignore_ascii_case(code)).map(|(_, name)| *name)
}
