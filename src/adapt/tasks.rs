//! Training examples for three subtasks, built from annotated reports.
//!
//! Every report with gold entity spans yields up to three examples:
//!
//! - **entities**: report -> every entity whose type is in the recipe's
//!   schema, key and peripheral, one `type: value` line each in order of
//!   appearance ([`render_entities`], inverted exactly by [`parse_entities`]);
//! - **summary**: report -> one or two templated sentences that state every
//!   key fact value verbatim ([`summary`]);
//! - **alert**: report -> one line `SCENE | place | time | severity | hazard`
//!   ([`alert`], read back by [`parse_alert`]).
//!
//! Targets are computed from the gold spans and attributes, never generated,
//! so they are exact. Each example lists the key facts (key-typed entities,
//! as `(type, value)`) its target states, for evaluation by key-fact retention.
//!
//! Records are split into train and validation by template: a hash of the
//! stage seed and the record's `provenance.template_id` decides, so all the
//! reports of one template land on the same side. Records without provenance
//! (real seed reports) have no template and are split by a hash of their id.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::Record;
use crate::schema::{EntityRole, EntitySchema};
use crate::synth::slot_class::SlotClass;

/// One of the subtasks an example trains.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Report -> every typed entity, one `type: value` per line, in order of appearance.
    Entities,
    /// Report -> one or two sentences stating every key fact verbatim.
    Summary,
    /// Report -> one line `SCENE | place | time | severity | hazard`.
    Alert,
}

impl Task {
    /// Every task, in the order examples of one record are written.
    pub const ALL: [Task; 3] = [Task::Entities, Task::Summary, Task::Alert];

    pub fn name(self) -> &'static str {
        match self {
            Task::Entities => "entities",
            Task::Summary => "summary",
            Task::Alert => "alert",
        }
    }
}

/// A key entity a target must state: its type and its value as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFact {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

/// One training or validation example: a line of `train.jsonl` or `validation.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// `SOURCE_ID:TASK`, such as `syn-0001190:summary`.
    pub id: String,
    pub task: Task,
    /// Id of the report the example was made from.
    pub source_id: String,
    /// The report's `provenance.template_id`; absent for real reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// The task's fixed instruction, a blank line, `Report:` and the report text.
    pub prompt: String,
    /// The exact expected output.
    pub target: String,
    /// The key entities the target states, in order of first appearance, without repeats.
    pub key_facts: Vec<KeyFact>,
    /// Every schema-typed entity span of the report, located in `prompt`
    /// (char offsets), for span embeddings in contrastive training.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<PromptSpan>,
}

/// An entity span of the report inside an example's prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptSpan {
    #[serde(rename = "type")]
    pub kind: String,
    pub role: EntityRole,
    pub value: String,
    /// Char offsets into the prompt, end exclusive.
    pub start: usize,
    pub end: usize,
}

/// An entity of a record whose type is in the schema, with its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldEntity {
    pub kind: String,
    pub value: String,
    pub role: EntityRole,
    /// Char offsets into the record's text.
    pub start: usize,
    pub end: usize,
}

/// The record's entities whose type the schema lists, in order of appearance
/// (by start, then end offset), and how many were left out for a type the
/// schema lacks. Fails when a span without a `value` does not fit the text.
pub fn gold_entities(
    record: &Record,
    schema: &EntitySchema,
) -> Result<(Vec<GoldEntity>, usize), String> {
    let mut order: Vec<usize> = (0..record.entities.len()).collect();
    order.sort_by_key(|&at| (record.entities[at].start, record.entities[at].end));
    let mut gold = Vec::new();
    let mut outside = 0;
    for at in order {
        let entity = &record.entities[at];
        let Some(role) = schema.role(&entity.kind) else {
            outside += 1;
            continue;
        };
        let value = match &entity.value {
            Some(value) => value.clone(),
            None => record.span_text(entity).map(str::to_string).ok_or_else(|| {
                format!(
                    "record `{}`: entity {} (`{}`, {}..{}) does not fit the text",
                    record.id,
                    at + 1,
                    entity.kind,
                    entity.start,
                    entity.end
                )
            })?,
        };
        gold.push(GoldEntity {
            kind: entity.kind.clone(),
            value,
            role,
            start: entity.start,
            end: entity.end,
        });
    }
    Ok((gold, outside))
}

/// The key entities among `gold`, in order of first appearance, each
/// `(type, value)` once.
pub fn key_facts(gold: &[GoldEntity]) -> Vec<KeyFact> {
    let mut seen = BTreeSet::new();
    gold.iter()
        .filter(|e| e.role == EntityRole::Key)
        .filter(|e| seen.insert((e.kind.as_str(), e.value.as_str())))
        .map(|e| KeyFact { kind: e.kind.clone(), value: e.value.clone() })
        .collect()
}

// ---------------------------------------------------------------------------
// Prompts

/// The fixed instruction of a task. The entity and summary instructions name
/// the schema's types (all of them, and the key ones), in the schema's order.
pub fn instruction(task: Task, schema: &EntitySchema) -> String {
    match task {
        Task::Entities => {
            let types: Vec<&str> = schema.types().map(|(name, _)| name).collect();
            format!(
                "List every entity in the report below, one per line as `type: value`, in the \
                 order they appear, copying each value exactly. Types: {}. Write `none` if there \
                 is none.",
                types.join(", ")
            )
        }
        Task::Summary => {
            let key: Vec<&str> = schema
                .types()
                .filter(|(_, role)| *role == EntityRole::Key)
                .map(|(name, _)| name)
                .collect();
            format!(
                "Summarise the report below in one or two sentences. State every key fact exactly \
                 as it is written: {}.",
                key.join(", ")
            )
        }
        Task::Alert => "Write a one-line alert for the report below as `SCENE | place | time | \
                        severity | hazard`, with `unknown` for anything the report does not give."
            .to_string(),
    }
}

/// What a model is given: the instruction, a blank line, `Report:` and the text.
pub fn prompt(task: Task, schema: &EntitySchema, text: &str) -> String {
    with_report(&instruction(task, schema), text)
}

/// What stands between the instruction and the report text in a prompt.
pub const REPORT_HEADER: &str = "\n\nReport:\n";

fn with_report(instruction: &str, text: &str) -> String {
    format!("{instruction}{REPORT_HEADER}{text}")
}

// ---------------------------------------------------------------------------
// Entities: `type: value` lines

/// What an entity target says when a report has no entity of a schema type.
pub const NO_ENTITIES: &str = "none";

/// The entity target: one `type: value` line per entity, in the order given,
/// joined by `\n` with no final newline; [`NO_ENTITIES`] for none. In both
/// fields a backslash is written `\\`, a line feed `\n` and a carriage return
/// `\r`; in the type a colon is also escaped, `\:`, so the first unescaped
/// `: ` ends it. The value is written as it is otherwise, spaces included.
pub fn render_entities<'a>(entities: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let lines: Vec<String> = entities
        .into_iter()
        .map(|(kind, value)| format!("{}: {}", escape(kind, true), escape(value, false)))
        .collect();
    if lines.is_empty() { NO_ENTITIES.to_string() } else { lines.join("\n") }
}

/// Reads an entity target back: the exact inverse of [`render_entities`].
/// Lines without an unescaped `: ` (such as `none`, or a blank line) are
/// skipped, and a carriage return ending a line is ignored, so it also reads
/// a model's output leniently.
pub fn parse_entities(text: &str) -> Vec<(String, String)> {
    text.split('\n')
        .filter_map(|line| parse_entity_line(line.strip_suffix('\r').unwrap_or(line)))
        .collect()
}

fn parse_entity_line(line: &str) -> Option<(String, String)> {
    let mut kind = String::new();
    let mut chars = line.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, next)) => unescape_into(&mut kind, next),
                None => kind.push('\\'),
            },
            ':' if line[at + 1..].starts_with(' ') => {
                return Some((kind, unescape(&line[at + 2..])));
            }
            c => kind.push(c),
        }
    }
    None
}

fn escape(text: &str, colon: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ':' if colon => out.push_str("\\:"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(next) => unescape_into(&mut out, next),
            None => out.push('\\'),
        }
    }
    out
}

/// The character an escape `\c` stands for; an unknown escape stays as written.
fn unescape_into(out: &mut String, c: char) {
    match c {
        'n' => out.push('\n'),
        'r' => out.push('\r'),
        '\\' | ':' => out.push(c),
        other => {
            out.push('\\');
            out.push(other);
        }
    }
}

// ---------------------------------------------------------------------------
// Summary

/// The summary target. One sentence always, a second when there are key
/// facts other than places, times and counts:
///
/// ```text
/// {Scene} reported[ at {places}][ at {times}][, with {injured} injured][ and {fatalities} dead].
/// [Key details: {type} {values}; {type} {values}.]
/// ```
///
/// `{Scene}` is the scene category with `_` as spaces and a capital first
/// letter. Every key fact is stated once, verbatim, in order of first
/// appearance; the type's class (see [`SlotClass`]) decides where: places,
/// clock times, injured counts and fatality counts go to the first sentence,
/// the rest to the second, grouped by type (`_` in a type name written as a
/// space). Lists are joined `a`, `a and b`, `a, b and c`. A sentence whose
/// last value already ends in `.` gets no second full stop. Peripheral
/// entities are left out.
pub fn summary(scene: &str, gold: &[GoldEntity]) -> String {
    let facts = key_facts(gold);
    let (mut places, mut times, mut injured, mut fatalities) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut details: Vec<(&str, Vec<&str>)> = Vec::new();
    for fact in &facts {
        let value = fact.value.as_str();
        match SlotClass::of(&fact.kind) {
            SlotClass::Location => places.push(value),
            SlotClass::Time => times.push(value),
            SlotClass::Injured => injured.push(value),
            SlotClass::Fatalities => fatalities.push(value),
            _ => match details.iter_mut().find(|(kind, _)| *kind == fact.kind) {
                Some((_, values)) => values.push(value),
                None => details.push((fact.kind.as_str(), vec![value])),
            },
        }
    }
    let mut out = capitalized(&scene_words(scene));
    out.push_str(" reported");
    if !places.is_empty() {
        out.push_str(" at ");
        out.push_str(&join(&places));
    }
    if !times.is_empty() {
        out.push_str(" at ");
        out.push_str(&join(&times));
    }
    let mut casualties = Vec::new();
    if !injured.is_empty() {
        casualties.push(format!("{} injured", join(&injured)));
    }
    if !fatalities.is_empty() {
        casualties.push(format!("{} dead", join(&fatalities)));
    }
    if !casualties.is_empty() {
        out.push_str(", with ");
        out.push_str(&casualties.join(" and "));
    }
    end_sentence(&mut out);
    if !details.is_empty() {
        let items: Vec<String> = details
            .iter()
            .map(|(kind, values)| format!("{} {}", kind.replace('_', " "), join(values)))
            .collect();
        out.push_str(" Key details: ");
        out.push_str(&items.join("; "));
        end_sentence(&mut out);
    }
    out
}

fn end_sentence(out: &mut String) {
    if !out.ends_with('.') {
        out.push('.');
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The scene category in words: `traffic_collision` -> `traffic collision`;
/// `incident` when it has none.
pub fn scene_words(scene: &str) -> String {
    let spaced = scene.replace(['_', '-'], " ");
    let words: Vec<&str> = spaced.split_whitespace().collect();
    if words.is_empty() { "incident".to_string() } else { words.join(" ") }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Alert

/// What an alert field says when the report does not give it.
pub const UNKNOWN: &str = "unknown";

/// The five fields of an alert line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertFields {
    /// The scene category in upper-case words: `TRAFFIC COLLISION`.
    pub scene: String,
    pub place: String,
    pub time: String,
    pub severity: String,
    pub hazard: String,
}

impl AlertFields {
    /// `SCENE | place | time | severity | hazard`.
    pub fn line(&self) -> String {
        [&self.scene, &self.place, &self.time, &self.severity, &self.hazard]
            .map(String::as_str)
            .join(" | ")
    }
}

/// Reads an alert line back: its five ` | `-separated fields, or `None`
/// when it has another number of fields.
pub fn parse_alert(line: &str) -> Option<AlertFields> {
    let fields: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(" | ").collect();
    let [scene, place, time, severity, hazard] = fields.as_slice() else { return None };
    Some(AlertFields {
        scene: scene.to_string(),
        place: place.to_string(),
        time: time.to_string(),
        severity: severity.to_string(),
        hazard: hazard.to_string(),
    })
}

/// An alert target and where its fields came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub fields: AlertFields,
    /// The key entities the line states (place, time, hazard, when key-typed).
    pub key_facts: Vec<KeyFact>,
    /// Whether the hazard was derived from the scene category.
    pub hazard_from_scene: bool,
}

/// The alert target of a record:
///
/// - `scene`: the scene category in upper-case words;
/// - `place`: the first entity whose type is a place (see [`SlotClass`]);
/// - `time`: the first entity whose type is a clock time;
/// - `severity`: the record's `severity` attribute;
/// - `hazard`: the first entity whose type name contains `hazard`, else
///   [`scene_hazard`] of the scene category.
///
/// A missing field is `unknown`. Field values are verbatim except that line
/// breaks become spaces and `|` becomes `/`, so the line splits back exactly;
/// key facts hold the values as written in the line.
pub fn alert(record: &Record, gold: &[GoldEntity]) -> Alert {
    let place = gold.iter().find(|e| SlotClass::of(&e.kind) == SlotClass::Location);
    let time = gold.iter().find(|e| SlotClass::of(&e.kind) == SlotClass::Time);
    let hazard = gold.iter().find(|e| e.kind.to_ascii_lowercase().contains("hazard"));
    let mut key_facts: Vec<KeyFact> = Vec::new();
    let mut field = |entity: Option<&GoldEntity>| match entity {
        Some(entity) => {
            let value = alert_field(&entity.value);
            let fact = KeyFact { kind: entity.kind.clone(), value: value.clone() };
            if entity.role == EntityRole::Key && !key_facts.contains(&fact) {
                key_facts.push(fact);
            }
            value
        }
        None => UNKNOWN.to_string(),
    };
    let place = field(place);
    let time = field(time);
    let hazard_from_scene = hazard.is_none();
    let hazard = match hazard {
        Some(_) => field(hazard),
        None => scene_hazard(&record.scene),
    };
    let severity = record
        .attributes
        .get("severity")
        .map(|s| alert_field(s.trim()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| UNKNOWN.to_string());
    let fields = AlertFields {
        scene: alert_field(&scene_words(&record.scene).to_uppercase()),
        place,
        time,
        severity,
        hazard,
    };
    Alert { fields, key_facts, hazard_from_scene }
}

fn alert_field(value: &str) -> String {
    let out: String = value
        .chars()
        .map(|c| match c {
            '\n' | '\r' => ' ',
            '|' => '/',
            c => c,
        })
        .collect();
    if out.trim().is_empty() { UNKNOWN.to_string() } else { out }
}

/// Scene-category words -> the hazard an alert names when the report has no
/// hazard entity. The first row with a word the category contains wins.
pub const SCENE_HAZARDS: &[(&[&str], &str)] = &[
    (&["hazmat", "spill", "chemical", "toxic", "gas"], "hazardous material"),
    (&["fire", "smoke", "burn"], "fire"),
    (&["collision", "crash", "traffic"], "vehicle collision"),
    (&["flood"], "flooding"),
    (&["assault", "shooting", "stabbing", "violence"], "violence"),
    (&["disturbance", "riot", "crowd"], "crowd unrest"),
    (&["missing"], "missing person"),
    (&["medical", "injur", "dead", "death"], "medical emergency"),
    (&["burglary", "theft", "robbery"], "property crime"),
];

/// The main hazard of a scene category, from [`SCENE_HAZARDS`]; the
/// category in words when no row matches.
pub fn scene_hazard(scene: &str) -> String {
    let lower = scene.to_lowercase();
    SCENE_HAZARDS
        .iter()
        .find(|(words, _)| words.iter().any(|w| lower.contains(w)))
        .map(|(_, hazard)| hazard.to_string())
        .unwrap_or_else(|| alert_field(&scene_words(&lower)))
}

// ---------------------------------------------------------------------------
// Split

/// Which side of the split a record is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
}

/// What a record is split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKind {
    /// `provenance.template_id`: synthetic records.
    Template,
    /// The record's own id: records without provenance (real seed reports).
    Record,
}

/// The group a record is split with: its template, or itself when it has none.
pub fn split_group(record: &Record) -> (GroupKind, &str) {
    match &record.provenance {
        Some(provenance) => (GroupKind::Template, provenance.template_id.as_str()),
        None => (GroupKind::Record, record.id.as_str()),
    }
}

/// A number in [0, 1) from a blake3 hash of the seed and the group.
fn group_draw(kind: GroupKind, id: &str, seed: u64) -> f64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"watchfire tasks split\0");
    hasher.update(&seed.to_le_bytes());
    hasher.update(match kind {
        GroupKind::Template => b"template\0",
        GroupKind::Record => b"record\0\0\0",
    });
    hasher.update(id.as_bytes());
    let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8].try_into().unwrap_or_default();
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The split of each record: a group goes to validation when its draw is
/// below `share`. With two groups or more, both sides get at least one: if
/// one side came out empty, the group whose draw is nearest to it moves
/// across. Records of one group always share a side.
pub fn assign_splits(records: &[Record], share: f64, seed: u64) -> Vec<Split> {
    let mut groups: BTreeMap<(GroupKind, &str), (f64, Split)> = BTreeMap::new();
    for record in records {
        let (kind, id) = split_group(record);
        groups.entry((kind, id)).or_insert_with(|| {
            let draw = group_draw(kind, id, seed);
            (draw, if draw < share { Split::Validation } else { Split::Train })
        });
    }
    if groups.len() >= 2 {
        let validation = groups.values().filter(|(_, side)| *side == Split::Validation).count();
        let by_draw = |a: &(f64, Split), b: &(f64, Split)| a.0.total_cmp(&b.0);
        // The group whose draw is nearest to the empty side moves across.
        let moved = if validation == 0 {
            let lowest = groups.iter().min_by(|a, b| by_draw(a.1, b.1));
            lowest.map(|(key, _)| (*key, Split::Validation))
        } else if validation == groups.len() {
            let highest = groups.iter().max_by(|a, b| by_draw(a.1, b.1));
            highest.map(|(key, _)| (*key, Split::Train))
        } else {
            None
        };
        if let Some((key, side)) = moved
            && let Some(group) = groups.get_mut(&key)
        {
            group.1 = side;
        }
    }
    records.iter().map(|record| groups[&split_group(record)].1).collect()
}

// ---------------------------------------------------------------------------
// The whole build

/// What to build.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Tasks to emit; each record's examples are written in [`Task::ALL`] order.
    pub tasks: Vec<Task>,
    /// Target share of groups (templates, or records without one) in validation.
    pub validation_share: f64,
    /// Use the first this many records in input order; 0 for all.
    pub max_records: usize,
    /// The stage seed: the split hashes it.
    pub seed: u64,
}

/// Counts for one side of the split.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitStats {
    pub records: usize,
    /// Distinct templates (and template-less records) on this side.
    pub groups: usize,
    /// Examples per task.
    pub examples: BTreeMap<&'static str, usize>,
    /// Key facts over all examples of this side.
    pub key_facts: usize,
}

/// How the alert fields were filled, over the records used.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AlertStats {
    pub hazard_from_entity: usize,
    pub hazard_from_scene: usize,
    pub unknown_place: usize,
    pub unknown_time: usize,
    pub unknown_severity: usize,
}

/// `stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskStats {
    pub records_read: usize,
    pub records_used: usize,
    pub validation_share: f64,
    /// Records split by their template.
    pub split_by_template: usize,
    /// Records without provenance, split by their id.
    pub split_by_record_id: usize,
    pub train: SplitStats,
    pub validation: SplitStats,
    /// Entity spans whose type the schema lacks; no task uses them.
    pub entities_outside_schema: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertStats>,
}

/// The examples of both sides and the figures about them.
#[derive(Debug, Clone, Default)]
pub struct Built {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub stats: TaskStats,
}

/// Builds every example of every record. Fails when the schema is empty
/// (nothing says which facts are key), when there is no record, or when a
/// span does not fit its text.
pub fn build(
    records: Vec<Record>,
    schema: &EntitySchema,
    config: &TaskConfig,
) -> Result<Built, String> {
    if schema.is_empty() {
        return Err("the recipe has no `schema`: the `tasks` stage needs it to tell key entity \
                    types from peripheral ones"
            .to_string());
    }
    let records_read = records.len();
    let mut records = records;
    if config.max_records > 0 {
        records.truncate(config.max_records);
    }
    if records.is_empty() {
        return Err("no records to make examples from".to_string());
    }
    let tasks: Vec<Task> = Task::ALL.into_iter().filter(|t| config.tasks.contains(t)).collect();
    let splits = assign_splits(&records, config.validation_share, config.seed);
    let prompts: Vec<(Task, String)> =
        tasks.iter().map(|&task| (task, instruction(task, schema))).collect();

    let mut built = Built::default();
    let stats = &mut built.stats;
    stats.records_read = records_read;
    stats.records_used = records.len();
    stats.validation_share = config.validation_share;
    let mut alert_stats = AlertStats::default();
    let mut groups: [BTreeSet<(GroupKind, &str)>; 2] = Default::default();
    for (record, split) in records.iter().zip(&splits) {
        let (gold, outside) = gold_entities(record, schema)?;
        stats.entities_outside_schema += outside;
        let group = split_group(record);
        match group.0 {
            GroupKind::Template => stats.split_by_template += 1,
            GroupKind::Record => stats.split_by_record_id += 1,
        }
        let (side, side_stats, side_groups) = match split {
            Split::Train => (&mut built.train, &mut stats.train, &mut groups[0]),
            Split::Validation => (&mut built.validation, &mut stats.validation, &mut groups[1]),
        };
        side_stats.records += 1;
        side_groups.insert(group);
        for (task, instruction) in &prompts {
            let (target, facts) = match task {
                Task::Entities => {
                    let pairs = gold.iter().map(|e| (e.kind.as_str(), e.value.as_str()));
                    (render_entities(pairs), key_facts(&gold))
                }
                Task::Summary => (summary(&record.scene, &gold), key_facts(&gold)),
                Task::Alert => {
                    let alert = alert(record, &gold);
                    if alert.hazard_from_scene {
                        alert_stats.hazard_from_scene += 1;
                    } else {
                        alert_stats.hazard_from_entity += 1;
                    }
                    alert_stats.unknown_place += usize::from(alert.fields.place == UNKNOWN);
                    alert_stats.unknown_time += usize::from(alert.fields.time == UNKNOWN);
                    alert_stats.unknown_severity += usize::from(alert.fields.severity == UNKNOWN);
                    (alert.fields.line(), alert.key_facts)
                }
            };
            *side_stats.examples.entry(task.name()).or_default() += 1;
            side_stats.key_facts += facts.len();
            let offset = instruction.chars().count() + REPORT_HEADER.chars().count();
            let spans = gold
                .iter()
                .map(|e| PromptSpan {
                    kind: e.kind.clone(),
                    role: e.role,
                    value: e.value.clone(),
                    start: offset + e.start,
                    end: offset + e.end,
                })
                .collect();
            side.push(Example {
                id: format!("{}:{}", record.id, task.name()),
                task: *task,
                source_id: record.id.clone(),
                template_id: record.provenance.as_ref().map(|p| p.template_id.clone()),
                prompt: with_report(instruction, &record.text),
                target,
                key_facts: facts,
                spans,
            });
        }
    }
    stats.train.groups = groups[0].len();
    stats.validation.groups = groups[1].len();
    if tasks.contains(&Task::Alert) {
        stats.alert = Some(alert_stats);
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Provenance;
    use crate::synth::testkit::{report, tiny_schema, tiny_seed};

    fn gold(record: &Record) -> Vec<GoldEntity> {
        gold_entities(record, &tiny_schema()).unwrap().0
    }

    fn with_template(mut record: Record, template: &str) -> Record {
        record.synthetic = true;
        record.provenance = Some(Provenance {
            generator: "test".into(),
            mode: "hierarchical".into(),
            template_id: template.into(),
            seed_ids: vec![],
            stage_key: "k".into(),
        });
        record
    }

    fn config() -> TaskConfig {
        TaskConfig { tasks: Task::ALL.to_vec(), validation_share: 0.1, max_records: 0, seed: 7 }
    }

    /// The record the book shows, rebuilt.
    fn book_record() -> Record {
        let text = "At 07:51 a blue hatchback heading north on Gull Point Marina crossed the \
            centre line and hit a blue Nissan Micra head-on. The car, plate PE-9907, caught fire \
            on impact and thick black smoke spread across the road. Ambulance crews transported \
            five occupants, one in a critical condition.";
        let record = report(
            "syn-0001190",
            "traffic_collision",
            text,
            &[
                ("time", "07:51"),
                ("vehicle", "blue hatchback"),
                ("location", "Gull Point Marina"),
                ("vehicle", "blue Nissan Micra"),
                ("plate", "PE-9907"),
                ("hazard", "thick black smoke"),
                ("injured", "five"),
            ],
            &[("severity", "medium"), ("time_of_day", "morning")],
        );
        with_template(record, "0cfa3e9a0836d508")
    }

    #[test]
    fn targets_of_the_book_record() {
        let record = book_record();
        let gold = gold(&record);
        assert_eq!(
            render_entities(gold.iter().map(|e| (e.kind.as_str(), e.value.as_str()))),
            "time: 07:51\nvehicle: blue hatchback\nlocation: Gull Point Marina\n\
             vehicle: blue Nissan Micra\nplate: PE-9907\nhazard: thick black smoke\ninjured: five"
        );
        assert_eq!(
            summary(&record.scene, &gold),
            "Traffic collision reported at Gull Point Marina at 07:51, with five injured. \
             Key details: vehicle blue hatchback and blue Nissan Micra; plate PE-9907; \
             hazard thick black smoke."
        );
        let alert = alert(&record, &gold);
        assert_eq!(
            alert.fields.line(),
            "TRAFFIC COLLISION | Gull Point Marina | 07:51 | medium | thick black smoke"
        );
        let facts: Vec<(&str, &str)> =
            alert.key_facts.iter().map(|f| (f.kind.as_str(), f.value.as_str())).collect();
        assert_eq!(
            facts,
            [("location", "Gull Point Marina"), ("time", "07:51"), ("hazard", "thick black smoke")]
        );
        assert_eq!(parse_alert(&alert.fields.line()), Some(alert.fields));
    }

    #[test]
    fn summary_states_every_key_fact_and_no_peripheral_one() {
        for record in tiny_seed() {
            let gold = gold(&record);
            let text = summary(&record.scene, &gold);
            for fact in key_facts(&gold) {
                assert!(text.contains(&fact.value), "{}: {text} lacks {}", record.id, fact.value);
            }
            for entity in gold.iter().filter(|e| e.role == EntityRole::Peripheral) {
                if !key_facts(&gold).iter().any(|f| f.value.contains(&entity.value)) {
                    assert!(!text.contains(&entity.value), "{}: {text}", record.id);
                }
            }
            assert!(!text.contains('\n'));
        }
        // c1: two vehicles, a fatality written as a word; no "..".
        let c1 = &tiny_seed()[0];
        assert_eq!(
            summary(&c1.scene, &gold(c1)),
            "Collision reported at Harbor Road at 22:40, with One dead. \
             Key details: vehicle silver sedan and pickup truck."
        );
        let c2 = &tiny_seed()[1];
        assert_eq!(
            summary(&c2.scene, &gold(c2)),
            "Collision reported at Maple Avenue and 5th Street at 7:15 a.m. \
             Key details: vehicle delivery van and hatchback; plate 7KXP214."
        );
    }

    #[test]
    fn missing_fields_are_unknown_and_hazard_comes_from_the_scene() {
        let bare = report("b", "hazmat_spill", "Something leaked.", &[], &[]);
        let alert = alert(&bare, &gold(&bare));
        assert_eq!(
            alert.fields.line(),
            "HAZMAT SPILL | unknown | unknown | unknown | hazardous material"
        );
        assert!(alert.hazard_from_scene && alert.key_facts.is_empty());
        assert_eq!(summary("hazmat_spill", &[]), "Hazmat spill reported.");
        assert_eq!(render_entities([]), "none");
        assert!(parse_entities("none").is_empty());

        // a4 has no hazard entity: the scene decides; f1 has two, the first wins.
        let seed = tiny_seed();
        let a4 = &seed[11];
        assert_eq!(
            super::alert(a4, &gold(a4)).fields.line(),
            "ASSAULT | Canal Walk | 19:05 | low | violence"
        );
        let f1 = &seed[4];
        assert_eq!(
            super::alert(f1, &gold(f1)).fields.line(),
            "FIRE | 22 Elm Court | 03:12 | medium | kitchen fire"
        );
        assert_eq!(scene_hazard("caution_and_advice"), "caution and advice");
        assert_eq!(scene_hazard("structure_fire"), "fire");

        // A field with a line break or a bar still reads back as five fields.
        let odd = report(
            "o",
            "x",
            "Near Dock | Pier\nRoad, at 5 pm.",
            &[("location", "Dock | Pier\nRoad")],
            &[("severity", "high")],
        );
        let line = super::alert(&odd, &gold(&odd)).fields.line();
        assert_eq!(line, "X | Dock / Pier Road | unknown | high | x");
        assert_eq!(parse_alert(&line).unwrap().place, "Dock / Pier Road");
        assert_eq!(parse_alert("A | b"), None);
    }

    #[test]
    fn entity_lines_round_trip_exactly() {
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("time", "22:40")],
            vec![("location", "Maple Avenue and 5th Street"), ("time", "7:15 a.m.")],
            vec![("witness_remark", "she said: \"run\"")],
            vec![("odd: type", "a\\b"), ("x", "line one\nline two\r\n"), ("x", "\\n literal")],
            vec![("x", ""), ("x", "  spaced  "), ("none", "none"), ("x", "trailing\\")],
            vec![("wé", "Zürich — 9:40"), ("a\\:b", ": leading colon")],
        ];
        for case in cases {
            let text = render_entities(case.iter().copied());
            let back = parse_entities(&text);
            let back: Vec<(&str, &str)> =
                back.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(back, case, "{text:?}");
            assert_eq!(text.lines().count(), case.len().max(1), "{text:?}");
        }
        // Lenient on model output: CRLF, blank and malformed lines.
        let parsed = parse_entities("time: 22:40\r\n\ngarbage\nlocation: Harbor Road\n");
        assert_eq!(
            parsed,
            [("time".to_string(), "22:40".to_string()), ("location".into(), "Harbor Road".into())]
        );
    }

    #[test]
    fn gold_entities_follow_the_text_and_skip_unknown_types() {
        let mut record = tiny_seed()[2].clone();
        record.entities.reverse();
        record.entities[0].value = None;
        record.entities.push(crate::corpus::Entity {
            kind: "colour".into(),
            start: 0,
            end: 5,
            value: Some("Dense".into()),
        });
        let (gold, outside) = gold_entities(&record, &tiny_schema()).unwrap();
        assert_eq!(outside, 1);
        let kinds: Vec<&str> = gold.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["weather", "location", "time", "injured", "vehicle"]);
        assert_eq!(gold.last().unwrap().value, "grey hatchback");

        record.entities[0].end = 10_000;
        let err = gold_entities(&record, &tiny_schema()).unwrap_err();
        assert!(err.contains("does not fit the text"), "{err}");
    }

    #[test]
    fn key_facts_are_unique_and_key_only() {
        let record = report(
            "r",
            "fire",
            "Smoke at 22 Elm Court; again smoke at 22 Elm Court, a passer-by said.",
            &[("location", "22 Elm Court"), ("location", "22 Elm Court"), ("weather", "passer-by")],
            &[],
        );
        let facts = key_facts(&gold(&record));
        assert_eq!(facts, [KeyFact { kind: "location".into(), value: "22 Elm Court".into() }]);
    }

    /// Synthetic records over `templates` templates, `per` each, plus `real` seed records.
    fn corpus(templates: usize, per: usize, real: usize) -> Vec<Record> {
        let seed = tiny_seed();
        let mut out = Vec::new();
        for t in 0..templates {
            for n in 0..per {
                let mut record =
                    with_template(seed[(t + n) % seed.len()].clone(), &format!("t{t}"));
                record.id = format!("syn-{t}-{n}");
                out.push(record);
            }
        }
        out.extend(seed.into_iter().cycle().take(real).enumerate().map(|(n, mut r)| {
            r.id = format!("real-{n}");
            r
        }));
        out
    }

    #[test]
    fn no_template_straddles_the_split_and_both_sides_are_filled() {
        for (templates, share) in [(2, 0.1), (3, 0.01), (3, 0.99), (40, 0.1), (40, 0.5), (200, 0.2)]
        {
            for seed in 0..5 {
                let records = corpus(templates, 3, 0);
                let splits = assign_splits(&records, share, seed);
                let mut side: BTreeMap<&str, Split> = BTreeMap::new();
                for (record, split) in records.iter().zip(&splits) {
                    let template = split_group(record).1;
                    assert_eq!(*side.entry(template).or_insert(*split), *split, "{template}");
                }
                assert!(splits.contains(&Split::Train), "{templates} {share} {seed}");
                assert!(splits.contains(&Split::Validation), "{templates} {share} {seed}");
            }
        }
        // About the share of templates, not records.
        let records = corpus(400, 2, 0);
        let validation =
            assign_splits(&records, 0.1, 3).iter().filter(|s| **s == Split::Validation).count();
        assert!((40..=120).contains(&validation), "{validation} of 800 records");
        // One template: everything on one side.
        let one = assign_splits(&corpus(1, 5, 0), 0.1, 1);
        assert!(one.iter().all(|s| *s == one[0]));
    }

    #[test]
    fn records_without_provenance_are_split_by_id() {
        let records = corpus(0, 0, 60);
        let splits = assign_splits(&records, 0.3, 11);
        assert!(splits.contains(&Split::Train) && splits.contains(&Split::Validation));
        let again = assign_splits(&records, 0.3, 11);
        assert_eq!(splits, again);
        assert_ne!(splits, assign_splits(&records, 0.3, 12), "the seed moves the split");
        let built = build(records, &tiny_schema(), &config()).unwrap();
        assert_eq!(built.stats.split_by_record_id, 60);
        assert!(built.train.iter().chain(&built.validation).all(|e| e.template_id.is_none()));
    }

    #[test]
    fn build_writes_every_task_per_record_and_counts_them() {
        let records = corpus(10, 4, 2);
        let built = build(records.clone(), &tiny_schema(), &config()).unwrap();
        let stats = &built.stats;
        assert_eq!((stats.records_read, stats.records_used), (42, 42));
        assert_eq!((stats.split_by_template, stats.split_by_record_id), (40, 2));
        assert_eq!(built.train.len() + built.validation.len(), 42 * 3);
        assert_eq!(stats.train.records * 3, built.train.len());
        assert_eq!(stats.train.examples["summary"], stats.train.records);
        let tasks: Vec<Task> = built.train.iter().take(3).map(|e| e.task).collect();
        assert_eq!(tasks, Task::ALL);
        let alert = stats.alert.as_ref().unwrap();
        assert_eq!(alert.hazard_from_entity + alert.hazard_from_scene, 42);

        let templates = |examples: &[Example]| -> BTreeSet<String> {
            examples.iter().filter_map(|e| e.template_id.clone()).collect()
        };
        assert!(templates(&built.train).is_disjoint(&templates(&built.validation)));

        for example in built.train.iter().chain(&built.validation) {
            let record = records.iter().find(|r| r.id == example.source_id).unwrap();
            assert!(example.prompt.ends_with(&format!("\n\nReport:\n{}", record.text)));
            assert_eq!(example.id, format!("{}:{}", record.id, example.task.name()));
            if example.task != Task::Entities {
                for fact in &example.key_facts {
                    assert!(example.target.contains(&fact.value), "{}", example.target);
                }
            } else {
                let parsed = parse_entities(&example.target);
                let expected: Vec<(String, String)> =
                    gold(record).into_iter().map(|e| (e.kind, e.value)).collect();
                assert_eq!(parsed, expected);
            }
        }

        let only =
            TaskConfig { tasks: vec![Task::Alert, Task::Summary], max_records: 5, ..config() };
        let built = build(records, &tiny_schema(), &only).unwrap();
        assert_eq!(built.stats.records_used, 5);
        let tasks: BTreeSet<Task> =
            built.train.iter().chain(&built.validation).map(|e| e.task).collect();
        assert_eq!(tasks, BTreeSet::from([Task::Summary, Task::Alert]));
    }

    #[test]
    fn build_refuses_an_empty_schema_and_no_records() {
        let err = build(corpus(1, 1, 0), &EntitySchema::default(), &config()).unwrap_err();
        assert!(err.contains("schema"), "{err}");
        let err = build(Vec::new(), &tiny_schema(), &config()).unwrap_err();
        assert!(err.contains("no records"), "{err}");
    }

    #[test]
    fn instructions_name_the_schema_types() {
        let schema = tiny_schema();
        let entities = instruction(Task::Entities, &schema);
        assert!(entities.contains("Types: bystander_detail, fatalities, hazard,"), "{entities}");
        let summary = instruction(Task::Summary, &schema);
        assert!(
            summary
                .ends_with("fatalities, hazard, injured, location, plate, time, vehicle, weapon.")
        );
        assert_eq!(
            prompt(Task::Alert, &schema, "Fire."),
            format!("{}\n\nReport:\nFire.", instruction(Task::Alert, &schema))
        );
    }
}
