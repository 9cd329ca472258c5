//! The LLM backend of `scene` and `detail`: prompts, JSON schemas, parsing
//! the answers, and the reasons an answer is not used.
//!
//! Both stages ask a small instruction model for JSON under a JSON schema,
//! which the peer engine (mistralrs with llguidance) enforces while
//! decoding, so an answer that is not cut off by `max_tokens` always parses.
//! Everything the schema promises is checked again here, so canned answers
//! and unconstrained engines are handled the same way.
//!
//! **scene** asks, per scene category, for a list of new templates, showing
//! a few delexicalised seed reports of the scene as examples. The schema
//! only admits strings whose slots are `{type}` or `{type#N}` for the slot
//! types of that scene's seed. Each proposed template is then checked, and
//! dropped with the first reason that applies (see [`TEMPLATE_REASONS`]).
//! Slots are renumbered in order of first appearance, so `{vehicle#3}` alone
//! becomes `{vehicle}`.
//!
//! **detail** draws a scene, a template and attributes c as the template
//! backend does, then asks for one value per slot. The schema has one string
//! property per slot; time slots must be clock times inside the
//! `time_of_day` window, counts must be numbers severity allows, vehicles
//! must be seed vehicles of the scene, plates must follow the seed's
//! letter/digit pattern, and free text may not hold braces, quotes,
//! backslashes or line breaks. The record text is the template with the
//! values put in by us, so every entity span is exact by construction. An
//! answer that cannot be used becomes a record flagged with the
//! [`INVALID_ATTRIBUTE`] attribute (`llm_bad_time: ...`); the `filter` stage
//! drops it and counts its reason (see [`INVALID_REASONS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::corpus::{Entity, Provenance, Record};
use crate::model::tokenizer::ChatMessage;
use crate::stage::{ParamError, StageError};
use crate::synth::delex::delexicalise;
use crate::synth::slot_class::{
    DayPart, Severity, SlotClass, denies_count, number_word, parse_clock, parse_count, time_word,
};
use crate::synth::template::{
    Backend, ClockStyle, Mode, Piece, Shape, SlotSpec, Template, parse, render, slot_token,
};

/// The input slot that holds the model.
pub const MODEL_INPUT: &str = "model";
/// `provenance.generator` of records the LLM backend writes.
pub const GENERATOR: &str = "watchfire detail llm";
/// The attribute that flags a record whose answer could not be used; its
/// value is `REASON: detail`.
pub const INVALID_ATTRIBUTE: &str = "invalid";

/// Why `detail` could not use an answer, as the filter counts it.
pub const INVALID_REASONS: &[&str] = &[
    "llm_request_failed",
    "llm_truncated",
    "llm_unparsable",
    "llm_missing_slot",
    "llm_bad_value",
    "llm_bad_time",
    "llm_bad_count",
];

/// Why `scene` drops a proposed template, in the order it checks.
pub const TEMPLATE_REASONS: &[&str] = &[
    "bad_slot",
    "bad_characters",
    "too_short",
    "too_long",
    "too_many_slots",
    "unknown_slot",
    "no_key_slot",
    "contradiction",
    "copies_example",
    "duplicate",
];

/// Templates asked for in one request.
pub const TEMPLATES_PER_REQUEST: usize = 4;
/// Requests a scene may use per request it needs, before it gives up.
pub const SCENE_ATTEMPTS: usize = 2;
/// Length bounds of a template, in characters.
pub const TEMPLATE_MIN_CHARS: usize = 30;
pub const TEMPLATE_MAX_CHARS: usize = 400;
/// The most characters of text around one slot of a proposed template.
pub const SEGMENT: usize = 120;
/// The most slots in a proposed template.
pub const MAX_SLOTS: usize = 8;
/// Highest slot index a template may use (`{vehicle#3}`).
const MAX_SLOT_INDEX: u32 = 3;
/// Vehicle slots are held to the scene's seed vehicles when it has at most
/// this many; otherwise they are free text.
const MAX_ENUM: usize = 64;
/// Characters a free-text value may not contain.
const FORBIDDEN: &[char] = &['{', '}', '\n', '\r', '"', '\\'];
const FREE_TEXT: &str = "[^{}\\n\\r\"\\\\]";

/// Settings of the model calls; the `llm` param of `scene` and `detail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LlmParams {
    /// Most tokens the model may write per request. A `scene` answer cut off here keeps
    /// the templates it finished; a `detail` answer cut off here is dropped.
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to this.
    pub top_p: f64,
    /// Examples per prompt: delexicalised seed reports of the scene (`scene`), seed values
    /// per slot type (`detail`).
    pub examples: usize,
}

impl Default for LlmParams {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.7, top_p: 0.95, examples: 3 }
    }
}

impl LlmParams {
    pub fn validate(&self) -> Result<(), ParamError> {
        if !(8..=8192).contains(&self.max_tokens) {
            return Err(ParamError::new("llm.max_tokens", "must be between 8 and 8192"));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(ParamError::new("llm.temperature", "must be between 0 and 2"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ParamError::new("llm.top_p", "must be in (0, 1]"));
        }
        if !(1..=20).contains(&self.examples) {
            return Err(ParamError::new("llm.examples", "must be between 1 and 20"));
        }
        Ok(())
    }

    /// Sampler settings for one request.
    pub fn sampling(&self, seed: u64) -> Sampling {
        Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed,
        }
    }
}

/// Checks the `llm` param against `backend`: it is only read by the LLM backend.
pub fn validate_backend(backend: Backend, llm: Option<&LlmParams>) -> Result<(), ParamError> {
    match (backend, llm) {
        (Backend::Template, Some(_)) => {
            Err(ParamError::new("llm", "is only read with `backend: llm`")
                .with_help("add `backend: llm` (and a `model` input), or drop `llm`"))
        }
        (_, Some(llm)) => llm.validate(),
        _ => Ok(()),
    }
}

/// The `model` input is needed with `backend: llm` and refused otherwise, so
/// that a model never changes the cache key of a stage that does not read it.
pub fn check_model_input(backend: Backend, bound: &[&str]) -> Result<(), ParamError> {
    let has = bound.contains(&MODEL_INPUT);
    match backend {
        Backend::Llm if !has => Err(ParamError::new(MODEL_INPUT, "`backend: llm` needs a model")
            .with_help("add `inputs: { model: MODEL_STAGE }`, naming a `model` stage")),
        Backend::Template if has => {
            Err(ParamError::new(MODEL_INPUT, "the template backend reads no model")
                .with_help("add `backend: llm` to the stage's params, or drop this input"))
        }
        _ => Ok(()),
    }
}

/// Sampler settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// What the model wrote for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub text: String,
    /// Generation stopped at `max_tokens`, so the JSON is unfinished.
    pub truncated: bool,
}

/// Anything that answers a chat under a JSON schema: the peer engine, or
/// canned answers in tests.
pub trait Completer {
    /// The model's answer, or why the request failed.
    fn complete_json(
        &self,
        messages: &[ChatMessage],
        schema: &Value,
        sampling: &Sampling,
    ) -> Result<Answer, String>;
}

/// Loads the model of a `model` input (an artifact folder or a GGUF file).
#[cfg(feature = "mistralrs")]
pub fn load_model(path: &Path) -> Result<Box<dyn Completer>, StageError> {
    struct Peer(crate::peer::Peer);
    impl Completer for Peer {
        fn complete_json(
            &self,
            messages: &[ChatMessage],
            schema: &Value,
            sampling: &Sampling,
        ) -> Result<Answer, String> {
            use crate::peer::{PeerError, PeerSampling};
            let opts = PeerSampling {
                max_tokens: sampling.max_tokens,
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                seed: sampling.seed,
            };
            // llguidance, mistralrs's constraint engine, allows free-form JSON
            // whitespace by default, and a small model spends its token budget
            // on blank lines; `x-guidance` fixes the separators to `, ` and
            // `: ` and allows no other whitespace.
            let mut schema = schema.clone();
            if let Some(object) = schema.as_object_mut() {
                object.insert(
                    "x-guidance".into(),
                    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                );
            }
            match self.0.complete_json(messages, &schema, &opts) {
                Ok(text) => Ok(Answer { text, truncated: false }),
                Err(PeerError::Truncated { text, .. }) => Ok(Answer { text, truncated: true }),
                // Parsed and rejected here, with the answer in the reason.
                Err(PeerError::NotJson { text, .. }) => Ok(Answer { text, truncated: false }),
                Err(err) => Err(err.to_string()),
            }
        }
    }
    let peer = crate::peer::Peer::load(path).map_err(|err| {
        StageError::failed(format!("could not load the model {}: {err}", path.display()))
    })?;
    Ok(Box::new(Peer(peer)))
}

/// Without the `mistralrs` feature there is no engine to run the model.
#[cfg(not(feature = "mistralrs"))]
pub fn load_model(path: &Path) -> Result<Box<dyn Completer>, StageError> {
    Err(StageError::failed(format!(
        "`backend: llm` needs watchfire built with the `mistralrs` feature (on by default); \
         this binary cannot run the model {}",
        path.display()
    )))
}

/// The sampler seed of request `n` of a stream (a scene, or `detail`):
/// requests differ from each other and from other stages.
pub fn request_seed(stage_seed: u64, stream: &str, n: u64) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&stage_seed.to_le_bytes());
    hasher.update(stream.as_bytes());
    hasher.update(&[0]);
    hasher.update(&n.to_le_bytes());
    let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8].try_into().unwrap_or_default();
    u64::from_le_bytes(bytes)
}

/// Slot types that carry a checked fact: times, places, plates, counts and
/// vehicles. A template needs at least one.
pub fn is_key_slot(kind: &str) -> bool {
    SlotClass::of(kind) != SlotClass::Categorical
}

/// A scene category's name as prose: `traffic_collision` -> `traffic collision`.
fn prose(name: &str) -> String {
    name.replace(['_', '-'], " ")
}

/// Escapes the regex meta characters of `text`.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn clip(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

// ---------------------------------------------------------------------------
// scene

/// What the scene prompts know about one scene category of the seed.
#[derive(Debug, Clone)]
pub struct SceneSeed {
    pub scene: String,
    /// (seed id, delexicalised report as template text).
    pub examples: Vec<(String, String)>,
    /// Slot type -> the shape its seed values have most often.
    pub shapes: BTreeMap<String, Shape>,
}

/// One [`SceneSeed`] per scene category, in name order.
pub fn scene_seeds(seed: &[Record]) -> Vec<SceneSeed> {
    let mut by_scene: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for record in seed {
        by_scene.entry(record.scene.as_str()).or_default().push(record);
    }
    by_scene
        .into_iter()
        .map(|(scene, records)| {
            let mut shapes: BTreeMap<String, Vec<(Shape, usize)>> = BTreeMap::new();
            let mut examples = Vec::new();
            for record in records {
                let report = delexicalise(record);
                for ((kind, _), shape) in &report.shapes {
                    let seen = shapes.entry(kind.clone()).or_default();
                    match seen.iter_mut().find(|(s, _)| s == shape) {
                        Some((_, n)) => *n += 1,
                        None => seen.push((shape.clone(), 1)),
                    }
                }
                let mut pieces = Vec::new();
                for (n, sentence) in report.sentences.iter().enumerate() {
                    if n > 0 {
                        pieces.push(Piece::Text(" ".to_string()));
                    }
                    pieces.extend(sentence.pieces.iter().cloned());
                }
                examples.push((record.id.clone(), render(&merge(pieces))));
            }
            let shapes = shapes
                .into_iter()
                .filter_map(|(kind, seen)| {
                    // The most frequent shape; the first seen wins a tie.
                    let best = seen.iter().rev().max_by_key(|(_, n)| *n)?.0.clone();
                    Some((kind, best))
                })
                .collect();
            SceneSeed { scene: scene.to_string(), examples, shapes }
        })
        .collect()
}

fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text(last)), Piece::Text(text)) => last.push_str(&text),
            (_, piece) => merged.push(piece),
        }
    }
    merged
}

/// The chat that asks for `wanted` new templates of a scene, showing the
/// examples at `shown` (indices into `scene.examples`).
pub fn scene_messages(scene: &SceneSeed, shown: &[usize], wanted: usize) -> Vec<ChatMessage> {
    let system = "You write templates for short public-safety incident reports. A template is \
        the text of a report in which every fact is replaced by a typed slot in braces, such as \
        {time} or {location}. Answer in JSON.";
    let slots: Vec<String> = scene.shapes.keys().map(|kind| slot_token(kind, 1)).collect();
    let mut user = format!("Scene category: {}.\n", prose(&scene.scene));
    user.push_str(&format!("Slots you may use: {}.\n", slots.join(", ")));
    user.push_str(
        "Write a second, different value of the same type as {type#2}, for example {vehicle#2}.\n",
    );
    user.push_str("Example templates:\n");
    for (n, &at) in shown.iter().enumerate() {
        user.push_str(&format!("{}. {}\n", n + 1, scene.examples[at].1));
    }
    let what = if wanted == 1 {
        "one new template".to_string()
    } else {
        format!("{wanted} new templates")
    };
    user.push_str(&format!(
        "Write {what} for a {} report, each one to three sentences with at least one slot, \
         different from the examples.",
        prose(&scene.scene)
    ));
    vec![ChatMessage::new("system", system), ChatMessage::new("user", user)]
}

/// The regex a template string must match: text without braces, quotes,
/// backslashes or line breaks, and one to [`MAX_SLOTS`] slots of the given
/// types, with at most [`SEGMENT`] characters of text before, between and
/// after them. The bounds keep a small model from writing prose without a
/// slot until its token budget runs out.
pub fn template_pattern<'a>(types: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = types.into_iter().map(escape_regex).collect();
    format!(
        "^{FREE_TEXT}{{0,{SEGMENT}}}(?:\\{{(?:{})(?:#[2-{MAX_SLOT_INDEX}])?\\}}{FREE_TEXT}{{0,{SEGMENT}}}){{1,{MAX_SLOTS}}}$",
        names.join("|")
    )
}

/// The schema of a scene answer: `{"templates": [up to `wanted` strings]}`.
pub fn scene_schema(scene: &SceneSeed, wanted: usize) -> Value {
    json!({
        "type": "object",
        "properties": {
            "templates": {
                "type": "array",
                "minItems": 1,
                "maxItems": wanted.max(1),
                // No minLength/maxLength beside the pattern: llguidance cannot
                // intersect a length bound with this regex and refuses the grammar.
                // `check_template` enforces the lengths instead.
                "items": {
                    "type": "string",
                    "pattern": template_pattern(scene.shapes.keys().map(String::as_str)),
                },
            },
        },
        "required": ["templates"],
        "additionalProperties": false,
    })
}

/// The template strings of a scene answer. An answer cut off by `max_tokens`
/// keeps the strings it completed (`truncated`); `None` when there are none.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneAnswer {
    pub templates: Vec<String>,
    pub truncated: bool,
}

pub fn parse_scene_answer(answer: &str) -> Option<SceneAnswer> {
    if let Ok(value) = serde_json::from_str::<Value>(answer.trim()) {
        let items = value.get("templates")?.as_array()?;
        let templates = items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        return Some(SceneAnswer { templates, truncated: false });
    }
    // Cut off: keep every string literal completed after the list opened.
    let start = answer.find('[')? + 1;
    let mut templates = Vec::new();
    let mut rest = &answer[start..];
    while let Some(open) = rest.find('"') {
        let body = &rest[open + 1..];
        let mut escaped = false;
        let Some(close) = body.char_indices().find_map(|(at, c)| {
            let found = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            found.then_some(at)
        }) else {
            break;
        };
        let literal = &rest[open..open + 1 + close + 1];
        if let Ok(text) = serde_json::from_str::<String>(literal) {
            templates.push(text);
        }
        rest = &body[close + 1..];
    }
    (!templates.is_empty()).then_some(SceneAnswer { templates, truncated: true })
}

/// Lowercase words, for comparing a template with the examples.
fn normalised(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Checks one proposed template and makes it a [`Template`] of `scene`,
/// with slots renumbered and shapes taken from the seed; `seed_ids` are the
/// examples the prompt showed. Duplicates are the caller's to find.
pub fn check_template(
    text: &str,
    scene: &SceneSeed,
    seed_ids: &[String],
) -> Result<Template, &'static str> {
    let text = text.trim();
    let pieces = parse(text).map_err(|_| "bad_slot")?;
    let literal_braces =
        pieces.iter().any(|p| matches!(p, Piece::Text(t) if t.contains(['{', '}'])));
    if literal_braces || text.contains(['"', '\\']) || text.chars().any(char::is_control) {
        return Err("bad_characters");
    }
    let chars = text.chars().count();
    if chars < TEMPLATE_MIN_CHARS {
        return Err("too_short");
    }
    if chars > TEMPLATE_MAX_CHARS {
        return Err("too_long");
    }
    if pieces.iter().filter(|p| matches!(p, Piece::Slot { .. })).count() > MAX_SLOTS {
        return Err("too_many_slots");
    }
    let mut renumbered: BTreeMap<(String, u32), u32> = BTreeMap::new();
    let mut next: BTreeMap<String, u32> = BTreeMap::new();
    let mut slots = Vec::new();
    let mut out = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let Piece::Slot { kind, index } = piece else {
            out.push(piece);
            continue;
        };
        let Some(shape) = scene.shapes.get(&kind) else {
            return Err("unknown_slot");
        };
        let new = *renumbered.entry((kind.clone(), index)).or_insert_with(|| {
            let n = next.entry(kind.clone()).or_insert(0);
            *n += 1;
            slots.push(SlotSpec { kind: kind.clone(), index: *n, shape: shape.clone() });
            *n
        });
        out.push(Piece::Slot { kind, index: new });
    }
    if !slots.iter().any(|s| is_key_slot(&s.kind)) {
        return Err("no_key_slot");
    }
    let text = render(&out);
    if slots.iter().any(|s| denies_count(&text, SlotClass::of(&s.kind))) {
        return Err("contradiction");
    }
    let own = normalised(&text);
    if scene.examples.iter().any(|(_, example)| normalised(example) == own) {
        return Err("copies_example");
    }
    Ok(Template {
        id: Template::content_id(Mode::Hierarchical, Some(&scene.scene), &text),
        mode: Mode::Hierarchical,
        scene: Some(scene.scene.clone()),
        text,
        roles: Vec::new(),
        slots,
        seed_ids: seed_ids.to_vec(),
    })
}

/// A template `scene` dropped, for `stats.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedTemplate {
    pub reason: &'static str,
    pub text: String,
}

/// What the LLM backend of `scene` reports about one scene category.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LlmSceneFigures {
    pub seed_reports: usize,
    pub slot_types: Vec<String>,
    pub requests: usize,
    /// Requests whose answer was cut off by `max_tokens` (finished templates kept).
    pub truncated_answers: usize,
    /// Requests with no usable answer: the engine failed, or nothing parsed.
    pub failed_requests: usize,
    pub proposed: usize,
    pub templates: usize,
    pub rejected: BTreeMap<&'static str, usize>,
    pub rejected_templates: Vec<RejectedTemplate>,
}

/// `stats.json` of `scene` with `backend: llm`.
#[derive(Debug, Clone, Serialize)]
pub struct LlmSceneStats {
    pub backend: Backend,
    pub mode: Mode,
    pub templates: usize,
    pub requests: usize,
    pub proposed: usize,
    pub rejected: BTreeMap<&'static str, usize>,
    /// Why the first request without a usable answer failed: the engine's
    /// error, or the start of an answer that did not parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    pub scenes: BTreeMap<String, LlmSceneFigures>,
}

fn zero_counts(reasons: &[&'static str]) -> BTreeMap<&'static str, usize> {
    reasons.iter().map(|r| (*r, 0)).collect()
}

/// Asks the model for `wanted` templates per scene category, at most
/// [`SCENE_ATTEMPTS`] times as many requests as that needs; calls `asked`
/// after each request.
pub fn llm_templates(
    seed: &[Record],
    wanted: usize,
    params: &LlmParams,
    stage_seed: u64,
    model: &dyn Completer,
    mut asked: impl FnMut(),
) -> (Vec<Template>, LlmSceneStats) {
    let mut stats = LlmSceneStats {
        backend: Backend::Llm,
        mode: Mode::Hierarchical,
        templates: 0,
        requests: 0,
        proposed: 0,
        rejected: zero_counts(TEMPLATE_REASONS),
        first_failure: None,
        scenes: BTreeMap::new(),
    };
    let mut templates = Vec::new();
    let mut seen = BTreeSet::new();
    for scene in scene_seeds(seed) {
        let mut figures = LlmSceneFigures {
            seed_reports: scene.examples.len(),
            slot_types: scene.shapes.keys().cloned().collect(),
            rejected: zero_counts(TEMPLATE_REASONS),
            ..Default::default()
        };
        let budget = SCENE_ATTEMPTS * wanted.div_ceil(TEMPLATES_PER_REQUEST);
        let mut made = 0;
        while made < wanted && figures.requests < budget && !scene.shapes.is_empty() {
            let request_seed = request_seed(stage_seed, &scene.scene, figures.requests as u64);
            figures.requests += 1;
            let mut rng = ChaCha8Rng::seed_from_u64(request_seed);
            let mut order: Vec<usize> = (0..scene.examples.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            order.truncate(params.examples);
            let n = (wanted - made).min(TEMPLATES_PER_REQUEST);
            let messages = scene_messages(&scene, &order, n);
            let schema = scene_schema(&scene, n);
            let answer = model.complete_json(&messages, &schema, &params.sampling(request_seed));
            asked();
            let parsed = match answer {
                Ok(a) => match parse_scene_answer(&a.text) {
                    Some(parsed) => {
                        Ok(SceneAnswer { truncated: parsed.truncated || a.truncated, ..parsed })
                    }
                    None => {
                        let start: String = a.text.chars().take(120).collect();
                        Err(format!("the answer did not parse: {start:?}"))
                    }
                },
                Err(err) => Err(err),
            };
            let answer = match parsed {
                Ok(answer) => answer,
                Err(why) => {
                    figures.failed_requests += 1;
                    stats.first_failure.get_or_insert(why);
                    continue;
                }
            };
            figures.truncated_answers += usize::from(answer.truncated);
            let mut seed_ids: Vec<String> =
                order.iter().map(|&at| scene.examples[at].0.clone()).collect();
            seed_ids.sort();
            for text in answer.templates.into_iter().take(n) {
                figures.proposed += 1;
                let checked = check_template(&text, &scene, &seed_ids)
                    .and_then(|t| if seen.insert(t.id.clone()) { Ok(t) } else { Err("duplicate") });
                match checked {
                    Ok(template) => {
                        made += 1;
                        templates.push(template);
                    }
                    Err(reason) => {
                        *figures.rejected.entry(reason).or_default() += 1;
                        *stats.rejected.entry(reason).or_default() += 1;
                        figures.rejected_templates.push(RejectedTemplate { reason, text });
                    }
                }
            }
        }
        figures.templates = made;
        stats.requests += figures.requests;
        stats.proposed += figures.proposed;
        stats.scenes.insert(scene.scene.clone(), figures);
    }
    stats.templates = templates.len();
    (templates, stats)
}

// ---------------------------------------------------------------------------
// detail

/// Why an answer could not be used: one of [`INVALID_REASONS`] and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub detail: String,
}

impl Invalid {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    /// The value of the [`INVALID_ATTRIBUTE`] attribute.
    pub fn attribute(&self) -> String {
        format!("{}: {}", self.reason, self.detail)
    }
}

/// Reads an [`INVALID_ATTRIBUTE`] value back: its reason (`llm_invalid` when
/// the reason is not one of [`INVALID_REASONS`]) and detail.
pub fn invalid_reason(value: &str) -> (&'static str, String) {
    let (reason, detail) = value.split_once(": ").unwrap_or((value, ""));
    match INVALID_REASONS.iter().find(|r| **r == reason.trim()) {
        Some(known) => (known, detail.to_string()),
        None => ("llm_invalid", value.to_string()),
    }
}

/// The JSON property of a slot: `vehicle`, `vehicle_2`.
pub fn slot_property(spec: &SlotSpec) -> String {
    if spec.index == 1 { spec.kind.clone() } else { format!("{}_{}", spec.kind, spec.index) }
}

/// What one record is conditioned on.
#[derive(Debug, Clone)]
pub struct Conditions<'a> {
    pub scene: &'a str,
    pub attributes: &'a BTreeMap<String, String>,
    /// Seed values of the scene per slot type, the first few shown as examples.
    pub examples: &'a BTreeMap<String, Vec<String>>,
    /// Every seed vehicle of the scene, in seed order.
    pub vehicles: &'a [String],
}

impl Conditions<'_> {
    fn day_part(&self) -> Option<DayPart> {
        self.attributes.get("time_of_day").and_then(|v| DayPart::parse(v))
    }

    fn severity(&self) -> Option<Severity> {
        self.attributes.get("severity").and_then(|v| Severity::parse(v))
    }
}

/// Counts a slot may hold: singular slots one, fatalities 2-4, injured by
/// severity (as the template backend draws them).
fn allowed_counts(class: SlotClass, plural: bool, severity: Option<Severity>) -> Vec<u32> {
    if !plural {
        return vec![1];
    }
    let (low, high) = match (class, severity) {
        (SlotClass::Fatalities, _) => (2, 4),
        (_, Some(severity)) => severity.injured_range(),
        (_, None) => (1, 6),
    };
    let low = low.max(2);
    (low..=high.max(low)).collect()
}

/// `suffix` with its first a/p letter set for am or pm, keeping case and dots.
fn meridiem(suffix: &str, pm: bool) -> String {
    let mut done = false;
    suffix
        .chars()
        .map(|c| {
            if done || !matches!(c, 'a' | 'p' | 'A' | 'P') {
                return c;
            }
            done = true;
            let letter = if pm { 'p' } else { 'a' };
            if c.is_uppercase() { letter.to_ascii_uppercase() } else { letter }
        })
        .collect()
}

/// Clock times of a style inside a day part (any hour without one).
pub fn clock_pattern(style: ClockStyle, suffix: &str, part: Option<DayPart>) -> String {
    let hours: Vec<u32> = match part {
        Some(part) => {
            let (start, len) = part.span();
            (0..len / 60).map(|h| (start / 60 + h) % 24).collect()
        }
        None => (0..24).collect(),
    };
    let two = |hours: &[u32]| hours.iter().map(|h| format!("{h:02}")).collect::<Vec<_>>();
    match style {
        ClockStyle::H24 => {
            format!("^(?:{}):[0-5][0-9]{}$", two(&hours).join("|"), escape_regex(suffix))
        }
        ClockStyle::Compact => {
            format!("^(?:{})[0-5][0-9]{}$", two(&hours).join("|"), escape_regex(suffix))
        }
        ClockStyle::H12 => {
            let mut branches = Vec::new();
            for pm in [false, true] {
                let twelve: Vec<String> = hours
                    .iter()
                    .filter(|h| (**h >= 12) == pm)
                    .map(|h| if h % 12 == 0 { 12 } else { h % 12 }.to_string())
                    .collect();
                if !twelve.is_empty() {
                    let suffix = escape_regex(&meridiem(suffix, pm));
                    branches.push(format!("(?:{}):[0-5][0-9]{suffix}", twelve.join("|")));
                }
            }
            format!("^(?:{})$", branches.join("|"))
        }
    }
}

/// A plate's letter/digit pattern as a regex: `AA-9999` -> `^[A-Z][A-Z]\-[0-9]...$`.
fn plate_pattern(pattern: &str) -> String {
    let body: String = pattern
        .chars()
        .map(|c| match c {
            'A' => "[A-Z]".to_string(),
            '9' => "[0-9]".to_string(),
            c => escape_regex(&c.to_string()),
        })
        .collect();
    format!("^{body}$")
}

/// Most characters a free-text value may have.
fn max_chars(class: SlotClass) -> usize {
    match class {
        SlotClass::Location => 60,
        SlotClass::Categorical => 100,
        _ => 40,
    }
}

/// The schema of one slot's value under the conditions.
pub fn slot_schema(spec: &SlotSpec, when: &Conditions<'_>) -> Value {
    let class = SlotClass::of(&spec.kind);
    if let Shape::Clock { style, suffix } = &spec.shape {
        return json!({"type": "string", "pattern": clock_pattern(*style, suffix, when.day_part())});
    }
    if class == SlotClass::Time {
        let pattern = clock_pattern(ClockStyle::H24, "", when.day_part());
        return json!({"type": "string", "pattern": pattern});
    }
    if class.is_count() || matches!(spec.shape, Shape::Count { .. }) {
        let (words, plural) = match spec.shape {
            Shape::Count { words, plural } => (words, plural),
            _ => (false, true),
        };
        let values: Vec<String> = allowed_counts(class, plural, when.severity())
            .into_iter()
            .map(|n| match number_word(n).filter(|_| words) {
                Some(word) => word.to_string(),
                None => n.to_string(),
            })
            .collect();
        return json!({"type": "string", "enum": values});
    }
    if let Shape::Pattern { pattern } = &spec.shape {
        return json!({"type": "string", "pattern": plate_pattern(pattern)});
    }
    if class == SlotClass::Vehicle && !when.vehicles.is_empty() && when.vehicles.len() <= MAX_ENUM {
        return json!({"type": "string", "enum": when.vehicles});
    }
    // The length bound lives in the regex: llguidance refuses a pattern
    // combined with minLength/maxLength when it cannot intersect them.
    json!({
        "type": "string",
        "pattern": format!("^{FREE_TEXT}{{1,{}}}$", max_chars(class)),
    })
}

/// The schema of a detail answer: one property per slot, all required.
pub fn detail_schema(template: &Template, when: &Conditions<'_>) -> Value {
    let mut properties = serde_json::Map::new();
    for spec in &template.slots {
        properties.insert(slot_property(spec), slot_schema(spec, when));
    }
    let required: Vec<String> = template.slots.iter().map(slot_property).collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// What a slot should hold, in words, for the prompt.
fn slot_hint(spec: &SlotSpec, when: &Conditions<'_>) -> String {
    let class = SlotClass::of(&spec.kind);
    let examples = when.examples.get(&spec.kind).map(Vec::as_slice).unwrap_or_default();
    let like =
        if examples.is_empty() { String::new() } else { format!(", like {}", examples.join("; ")) };
    match class {
        SlotClass::Time => match when.day_part() {
            Some(part) => format!("a clock time in the {}{like}", part.name()),
            None => format!("a clock time{like}"),
        },
        SlotClass::Injured => "how many people were hurt".to_string(),
        SlotClass::Fatalities => "how many people died".to_string(),
        SlotClass::Location => match when.attributes.get("district") {
            Some(district) => format!("a place in {district}{like}"),
            None => format!("a place{like}"),
        },
        SlotClass::Plate => format!("a licence plate{like}"),
        SlotClass::Vehicle => format!("a vehicle{like}"),
        SlotClass::Categorical => format!("{}{like}", prose(&spec.kind)),
    }
}

/// The chat that asks for the values of a template's slots.
pub fn detail_messages(template: &Template, when: &Conditions<'_>) -> Vec<ChatMessage> {
    let system = "You fill in the slots of an incident report template with concrete, realistic \
        values that agree with the facts given. Answer in JSON.";
    let mut user = format!("Scene: {}.\n", prose(when.scene));
    let facts: Vec<String> =
        when.attributes.iter().map(|(k, v)| format!("{}: {v}", prose(k))).collect();
    if !facts.is_empty() {
        user.push_str(&format!("Facts: {}.\n", facts.join("; ")));
    }
    user.push_str(&format!("Template: {}\n", template.text));
    user.push_str("Slots:\n");
    for spec in &template.slots {
        user.push_str(&format!("- {}: {}\n", slot_property(spec), slot_hint(spec, when)));
    }
    user.push_str("Give one value per slot.");
    vec![ChatMessage::new("system", system), ChatMessage::new("user", user)]
}

/// The value of every slot of `slots`, in order, from a detail answer.
pub fn parse_detail_answer(answer: &str, slots: &[SlotSpec]) -> Result<Vec<String>, Invalid> {
    let value: Value = serde_json::from_str(answer.trim()).map_err(|err| {
        Invalid::new("llm_unparsable", format!("{err} in `{}`", clip(answer, 200)))
    })?;
    let Value::Object(map) = value else {
        return Err(Invalid::new(
            "llm_unparsable",
            format!("not an object: `{}`", clip(answer, 200)),
        ));
    };
    let mut values = Vec::with_capacity(slots.len());
    for spec in slots {
        let name = slot_property(spec);
        let Some(found) = map.get(&name) else {
            return Err(Invalid::new("llm_missing_slot", format!("no value for `{name}`")));
        };
        let Value::String(text) = found else {
            return Err(Invalid::new("llm_bad_value", format!("`{name}` is {found}, not text")));
        };
        let text = text.trim();
        let class = SlotClass::of(&spec.kind);
        if text.is_empty() {
            return Err(Invalid::new("llm_bad_value", format!("`{name}` is empty")));
        }
        if text.contains(FORBIDDEN) {
            return Err(Invalid::new(
                "llm_bad_value",
                format!("`{name}` has braces, quotes or line breaks: `{}`", clip(text, 80)),
            ));
        }
        if text.chars().count() > max_chars(class) {
            return Err(Invalid::new(
                "llm_bad_value",
                format!("`{name}` is too long: `{}`", clip(text, 80)),
            ));
        }
        if class == SlotClass::Time && parse_clock(text).is_none() {
            return Err(Invalid::new(
                "llm_bad_time",
                format!("`{name}` is no clock time: `{text}`"),
            ));
        }
        if class.is_count() && parse_count(text).is_none() {
            return Err(Invalid::new("llm_bad_count", format!("`{name}` is no count: `{text}`")));
        }
        values.push(text.to_string());
    }
    Ok(values)
}

fn capitalise(value: &str) -> String {
    let mut chars = value.chars();
    match chars.next() {
        Some(first) if first.is_lowercase() => first.to_uppercase().chain(chars).collect(),
        _ => value.to_string(),
    }
}

/// The template with `values` (one per slot of `template.slots`) put in,
/// and an entity per slot occurrence. A value that starts a sentence is
/// capitalised, in the text and in its entity alike.
pub fn fill(template: &Template, values: &[String]) -> Result<(String, Vec<Entity>), String> {
    let pieces = parse(&template.text)?;
    let mut text = String::with_capacity(template.text.len() + 64);
    let mut chars = 0;
    let mut entities = Vec::new();
    let mut sentence_start = true;
    for piece in pieces {
        match piece {
            Piece::Text(literal) => {
                chars += literal.chars().count();
                text.push_str(&literal);
                let trimmed = literal.trim_end();
                sentence_start =
                    trimmed.ends_with(['.', '!', '?']) && trimmed.len() < literal.len();
            }
            Piece::Slot { kind, index } => {
                let at = template
                    .slots
                    .iter()
                    .position(|s| s.kind == kind && s.index == index)
                    .ok_or_else(|| {
                        format!("slot `{}` is not in `slots`", slot_token(&kind, index))
                    })?;
                let value = values.get(at).ok_or("fewer values than slots")?;
                let value = if sentence_start { capitalise(value) } else { value.clone() };
                let start = chars;
                chars += value.chars().count();
                text.push_str(&value);
                entities.push(Entity { kind, start, end: chars, value: Some(value) });
                sentence_start = false;
            }
        }
    }
    Ok((text, entities))
}

/// The seed's distributions that `detail` draws scenes, attributes and example values from.
struct SeedModel {
    /// (scene, number of seed reports), in name order.
    scenes: Vec<(String, u64)>,
    /// Scene -> attribute key -> (value, count).
    attributes: BTreeMap<String, BTreeMap<String, Vec<(String, u64)>>>,
    /// Scene -> slot type -> distinct values, in seed order.
    values: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// The seed's own word for high severity.
    high_label: String,
}

impl SeedModel {
    fn learn(seed: &[Record]) -> Self {
        let mut scenes: BTreeMap<String, u64> = BTreeMap::new();
        let mut attributes: BTreeMap<String, BTreeMap<String, Vec<(String, u64)>>> =
            BTreeMap::new();
        let mut values: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        let mut high_label = None;
        for record in seed {
            *scenes.entry(record.scene.clone()).or_default() += 1;
            for (key, value) in &record.attributes {
                if key == "severity" && Severity::parse(value) == Some(Severity::High) {
                    high_label.get_or_insert_with(|| value.clone());
                }
                let counts = attributes
                    .entry(record.scene.clone())
                    .or_default()
                    .entry(key.clone())
                    .or_default();
                match counts.iter_mut().find(|(v, _)| v == value) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((value.clone(), 1)),
                }
            }
            for entity in &record.entities {
                let Some(value) = entity.value.as_deref().or_else(|| record.span_text(entity))
                else {
                    continue;
                };
                let list = values
                    .entry(record.scene.clone())
                    .or_default()
                    .entry(entity.kind.clone())
                    .or_default();
                if !list.iter().any(|v| v == value) {
                    list.push(value.to_string());
                }
            }
        }
        Self {
            scenes: scenes.into_iter().collect(),
            attributes,
            values,
            high_label: high_label.unwrap_or_else(|| "high".to_string()),
        }
    }
}

fn weighted<'a>(options: &'a [(String, u64)], rng: &mut ChaCha8Rng) -> Option<&'a str> {
    let total: u64 = options.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let mut at = rng.random_range(0..total);
    for (value, n) in options {
        if at < *n {
            return Some(value);
        }
        at -= n;
    }
    None
}

/// Settings of `detail` with the LLM backend that do not come from its inputs.
#[derive(Debug, Clone, Default)]
pub struct LlmDetailConfig {
    pub params: LlmParams,
    /// Attributes every record gets, overriding the sampled ones.
    pub pinned: BTreeMap<String, String>,
    /// Cache key of the stage, copied into provenance.
    pub stage_key: String,
}

/// The `llm` part of `detail`'s `stats.json`.
#[derive(Debug, Clone, Serialize)]
pub struct LlmDetailStats {
    /// Templates usable under the pinned attributes (written as `detail`'s own figure).
    #[serde(skip)]
    pub usable_templates: usize,
    pub requests: usize,
    /// Records whose answer was used (the filter still checks them).
    pub filled: usize,
    /// Records flagged invalid, per reason.
    pub invalid: BTreeMap<&'static str, usize>,
}

/// The day part a template's own time words name, if they agree on one.
fn template_day_part(template: &Template) -> Result<Option<DayPart>, ()> {
    let mut found = None;
    for word in template.text.split(|c: char| !c.is_alphabetic()) {
        if let Some(part) = time_word(word) {
            if found.is_some_and(|f| f != part) {
                return Err(());
            }
            found = Some(part);
        }
    }
    Ok(found)
}

/// Whether a template can be used under the pinned attributes: a fatalities
/// slot needs severity high, and its time words must agree with a pinned time of day.
fn usable(template: &Template, pinned: &BTreeMap<String, String>) -> bool {
    let fatal = template.slots.iter().any(|s| SlotClass::of(&s.kind) == SlotClass::Fatalities);
    let pinned_low =
        pinned.get("severity").is_some_and(|s| Severity::parse(s) != Some(Severity::High));
    let pinned_part = pinned.get("time_of_day").and_then(|v| DayPart::parse(v));
    match template_day_part(template) {
        Err(()) => false,
        Ok(part) => {
            let fatal_conflict = fatal && pinned_low;
            let time_conflict = part.is_some() && pinned_part.is_some() && part != pinned_part;
            !fatal_conflict && !time_conflict
        }
    }
}

/// Writes `count` records with the model filling the slots. Scenes are drawn
/// by seed frequency among those with a usable template, a template uniformly,
/// attributes from the scene's seed distributions (pinned ones override);
/// then a fatalities slot forces severity high, the template's time words set
/// `time_of_day`, and a time slot without one draws it. Calls `made` after
/// each record. Fails when no template is usable.
pub fn llm_records(
    templates: &[Template],
    seed: &[Record],
    config: &LlmDetailConfig,
    stage_seed: u64,
    count: usize,
    model: &dyn Completer,
    mut made: impl FnMut(),
) -> Result<(Vec<Record>, LlmDetailStats), String> {
    let seed_model = SeedModel::learn(seed);
    let usable: Vec<&Template> = templates.iter().filter(|t| usable(t, &config.pinned)).collect();
    // Templates per scene index; flat templates fit every scene.
    let by_scene: Vec<Vec<&Template>> = seed_model
        .scenes
        .iter()
        .map(|(scene, _)| {
            usable
                .iter()
                .copied()
                .filter(|t| t.scene.as_deref().is_none_or(|s| s == scene))
                .collect()
        })
        .collect();
    let weights: Vec<(String, u64)> = seed_model
        .scenes
        .iter()
        .zip(&by_scene)
        .map(|((scene, n), list)| (scene.clone(), if list.is_empty() { 0 } else { *n }))
        .collect();
    if weights.iter().all(|(_, n)| *n == 0) {
        return Err(format!(
            "no template can be filled: {} templates, none of a seed scene usable under the \
             pinned attributes",
            templates.len()
        ));
    }

    let mut rng = ChaCha8Rng::seed_from_u64(stage_seed);
    let mut stats = LlmDetailStats {
        usable_templates: usable.len(),
        requests: 0,
        filled: 0,
        invalid: zero_counts(INVALID_REASONS),
    };
    let mut records = Vec::with_capacity(count);
    let empty = BTreeMap::new();
    for number in 0..count {
        let scene_name = weighted(&weights, &mut rng).unwrap_or_default().to_string();
        let scene = seed_model.scenes.iter().position(|(s, _)| *s == scene_name).unwrap_or(0);
        let choices = &by_scene[scene];
        let template = choices[rng.random_range(0..choices.len())];

        let mut attributes = BTreeMap::new();
        if let Some(keys) = seed_model.attributes.get(&scene_name) {
            for (key, options) in keys {
                if let Some(value) = weighted(options, &mut rng) {
                    attributes.insert(key.clone(), value.to_string());
                }
            }
        }
        attributes.extend(config.pinned.clone());
        if template.slots.iter().any(|s| SlotClass::of(&s.kind) == SlotClass::Fatalities) {
            attributes.insert("severity".to_string(), seed_model.high_label.clone());
        }
        if let Ok(Some(part)) = template_day_part(template) {
            attributes.insert("time_of_day".to_string(), part.name().to_string());
        }
        let has_time = template.slots.iter().any(|s| SlotClass::of(&s.kind) == SlotClass::Time);
        let known_part = attributes.get("time_of_day").and_then(|v| DayPart::parse(v));
        if has_time && known_part.is_none() {
            let part = DayPart::ALL[rng.random_range(0..DayPart::ALL.len())];
            attributes.insert("time_of_day".to_string(), part.name().to_string());
        }

        let scene_values = seed_model.values.get(&scene_name).unwrap_or(&empty);
        let mut examples = BTreeMap::new();
        for spec in &template.slots {
            if let Some(list) = scene_values.get(&spec.kind) {
                let mut picks: Vec<String> = Vec::new();
                for _ in 0..config.params.examples * 2 {
                    let pick = &list[rng.random_range(0..list.len())];
                    if !picks.contains(pick) && picks.len() < config.params.examples {
                        picks.push(pick.clone());
                    }
                }
                examples.insert(spec.kind.clone(), picks);
            }
        }
        let vehicles: Vec<String> = scene_values
            .iter()
            .filter(|(kind, _)| SlotClass::of(kind) == SlotClass::Vehicle)
            .flat_map(|(_, list)| list.iter().cloned())
            .fold(Vec::new(), |mut all, v| {
                if !all.contains(&v) {
                    all.push(v);
                }
                all
            });
        let when = Conditions {
            scene: &scene_name,
            attributes: &attributes,
            examples: &examples,
            vehicles: &vehicles,
        };
        let messages = detail_messages(template, &when);
        let schema = detail_schema(template, &when);
        let sampling = config.params.sampling(request_seed(stage_seed, "detail", number as u64));
        stats.requests += 1;
        let answer = model.complete_json(&messages, &schema, &sampling);
        made();

        let filled = match &answer {
            Ok(Answer { text, truncated: true }) => Err(Invalid::new(
                "llm_truncated",
                format!("cut off at {} tokens: `{}`", sampling.max_tokens, clip(text, 200)),
            )),
            Ok(Answer { text, .. }) => {
                parse_detail_answer(text, &template.slots).and_then(|values| {
                    fill(template, &values).map_err(|err| Invalid::new("llm_bad_value", err))
                })
            }
            Err(err) => Err(Invalid::new("llm_request_failed", clip(err, 200))),
        };
        let provenance = Provenance {
            generator: GENERATOR.to_string(),
            mode: template.mode.name().to_string(),
            template_id: template.id.clone(),
            seed_ids: template.seed_ids.clone(),
            stage_key: config.stage_key.clone(),
        };
        let (text, entities) = match filled {
            Ok(done) => {
                stats.filled += 1;
                done
            }
            Err(invalid) => {
                *stats.invalid.entry(invalid.reason).or_default() += 1;
                attributes.insert(INVALID_ATTRIBUTE.to_string(), invalid.attribute());
                (answer.map(|a| a.text).unwrap_or_default(), Vec::new())
            }
        };
        records.push(Record {
            id: format!("syn-{number:07}"),
            text,
            scene: scene_name,
            entities,
            attributes,
            synthetic: true,
            provenance: Some(provenance),
        });
    }
    Ok((records, stats))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;
    use crate::synth::testkit::{assert_spans_slice, tiny_seed};

    /// Answers from a list, in order (`CUT:` marks one cut off by
    /// `max_tokens`); records every request.
    struct Canned {
        answers: RefCell<VecDeque<Result<Answer, String>>>,
        asked: RefCell<Vec<(Vec<ChatMessage>, Value, Sampling)>>,
    }

    impl Canned {
        fn new(answers: &[Result<&str, &str>]) -> Self {
            let answers = answers
                .iter()
                .map(|a| {
                    a.map(|text| match text.strip_prefix("CUT:") {
                        Some(text) => Answer { text: text.to_string(), truncated: true },
                        None => Answer { text: text.to_string(), truncated: false },
                    })
                    .map_err(str::to_string)
                })
                .collect();
            Self { answers: RefCell::new(answers), asked: RefCell::new(Vec::new()) }
        }
    }

    impl Completer for Canned {
        fn complete_json(
            &self,
            messages: &[ChatMessage],
            schema: &Value,
            sampling: &Sampling,
        ) -> Result<Answer, String> {
            self.asked.borrow_mut().push((messages.to_vec(), schema.clone(), *sampling));
            self.answers.borrow_mut().pop_front().unwrap_or_else(|| Err("no more answers".into()))
        }
    }

    fn collision() -> SceneSeed {
        scene_seeds(&tiny_seed()).into_iter().find(|s| s.scene == "collision").unwrap()
    }

    fn matches(pattern: &str, text: &str) -> bool {
        regex_lite::Regex::new(pattern).unwrap().is_match(text)
    }

    #[test]
    fn scene_seeds_delexicalise_and_keep_shapes() {
        let scene = collision();
        assert_eq!(scene.examples.len(), 4);
        assert_eq!(scene.examples[0].0, "c1");
        assert!(
            scene.examples[0]
                .1
                .starts_with("At {time} a {vehicle} hit a {vehicle#2} on {location}.")
        );
        let types: Vec<&str> = scene.shapes.keys().map(String::as_str).collect();
        assert_eq!(
            types,
            [
                "fatalities",
                "injured",
                "location",
                "plate",
                "time",
                "vehicle",
                "weather",
                "witness_remark"
            ]
        );
        assert!(matches!(scene.shapes["time"], Shape::Clock { style: ClockStyle::H24, .. }));
    }

    #[test]
    fn scene_prompt_and_schema() {
        let scene = collision();
        let messages = scene_messages(&scene, &[1, 0], 2);
        assert_eq!(messages[0].role, "system");
        let user = &messages[1].content;
        assert!(user.contains("Scene category: collision."), "{user}");
        assert!(user.contains("{time}, {vehicle}, {weather}, {witness_remark}."), "{user}");
        assert!(user.contains(&format!("1. {}", scene.examples[1].1)), "{user}");
        assert!(user.contains(&format!("2. {}", scene.examples[0].1)), "{user}");
        assert!(user.contains("Write 2 new templates"), "{user}");

        let schema = scene_schema(&scene, 2);
        assert_eq!(schema["properties"]["templates"]["maxItems"], 2);
        let pattern = schema["properties"]["templates"]["items"]["pattern"].as_str().unwrap();
        assert!(matches(pattern, "At {time} a {vehicle} hit {vehicle#2}."));
        assert!(matches(pattern, "{location} was closed."));
        assert!(!matches(pattern, "No slots at all."));
        assert!(!matches(pattern, "A {weapon} was found."), "unknown type");
        assert!(!matches(pattern, "At {time#9} it ended."), "index too high");
        assert!(!matches(pattern, "Two lines {time}\nhere."));
        assert!(!matches(pattern, "A \"quoted\" {time}."));
    }

    #[test]
    fn scene_answers_parse_and_truncated_ones_are_salvaged() {
        let full = r#"{"templates": ["At {time} a {vehicle} crashed.", "B \"q\" {time}"]}"#;
        let answer = parse_scene_answer(full).unwrap();
        assert_eq!(answer.templates, ["At {time} a {vehicle} crashed.", "B \"q\" {time}"]);
        assert!(!answer.truncated);
        let cut = r#"{"templates": ["At {time} a {vehicle} crashed.", "A second one that never en"#;
        let answer = parse_scene_answer(cut).unwrap();
        assert_eq!(answer.templates, ["At {time} a {vehicle} crashed."]);
        assert!(answer.truncated);
        assert_eq!(parse_scene_answer(r#"{"templates": ["never closed"#), None);
        assert_eq!(parse_scene_answer("I cannot help with that."), None);
        assert_eq!(parse_scene_answer(r#"{"other": []}"#), None);
    }

    #[test]
    fn templates_are_checked_with_one_reason_each() {
        let scene = collision();
        let ids = vec!["c1".to_string()];
        let check = |text: &str| check_template(text, &scene, &ids).map(|t| t.text);
        assert_eq!(
            check("At {time} a {vehicle#3} struck a {vehicle} near the bridge.").unwrap(),
            "At {time} a {vehicle} struck a {vehicle#2} near the bridge."
        );
        assert_eq!(check("At {time} a car {broken"), Err("bad_slot"));
        assert_eq!(check("At {time} a car hit a {{wall}} near the bridge."), Err("bad_characters"));
        assert_eq!(check("At {time} it hit."), Err("too_short"));
        assert_eq!(
            check("At {time}\ta car hit a {vehicle} near the bridge."),
            Err("bad_characters")
        );
        let many = "{time} and ".repeat(MAX_SLOTS + 1);
        assert_eq!(check(&format!("At {many} a car hit a {{vehicle}}.")), Err("too_many_slots"));
        assert_eq!(check(&format!("At {{time}} {}", "a car hit. ".repeat(40))), Err("too_long"));
        assert_eq!(check("A {weapon} was found at the crossing today."), Err("unknown_slot"));
        assert_eq!(check("A witness said {witness_remark} at the scene."), Err("no_key_slot"));
        assert_eq!(
            check("At {time} {injured} people were hurt, but no injuries were reported."),
            Err("contradiction")
        );
        let example = scene.examples[0].1.clone();
        // Case and spacing outside the slots do not hide a copy.
        let copy = example.replacen("At ", "AT ", 1).replace(' ', "  ");
        assert_eq!(check(&format!("  {copy}  ")), Err("copies_example"));
        let template =
            check_template("At {time} a {vehicle} crashed into a wall.", &scene, &ids).unwrap();
        assert_eq!(template.scene.as_deref(), Some("collision"));
        assert_eq!(template.seed_ids, ids);
        assert_eq!(template.slots.len(), 2);
        assert_eq!(template.slots[1].shape, scene.shapes["vehicle"]);
    }

    #[test]
    fn llm_templates_keep_valid_ones_and_count_the_rest() {
        let seed: Vec<Record> =
            tiny_seed().into_iter().filter(|r| r.scene == "collision").collect();
        let good = r#"{"templates": ["At {time} a {vehicle} hit a lamp post on {location}.",
            "A {vehicle} lost control at {time}, no slot problem here.",
            "A {weapon} was seen near the crossing by officers.", "At {time} a {vehicle} hit a lamp post on {location}."]}"#;
        let model = Canned::new(&[Err("engine down"), Ok(good), Ok("garbage")]);
        let mut asked = 0;
        let params = LlmParams::default();
        let (templates, stats) = llm_templates(&seed, 3, &params, 7, &model, || asked += 1);
        assert_eq!(templates.len(), 2);
        let figures = &stats.scenes["collision"];
        assert_eq!((figures.requests, figures.failed_requests), (2, 1));
        assert_eq!(figures.proposed, 3, "at most the three wanted are read");
        assert_eq!(figures.rejected["duplicate"], 0);
        assert_eq!(figures.rejected["unknown_slot"], 1);
        assert_eq!(stats.rejected["unknown_slot"], 1);
        assert_eq!(asked, 2, "budget: 2 attempts per request needed");
        let requests = model.asked.borrow();
        assert_ne!(requests[0].2.seed, requests[1].2.seed, "each request has its own seed");
        assert_eq!(requests[0].2.max_tokens, params.max_tokens);
        assert_eq!(requests[0].1["properties"]["templates"]["maxItems"], 3);
        assert!(templates.iter().all(|t| t.mode == Mode::Hierarchical && t.roles.is_empty()));
    }

    fn night() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("time_of_day".to_string(), "night".to_string()),
            ("severity".to_string(), "medium".to_string()),
            ("district".to_string(), "Riverside".to_string()),
        ])
    }

    fn template(text: &str) -> Template {
        check_template(text, &collision(), &[]).unwrap()
    }

    #[test]
    fn slot_schemas_carry_the_constraints() {
        let attributes = night();
        let examples = BTreeMap::from([("vehicle".to_string(), vec!["motorcycle".to_string()])]);
        let vehicles = vec!["silver sedan".to_string(), "motorcycle".to_string()];
        let when = Conditions {
            scene: "collision",
            attributes: &attributes,
            examples: &examples,
            vehicles: &vehicles,
        };
        let t = template("At {time} a {vehicle} hit a {vehicle#2}; {injured} hurt, plate {plate}.");
        let schema = detail_schema(&t, &when);
        assert_eq!(schema["required"], json!(["time", "vehicle", "vehicle_2", "injured", "plate"]));
        let time = schema["properties"]["time"]["pattern"].as_str().unwrap();
        assert!(matches(time, "22:40") && matches(time, "03:05"));
        assert!(!matches(time, "14:00") && !matches(time, "22:4"));
        assert_eq!(schema["properties"]["vehicle"]["enum"], json!(vehicles));
        // `Two` in the seed: plural words, medium severity allows up to five.
        assert_eq!(
            schema["properties"]["injured"]["enum"],
            json!(["two", "three", "four", "five"])
        );
        let plate = schema["properties"]["plate"]["pattern"].as_str().unwrap();
        assert!(matches(plate, "7KXP214") && !matches(plate, "KXP2147"));

        let messages = detail_messages(&t, &when);
        let user = &messages[1].content;
        assert!(user.contains("Facts: district: Riverside; severity: medium; time of day: night."));
        assert!(user.contains("- vehicle: a vehicle, like motorcycle\n"), "{user}");
        assert!(user.contains("- time: a clock time in the night\n"), "{user}");

        assert!(matches(
            &clock_pattern(ClockStyle::H12, " p.m.", Some(DayPart::Evening)),
            "7:15 p.m."
        ));
        let morning = clock_pattern(ClockStyle::H12, " PM", Some(DayPart::Morning));
        assert!(matches(&morning, "11:59 AM") && !matches(&morning, "12:00 PM"));
        let compact = clock_pattern(ClockStyle::Compact, " hours", Some(DayPart::Afternoon));
        assert!(matches(&compact, "1435 hours") && parse_clock("1435 hours").is_some());
    }

    #[test]
    fn answers_fill_templates_with_exact_spans() {
        let t =
            template("{vehicle} hit a {vehicle#2} at {time}. {vehicle} was towed from {location}.");
        let answer = r#"{"vehicle": "silver sedan", "vehicle_2": "bus", "time": " 22:40 ",
            "location": "Café Zürich, Riverside"}"#;
        let values = parse_detail_answer(answer, &t.slots).unwrap();
        let (text, entities) = fill(&t, &values).unwrap();
        assert_eq!(
            text,
            "Silver sedan hit a bus at 22:40. Silver sedan was towed from Café Zürich, Riverside."
        );
        assert_eq!(entities.len(), 5);
        let record = Record {
            id: "x".into(),
            text,
            scene: "collision".into(),
            entities,
            attributes: BTreeMap::new(),
            synthetic: true,
            provenance: None,
        };
        assert_spans_slice(&[record]);
    }

    #[test]
    fn bad_answers_have_reasons() {
        let t = template("At {time} {injured} people were hurt near {location}.");
        let reason = |answer: &str| parse_detail_answer(answer, &t.slots).unwrap_err().reason;
        assert_eq!(reason(r#"{"time": "22:40", "injured": "two""#), "llm_unparsable");
        assert_eq!(reason("[1, 2]"), "llm_unparsable");
        assert_eq!(reason(r#"{"time": "22:40", "injured": "two"}"#), "llm_missing_slot");
        let bad = |time: &str, injured: &str, location: &str| {
            let answer = json!({"time": time, "injured": injured, "location": location});
            reason(&answer.to_string())
        };
        assert_eq!(bad("22:40", "two", " "), "llm_bad_value");
        assert_eq!(bad("22:40", "two", "{location}"), "llm_bad_value");
        assert_eq!(bad("22:40", "two", &"x".repeat(200)), "llm_bad_value");
        assert_eq!(bad("late", "two", "Main St"), "llm_bad_time");
        assert_eq!(bad("22:40", "a few", "Main St"), "llm_bad_count");
        let answer = json!({"time": "22:40", "injured": 2, "location": "Main St"});
        assert_eq!(reason(&answer.to_string()), "llm_bad_value");

        let invalid = Invalid::new("llm_bad_time", "`time` is no clock time: `late`");
        assert_eq!(invalid_reason(&invalid.attribute()), ("llm_bad_time", invalid.detail.clone()));
        assert_eq!(invalid_reason("something else").0, "llm_invalid");
    }

    #[test]
    fn llm_records_condition_fill_and_flag() {
        let seed = tiny_seed();
        let templates = vec![
            template("At {time} a {vehicle} hit a wall this morning on {location}."),
            template("{fatalities} people died when a {vehicle} crashed at {time}."),
        ];
        let answers: Vec<Result<&str, &str>> = vec![
            Ok(
                r#"{"time": "08:10", "vehicle": "motorcycle", "location": "Main St", "fatalities": "two"}"#,
            ),
            Ok(
                r#"{"time": "late", "vehicle": "motorcycle", "location": "Main St", "fatalities": "two"}"#,
            ),
            Err("timeout"),
            Ok(r#"CUT:{"time": "08:10", "vehicle": "motorcycle""#),
            Ok(r#"{"time": "08:10", "vehicle": "motorcycle""#),
        ];
        let model = Canned::new(&answers);
        let config = LlmDetailConfig { stage_key: "key".into(), ..Default::default() };
        let mut made = 0;
        let (records, stats) =
            llm_records(&templates, &seed, &config, 3, 5, &model, || made += 1).unwrap();
        assert_eq!((records.len(), made, stats.requests), (5, 5, 5));
        assert_eq!(stats.filled, 1);
        assert_eq!(stats.invalid["llm_bad_time"], 1);
        assert_eq!(stats.invalid["llm_request_failed"], 1);
        assert_eq!(stats.invalid["llm_truncated"], 1);
        assert_eq!(stats.invalid["llm_unparsable"], 1);
        let first = &records[0];
        assert_spans_slice(std::slice::from_ref(first));
        assert_eq!(first.provenance.as_ref().unwrap().generator, GENERATOR);
        assert!(!first.attributes.contains_key(INVALID_ATTRIBUTE));
        for r in &records[1..] {
            assert!(r.attributes[INVALID_ATTRIBUTE].starts_with("llm_"), "{r:?}");
            assert!(r.entities.is_empty());
        }
        // Conditioning: every request's facts agree with its template.
        for ((messages, schema, _), record) in model.asked.borrow().iter().zip(&records) {
            let user = &messages[1].content;
            if user.contains("this morning") {
                assert_eq!(record.attributes["time_of_day"], "morning");
                assert!(matches(
                    schema["properties"]["time"]["pattern"].as_str().unwrap(),
                    "08:10"
                ));
            } else {
                assert_eq!(record.attributes["severity"], "high");
            }
            assert_eq!(record.scene, "collision", "only collision templates");
        }
    }

    #[test]
    fn filter_drops_flagged_records_and_counts_their_reasons() {
        let seed = tiny_seed();
        let templates = vec![template("At {time} a {vehicle} hit a wall on {location} tonight.")];
        let answers: Vec<Result<&str, &str>> = vec![
            Ok(r#"{"time": "23:10", "vehicle": "motorcycle", "location": "Dock Road"}"#),
            Ok(r#"{"time": "23:10", "vehicle": "motorcycle"}"#),
            Ok(r#"{"time": "23:10", "vehicle": "motorcycle", "location": "{x}"}"#),
        ];
        let model = Canned::new(&answers);
        let config = LlmDetailConfig::default();
        let (records, _) = llm_records(&templates, &seed, &config, 1, 3, &model, || {}).unwrap();
        let config = crate::synth::filter::FilterConfig {
            near_duplicate_threshold: 0.9,
            shingle_words: 3,
            max_copied_ngram: 20,
        };
        let outcome = crate::synth::filter::filter(records, &seed, &config);
        assert_eq!(outcome.kept.len(), 1);
        let reasons: Vec<&str> = outcome.dropped.iter().map(|d| d.reason).collect();
        assert_eq!(reasons, ["llm_missing_slot", "llm_bad_value"]);
        let counts = &outcome.report.dropped;
        assert_eq!((counts["llm_missing_slot"], counts["llm_bad_value"]), (1, 1));
        assert_eq!(counts["llm_truncated"], 0, "every LLM reason is listed");
        assert_eq!(outcome.report.input, 3);

        // Template-backend input: no LLM reasons in the report.
        let plain = crate::synth::filter::filter(outcome.kept.clone(), &seed, &config);
        let mut kept = plain.kept;
        kept[0].provenance.as_mut().unwrap().generator = "watchfire detail".into();
        let plain = crate::synth::filter::filter(kept, &seed, &config);
        assert!(!plain.report.dropped.contains_key("llm_truncated"));
    }

    #[test]
    fn backend_and_model_input_agree() {
        assert!(check_model_input(Backend::Llm, &["templates", "seed", "model"]).is_ok());
        assert!(check_model_input(Backend::Template, &["seed"]).is_ok());
        let missing = check_model_input(Backend::Llm, &["seed"]).unwrap_err();
        assert_eq!(missing.param, "model");
        let unused = check_model_input(Backend::Template, &["seed", "model"]).unwrap_err();
        assert!(unused.message.contains("reads no model"));
        assert!(validate_backend(Backend::Template, Some(&LlmParams::default())).is_err());
        let hot = LlmParams { temperature: 3.0, ..Default::default() };
        assert_eq!(
            validate_backend(Backend::Llm, Some(&hot)).unwrap_err().param,
            "llm.temperature"
        );
        assert_ne!(request_seed(1, "detail", 0), request_seed(1, "detail", 1));
        assert_ne!(request_seed(1, "detail", 0), request_seed(2, "detail", 0));
    }
}
