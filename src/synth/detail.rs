//! G_detail with the template backend: fills template slots with values
//! conditioned on a scene and attributes, and records gold spans.
//!
//! Per record: a scene is drawn from the seed's scene frequencies, then one of
//! its templates, then attributes c (time_of_day, district, severity, agency
//! and any other key the seed carries) from that scene's seed distributions,
//! with pinned attributes overriding them. Slots are filled by typed
//! generators conditioned on c:
//!
//! - clock times fall inside the time_of_day window, and time-of-day words in
//!   the template's own text (morning, evening, night, overnight, ...) are
//!   rewritten to agree;
//! - places are street addresses or intersections from `fake`'s English
//!   address fakers (with the district when the seed value had one), or seed
//!   values of the scene when the seed value was a plain place name;
//! - plates follow the letter/digit pattern of the seed value;
//! - injured counts follow severity (low 1-2, medium 1-5, high 2-12, else
//!   1-6), a fatality slot forces severity high, singular slots get one and
//!   number words stay words;
//! - every other type (vehicle, weapon, hazard, weather, remarks, unknown
//!   types) draws from the values seen with it in the scene's seed reports,
//!   so vehicles fit their scene.
//!
//! Flat templates (the "without hierarchical generation" ablation) drop the
//! conditioning: attributes and values come from pooled seed distributions,
//! times are uniform over the day, counts ignore severity and the template's
//! time words are left as they are.
//!
//! With `privacy`, every histogram above (scene, attribute and value counts)
//! is released through [`crate::synth::histogram`]'s Laplace mechanism;
//! templates whose slots cannot be filled any more are skipped. Template text
//! itself is copied from seed sentences and is not covered by the guarantee.

use std::collections::{BTreeMap, BTreeSet};

use fake::Fake;
use fake::faker::address::en::{BuildingNumber, StreetName};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::corpus::{Entity, Provenance, Record};
use crate::synth::histogram::{Histogram, Privacy, Releaser, count_once};
use crate::synth::slot_class::{DayPart, Severity, SlotClass, number_word, time_word};
use crate::synth::template::{ClockStyle, Mode, Piece, Shape, Template, parse};

/// Settings of the detail generator that do not come from its inputs.
#[derive(Debug, Clone, Default)]
pub struct DetailConfig {
    pub privacy: Option<Privacy>,
    /// Attributes every record gets, overriding the sampled ones.
    pub pinned: BTreeMap<String, String>,
    /// Cache key of the stage, copied into provenance.
    pub stage_key: String,
}

/// Why a generator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DetailError {
    #[error("template {id}: {message}")]
    BadTemplate { id: String, message: String },
    #[error("no template can be filled: {0}")]
    NothingToGenerate(String),
}

/// A template's text and slots, ready for the hot loop.
struct Compiled {
    template: usize,
    parts: Vec<Part>,
    sources: Vec<Source>,
    /// Slot type names, for entities.
    kinds: Vec<String>,
    has_fatalities: bool,
    has_time: bool,
    mode: Mode,
    /// Scene index the template belongs to; `None` for flat templates.
    scene: Option<usize>,
}

enum Part {
    Text { text: String, chars: usize },
    Slot { slot: usize, capital: bool },
    TimeWord { original: String, capital: bool },
}

enum Source {
    Clock { style: ClockStyle, suffix: String },
    Count { fatal: bool, words: bool, plural: bool },
    Street { intersection: bool, district: bool },
    Pattern(String),
    Values(usize),
}

/// The seed's distributions, released once, indexed for sampling.
struct Model {
    scenes: Histogram,
    /// Per scene, then pooled at index `scenes.len()`: (attribute key, histogram).
    attributes: Vec<Vec<(String, usize)>>,
    /// Per scene, then pooled: entity type -> histogram.
    values: Vec<BTreeMap<String, usize>>,
    histograms: Vec<Histogram>,
    high_label: String,
}

/// Generates synthetic records from templates and seed distributions.
pub struct Generator {
    templates: Vec<Template>,
    compiled: Vec<Compiled>,
    /// Usable compiled templates per scene index.
    by_scene: Vec<Vec<usize>>,
    model: Model,
    config: DetailConfig,
}

impl Generator {
    /// Learns value distributions from `seed` (noised with `config.privacy`
    /// using `rng_seed`) and prepares `templates` for filling.
    pub fn new(
        templates: Vec<Template>,
        seed: &[Record],
        config: DetailConfig,
        rng_seed: u64,
    ) -> Result<Self, DetailError> {
        let mut releaser =
            Releaser::new(config.privacy, ChaCha8Rng::seed_from_u64(rng_seed ^ 0xd1ff_5eed));
        let model = Model::learn(seed, &mut releaser);
        let mut compiled = Vec::new();
        for (at, template) in templates.iter().enumerate() {
            if let Some(c) = compile(at, template, &model, &config)? {
                compiled.push(c);
            }
        }
        let scene_count = model.scenes.keys().len();
        let mut by_scene = vec![Vec::new(); scene_count];
        for (at, c) in compiled.iter().enumerate() {
            match c.scene {
                Some(scene) => by_scene[scene].push(at),
                None => by_scene.iter_mut().for_each(|list| list.push(at)),
            }
        }
        if by_scene.iter().all(Vec::is_empty) {
            return Err(DetailError::NothingToGenerate(format!(
                "{} templates, {} scenes after release; the seed may be too small for the \
                 privacy threshold, or templates and seed do not share scenes",
                templates.len(),
                scene_count
            )));
        }
        Ok(Self { templates, compiled, by_scene, model, config })
    }

    /// Number of templates that can be filled.
    pub fn usable_templates(&self) -> usize {
        self.compiled.len()
    }

    /// Generates `n` records, ids `syn-0000000` on; same seed, same records.
    pub fn generate(&self, rng_seed: u64, n: usize) -> Vec<Record> {
        self.generate_with(rng_seed, n, |_| {})
    }

    /// Like [`generate`](Self::generate), calling `made` with the number of
    /// records produced since its last call, every 4,096 records and at the end.
    pub fn generate_with(&self, rng_seed: u64, n: usize, mut made: impl FnMut(u64)) -> Vec<Record> {
        const CHUNK: usize = 4096;
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(self.one(&mut rng, i));
            if (i + 1) % CHUNK == 0 {
                made(CHUNK as u64);
            }
        }
        made((n % CHUNK) as u64);
        out
    }

    fn one(&self, rng: &mut ChaCha8Rng, number: usize) -> Record {
        let scene = self.draw_scene(rng);
        let choices = &self.by_scene[scene];
        let compiled = &self.compiled[choices[rng.random_range(0..choices.len())]];
        let template = &self.templates[compiled.template];
        let conditioned = compiled.mode == Mode::Hierarchical;

        let mut attributes =
            self.draw_attributes(rng, if conditioned { scene } else { usize::MAX });
        let day_part = self.condition(rng, compiled, &mut attributes);
        let severity =
            attributes.get("severity").and_then(|s| Severity::parse(s)).filter(|_| conditioned);
        let values: Vec<String> = compiled
            .sources
            .iter()
            .map(|source| self.value(rng, source, day_part, severity, &attributes))
            .collect();
        let (text, entities) = assemble(compiled, &values, day_part.filter(|_| conditioned));

        Record {
            id: format!("syn-{number:07}"),
            text,
            scene: self.model.scenes.keys()[scene].clone(),
            entities,
            attributes,
            synthetic: true,
            provenance: Some(Provenance {
                generator: "watchfire detail".to_string(),
                mode: compiled.mode.name().to_string(),
                template_id: template.id.clone(),
                seed_ids: template.seed_ids.clone(),
                stage_key: self.config.stage_key.clone(),
            }),
        }
    }

    /// A scene that has at least one usable template.
    fn draw_scene(&self, rng: &mut ChaCha8Rng) -> usize {
        loop {
            let scene = self.model.scenes.sample_index(rng).unwrap_or(0);
            if !self.by_scene[scene].is_empty() {
                return scene;
            }
        }
    }

    /// Attributes for `scene`, or pooled ones when `scene` is out of range.
    fn draw_attributes(&self, rng: &mut ChaCha8Rng, scene: usize) -> BTreeMap<String, String> {
        let pooled = self.model.attributes.len() - 1;
        let list = &self.model.attributes[scene.min(pooled)];
        let mut attributes = BTreeMap::new();
        for (key, histogram) in list {
            if let Some(value) = self.model.histograms[*histogram].sample(rng) {
                attributes.insert(key.clone(), value.to_string());
            }
        }
        for (key, value) in &self.config.pinned {
            attributes.insert(key.clone(), value.clone());
        }
        attributes
    }

    /// Makes attributes agree with the template (fatalities -> high severity)
    /// and picks the day part clock times fall in.
    fn condition(
        &self,
        rng: &mut ChaCha8Rng,
        compiled: &Compiled,
        attributes: &mut BTreeMap<String, String>,
    ) -> Option<DayPart> {
        if compiled.mode == Mode::Flat {
            return None;
        }
        if compiled.has_fatalities {
            attributes.insert("severity".to_string(), self.model.high_label.clone());
        }
        let part = attributes.get("time_of_day").and_then(|v| DayPart::parse(v));
        if part.is_some() || !compiled.has_time {
            return part;
        }
        let part = DayPart::ALL[rng.random_range(0..DayPart::ALL.len())];
        attributes.insert("time_of_day".to_string(), part.name().to_string());
        Some(part)
    }

    fn value(
        &self,
        rng: &mut ChaCha8Rng,
        source: &Source,
        day_part: Option<DayPart>,
        severity: Option<Severity>,
        attributes: &BTreeMap<String, String>,
    ) -> String {
        match source {
            Source::Clock { style, suffix } => clock(rng, day_part, *style, suffix),
            Source::Count { fatal, words, plural } => {
                let n = count(rng, *fatal, *plural, severity);
                match number_word(n).filter(|_| *words) {
                    Some(word) => word.to_string(),
                    None => n.to_string(),
                }
            }
            Source::Street { intersection, district } => {
                let mut place = if *intersection {
                    let a: String = StreetName().fake_with_rng(rng);
                    let b: String = StreetName().fake_with_rng(rng);
                    format!("{a} and {b}")
                } else {
                    let number: String = BuildingNumber().fake_with_rng(rng);
                    let street: String = StreetName().fake_with_rng(rng);
                    format!("{number} {street}")
                };
                if let Some(d) = attributes.get("district").filter(|_| *district) {
                    place.push_str(", ");
                    place.push_str(d);
                }
                place
            }
            Source::Pattern(pattern) => plate(rng, pattern),
            Source::Values(histogram) => {
                self.model.histograms[*histogram].sample(rng).unwrap_or_default().to_string()
            }
        }
    }
}

impl Model {
    fn learn(seed: &[Record], releaser: &mut Releaser) -> Self {
        let mut scene_counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut attr_counts: BTreeMap<(String, String), BTreeMap<String, u64>> = BTreeMap::new();
        let mut value_counts: BTreeMap<(String, String), BTreeMap<String, u64>> = BTreeMap::new();
        const POOLED: &str = "";
        for record in seed {
            *scene_counts.entry(record.scene.clone()).or_default() += 1;
            for scene in [record.scene.as_str(), POOLED] {
                for (key, value) in &record.attributes {
                    let counts = attr_counts.entry((scene.to_string(), key.clone())).or_default();
                    count_once(counts, std::iter::once(value.as_str()));
                }
                let types: BTreeSet<&str> =
                    record.entities.iter().map(|e| e.kind.as_str()).collect();
                for kind in types {
                    let values = record
                        .entities
                        .iter()
                        .filter(|e| e.kind == kind)
                        .filter_map(|e| e.value.as_deref().or_else(|| record.span_text(e)));
                    let counts =
                        value_counts.entry((scene.to_string(), kind.to_string())).or_default();
                    count_once(counts, values);
                }
            }
        }

        let scenes = releaser.release(&scene_counts);
        let slots = scenes.keys().len() + 1;
        let mut model = Model {
            attributes: vec![Vec::new(); slots],
            values: vec![BTreeMap::new(); slots],
            histograms: Vec::new(),
            high_label: high_label(&attr_counts),
            scenes,
        };
        for ((scene, key), counts) in &attr_counts {
            let histogram = releaser.release(counts);
            if let Some(slot) = model.slot(scene)
                && !histogram.is_empty()
            {
                model.histograms.push(histogram);
                model.attributes[slot].push((key.clone(), model.histograms.len() - 1));
            }
        }
        for ((scene, kind), counts) in &value_counts {
            let histogram = releaser.release(counts);
            if let Some(slot) = model.slot(scene)
                && !histogram.is_empty()
            {
                model.histograms.push(histogram);
                model.values[slot].insert(kind.clone(), model.histograms.len() - 1);
            }
        }
        model
    }

    /// Index of a scene's distributions; the empty name is the pooled slot.
    fn slot(&self, scene: &str) -> Option<usize> {
        if scene.is_empty() {
            return Some(self.scenes.keys().len());
        }
        self.scenes.keys().binary_search_by(|k| k.as_str().cmp(scene)).ok()
    }

    fn pooled(&self) -> usize {
        self.scenes.keys().len()
    }
}

/// The seed's own word for high severity, so generated labels match its vocabulary.
fn high_label(attr_counts: &BTreeMap<(String, String), BTreeMap<String, u64>>) -> String {
    attr_counts
        .get(&(String::new(), "severity".to_string()))
        .and_then(|counts| {
            counts.keys().find(|v| Severity::parse(v) == Some(Severity::High)).cloned()
        })
        .unwrap_or_else(|| "high".to_string())
}

/// Prepares one template, or `None` when its slots cannot be filled under
/// this model and the pinned attributes.
fn compile(
    at: usize,
    template: &Template,
    model: &Model,
    config: &DetailConfig,
) -> Result<Option<Compiled>, DetailError> {
    let bad = |message: String| DetailError::BadTemplate { id: template.id.clone(), message };
    let scene = match (&template.scene, template.mode) {
        (Some(name), Mode::Hierarchical) => match model.slot(name) {
            Some(slot) if slot < model.pooled() => Some(slot),
            _ => return Ok(None),
        },
        (_, Mode::Hierarchical) => return Err(bad("hierarchical template without a scene".into())),
        (_, Mode::Flat) => None,
    };
    let value_slot = scene.unwrap_or(model.pooled());

    let mut sources = Vec::with_capacity(template.slots.len());
    let mut kinds = Vec::with_capacity(template.slots.len());
    for spec in &template.slots {
        let class = SlotClass::of(&spec.kind);
        let pooled_ok = class != SlotClass::Vehicle || scene.is_none();
        let histogram = model.values[value_slot]
            .get(&spec.kind)
            .or_else(|| model.values[model.pooled()].get(&spec.kind).filter(|_| pooled_ok))
            .copied();
        let Some(source) = source_for(class, &spec.shape, histogram) else {
            return Ok(None);
        };
        sources.push(source);
        kinds.push(spec.kind.clone());
    }
    let has_fatalities =
        template.slots.iter().any(|s| SlotClass::of(&s.kind) == SlotClass::Fatalities);
    let pinned_low =
        config.pinned.get("severity").is_some_and(|s| Severity::parse(s) != Some(Severity::High));
    if has_fatalities && pinned_low && template.mode == Mode::Hierarchical {
        return Ok(None);
    }

    let pieces = parse(&template.text).map_err(bad)?;
    let parts = compile_parts(&pieces, &template.slots).map_err(bad)?;
    let has_time = template.slots.iter().any(|s| SlotClass::of(&s.kind) == SlotClass::Time)
        || parts.iter().any(|p| matches!(p, Part::TimeWord { .. }));
    Ok(Some(Compiled {
        template: at,
        parts,
        sources,
        kinds,
        has_fatalities,
        has_time,
        mode: template.mode,
        scene,
    }))
}

fn source_for(class: SlotClass, shape: &Shape, histogram: Option<usize>) -> Option<Source> {
    Some(match shape {
        Shape::Clock { style, suffix } => Source::Clock { style: *style, suffix: suffix.clone() },
        Shape::Count { words, plural } => {
            Source::Count { fatal: class == SlotClass::Fatalities, words: *words, plural: *plural }
        }
        Shape::Address { district } => Source::Street { intersection: false, district: *district },
        Shape::Intersection { district } => {
            Source::Street { intersection: true, district: *district }
        }
        Shape::Pattern { pattern } => Source::Pattern(pattern.clone()),
        Shape::Plain => Source::Values(histogram?),
    })
}

/// Splits template text into literal runs, slots and time-of-day words.
fn compile_parts(
    pieces: &[Piece],
    slots: &[crate::synth::template::SlotSpec],
) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut sentence_start = true;
    for piece in pieces {
        match piece {
            Piece::Slot { kind, index } => {
                let slot = slots
                    .iter()
                    .position(|s| s.kind == *kind && s.index == *index)
                    .ok_or_else(|| format!("slot `{kind}#{index}` is not in `slots`"))?;
                parts.push(Part::Slot { slot, capital: sentence_start });
                sentence_start = false;
            }
            Piece::Text(text) => {
                split_time_words(text, &mut parts);
                let trimmed = text.trim_end();
                sentence_start = trimmed.ends_with(['.', '!', '?']) && trimmed.len() < text.len();
            }
        }
    }
    Ok(parts)
}

fn split_time_words(text: &str, parts: &mut Vec<Part>) {
    let mut literal_from = 0;
    let mut word_start = None;
    for (at, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        if c.is_alphabetic() {
            word_start.get_or_insert(at);
            continue;
        }
        let Some(start) = word_start.take() else {
            continue;
        };
        let word = &text[start..at];
        if time_word(word).is_none() {
            continue;
        }
        push_literal(parts, &text[literal_from..start]);
        let capital = word.starts_with(char::is_uppercase);
        parts.push(Part::TimeWord { original: word.to_lowercase(), capital });
        literal_from = at;
    }
    push_literal(parts, &text[literal_from..]);
}

fn push_literal(parts: &mut Vec<Part>, text: &str) {
    if !text.is_empty() {
        parts.push(Part::Text { text: text.to_string(), chars: text.chars().count() });
    }
}

/// Writes the record text and its entities.
fn assemble(
    compiled: &Compiled,
    values: &[String],
    day_part: Option<DayPart>,
) -> (String, Vec<Entity>) {
    let mut text = String::with_capacity(256);
    let mut chars = 0;
    let mut entities = Vec::with_capacity(values.len());
    for part in &compiled.parts {
        match part {
            Part::Text { text: literal, chars: n } => {
                text.push_str(literal);
                chars += n;
            }
            Part::Slot { slot, capital } => {
                let value =
                    if *capital { capitalise(&values[*slot]) } else { values[*slot].clone() };
                let start = chars;
                chars += value.chars().count();
                text.push_str(&value);
                entities.push(Entity {
                    kind: compiled.kinds[*slot].clone(),
                    start,
                    end: chars,
                    value: Some(value),
                });
            }
            Part::TimeWord { original, capital } => {
                let word = rewrite_time_word(original, day_part);
                let word = if *capital { capitalise(&word) } else { word };
                chars += word.chars().count();
                text.push_str(&word);
            }
        }
    }
    (text, entities)
}

/// The time-of-day word that agrees with `part`; the original when no part is known.
fn rewrite_time_word(original: &str, part: Option<DayPart>) -> String {
    let Some(part) = part else {
        return original.to_string();
    };
    if time_word(original) == Some(part) {
        return original.to_string();
    }
    match original.to_ascii_lowercase().as_str() {
        "tonight" | "overnight" => format!("this {}", part.name()),
        _ => part.name().to_string(),
    }
}

fn capitalise(value: &str) -> String {
    let mut chars = value.chars();
    match chars.next() {
        Some(first) if first.is_lowercase() => first.to_uppercase().chain(chars).collect(),
        _ => value.to_string(),
    }
}

fn clock(rng: &mut ChaCha8Rng, part: Option<DayPart>, style: ClockStyle, suffix: &str) -> String {
    let minute = match part {
        Some(part) => {
            let (start, len) = part.span();
            (start + rng.random_range(0..len)) % 1440
        }
        None => rng.random_range(0..1440),
    };
    let (hour, minute) = (minute / 60, minute % 60);
    match style {
        ClockStyle::H24 => format!("{hour:02}:{minute:02}{suffix}"),
        ClockStyle::Compact => format!("{hour:02}{minute:02}{suffix}"),
        ClockStyle::H12 => {
            let twelve = if hour % 12 == 0 { 12 } else { hour % 12 };
            format!("{twelve}:{minute:02}{}", meridiem(suffix, hour >= 12))
        }
    }
}

/// `suffix` with its am/pm letter set to `pm` or not, keeping case and dots.
fn meridiem(suffix: &str, pm: bool) -> String {
    let mut done = false;
    suffix
        .chars()
        .map(|c| {
            if done || !matches!(c, 'a' | 'p' | 'A' | 'P') {
                return c;
            }
            done = true;
            match (pm, c.is_uppercase()) {
                (true, true) => 'P',
                (true, false) => 'p',
                (false, true) => 'A',
                (false, false) => 'a',
            }
        })
        .collect()
}

fn count(rng: &mut ChaCha8Rng, fatal: bool, plural: bool, severity: Option<Severity>) -> u32 {
    if !plural {
        return 1;
    }
    let (low, high) = match (fatal, severity) {
        (true, _) => (2, 4),
        (false, Some(severity)) => severity.injured_range(),
        (false, None) => (1, 6),
    };
    let low = low.max(2);
    rng.random_range(low..=high.max(low))
}

fn plate(rng: &mut ChaCha8Rng, pattern: &str) -> String {
    pattern
        .chars()
        .map(|c| match c {
            'A' => char::from(b'A' + rng.random_range(0..26u8)),
            '9' => char::from(b'0' + rng.random_range(0..10u8)),
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_words_follow_the_day_part() {
        let evening = Some(DayPart::Evening);
        assert_eq!(rewrite_time_word("morning", evening), "evening");
        assert_eq!(rewrite_time_word("overnight", evening), "this evening");
        assert_eq!(rewrite_time_word("overnight", Some(DayPart::Night)), "overnight");
        assert_eq!(rewrite_time_word("night", None), "night");
    }

    #[test]
    fn clocks_and_plates_keep_their_shape() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let t = clock(&mut rng, Some(DayPart::Night), ClockStyle::H12, " p.m.");
            let minute = crate::synth::slot_class::parse_clock(&t).unwrap();
            assert_eq!(DayPart::of_minute(minute), DayPart::Night, "{t}");
        }
        let p = plate(&mut rng, "9AAA-999");
        assert!(
            p.len() == 8
                && p.as_bytes()[4] == b'-'
                && p[1..4].bytes().all(|b| b.is_ascii_uppercase())
        );
        assert_eq!(meridiem(" P.M.", false), " A.M.");
    }
}
