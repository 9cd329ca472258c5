//! G_scene with the template backend: coarse report templates per scene
//! category, learned from the delexicalised seed.
//!
//! Hierarchical mode learns, per scene, a first-order Markov chain over
//! sentence roles (`^` -> role -> ... -> `$`, counts from the seed reports)
//! and a pool of seed sentences per (scene, role). A template is one walk of
//! the chain, each role filled with a sentence drawn from its pool; walks are
//! cut at the longest seed report of the scene. Flat mode, the "without
//! hierarchical generation" ablation, pools the sentences of every scene and
//! draws them in no order, with a length taken from a random seed report.
//! Both keep only distinct templates, and drop those whose text denies a
//! count they have a slot for ("no injuries" beside `{injured}`); slots are renumbered per template so
//! that sentences from different reports never share a slot by accident.

use std::collections::{BTreeMap, BTreeSet};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::corpus::Record;
use crate::synth::delex::{DelexReport, delexicalise};
use crate::synth::slot_class::{SlotClass, denies_count};
use crate::synth::template::{Mode, Piece, SlotSpec, Template, render};

const START: &str = "^";
const END: &str = "$";
/// Draws allowed per wanted template before a scene gives up on new ones.
const ATTEMPTS_PER_TEMPLATE: usize = 20;

/// What `scene` reports about one scene category.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SceneFigures {
    pub seed_reports: usize,
    pub sentences: usize,
    /// Pool size per role.
    pub roles: BTreeMap<String, usize>,
    /// `from -> to` role transition counts.
    pub transitions: BTreeMap<String, u64>,
    pub templates: usize,
    pub duplicate_draws: usize,
    /// Draws whose text denies a count it has a slot for ("no injuries" and `{injured}`).
    pub contradictory_draws: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SceneStats {
    pub mode: Mode,
    pub templates: usize,
    pub scenes: BTreeMap<String, SceneFigures>,
}

/// Where a sentence sits: (report, sentence) indices.
type SentenceRef = (usize, usize);

/// Builds templates from seed records; the same seed and `rng_seed` give the same templates.
pub fn build_templates(
    seed: &[Record],
    mode: Mode,
    templates_per_scene: usize,
    rng_seed: u64,
) -> (Vec<Template>, SceneStats) {
    let reports: Vec<DelexReport> = seed.iter().map(delexicalise).collect();
    let mut by_scene: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (at, record) in seed.iter().enumerate() {
        by_scene.entry(record.scene.as_str()).or_default().push(at);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let mut stats = SceneStats { mode, templates: 0, scenes: BTreeMap::new() };
    let mut templates = Vec::new();

    for (scene, members) in &by_scene {
        let mut figures = describe_scene(&reports, members);
        if mode == Mode::Hierarchical {
            let model = SceneModel::learn(&reports, members);
            let mut draw = |rng: &mut ChaCha8Rng| model.draw(rng);
            let made =
                collect(&reports, seed, Some(scene), templates_per_scene, &mut rng, &mut draw);
            figures.templates = made.0.len();
            figures.duplicate_draws = made.1.duplicates;
            figures.contradictory_draws = made.1.contradictions;
            figures.transitions = model.transition_counts();
            templates.extend(made.0);
        }
        stats.scenes.insert(scene.to_string(), figures);
    }

    if mode == Mode::Flat {
        let all: Vec<usize> = (0..seed.len()).collect();
        let pool: Vec<SentenceRef> = sentence_refs(&reports, &all).collect();
        let lengths: Vec<usize> = reports.iter().map(|r| r.sentences.len()).collect();
        let mut draw = |rng: &mut ChaCha8Rng| draw_flat(&pool, &lengths, rng);
        let wanted = templates_per_scene * by_scene.len();
        templates = collect(&reports, seed, None, wanted, &mut rng, &mut draw).0;
    }
    stats.templates = templates.len();
    (templates, stats)
}

fn describe_scene(reports: &[DelexReport], members: &[usize]) -> SceneFigures {
    let mut figures = SceneFigures { seed_reports: members.len(), ..Default::default() };
    for &(report, sentence) in &sentence_refs(reports, members).collect::<Vec<_>>() {
        figures.sentences += 1;
        let role = reports[report].sentences[sentence].role;
        *figures.roles.entry(role.to_string()).or_default() += 1;
    }
    figures
}

fn sentence_refs<'a>(
    reports: &'a [DelexReport],
    members: &'a [usize],
) -> impl Iterator<Item = SentenceRef> + 'a {
    members.iter().flat_map(move |&r| (0..reports[r].sentences.len()).map(move |s| (r, s)))
}

/// Draws thrown away while collecting templates.
#[derive(Debug, Default)]
struct Rejected {
    duplicates: usize,
    contradictions: usize,
}

/// Draws until `wanted` distinct, self-consistent templates exist or the
/// attempts run out.
fn collect(
    reports: &[DelexReport],
    seed: &[Record],
    scene: Option<&str>,
    wanted: usize,
    rng: &mut ChaCha8Rng,
    draw: &mut dyn FnMut(&mut ChaCha8Rng) -> Vec<SentenceRef>,
) -> (Vec<Template>, Rejected) {
    let mode = if scene.is_some() { Mode::Hierarchical } else { Mode::Flat };
    let mut seen = BTreeSet::new();
    let mut templates = Vec::new();
    let mut rejected = Rejected::default();
    for _ in 0..wanted * ATTEMPTS_PER_TEMPLATE {
        if templates.len() == wanted {
            break;
        }
        let picks = draw(rng);
        if picks.is_empty() {
            continue;
        }
        let template = compose(reports, seed, &picks, mode, scene);
        if template.slots.iter().any(|s| denies_count(&template.text, SlotClass::of(&s.kind))) {
            rejected.contradictions += 1;
        } else if seen.insert(template.id.clone()) {
            templates.push(template);
        } else {
            rejected.duplicates += 1;
        }
    }
    (templates, rejected)
}

/// Per-scene role chain and sentence pools.
struct SceneModel {
    transitions: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    pools: BTreeMap<&'static str, Vec<SentenceRef>>,
    max_len: usize,
}

impl SceneModel {
    fn learn(reports: &[DelexReport], members: &[usize]) -> Self {
        let mut transitions: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        let mut pools: BTreeMap<&str, Vec<SentenceRef>> = BTreeMap::new();
        let mut max_len = 1;
        for &r in members {
            let sentences = &reports[r].sentences;
            max_len = max_len.max(sentences.len());
            let mut previous = START;
            for (s, sentence) in sentences.iter().enumerate() {
                *transitions.entry(previous).or_default().entry(sentence.role).or_default() += 1;
                pools.entry(sentence.role).or_default().push((r, s));
                previous = sentence.role;
            }
            *transitions.entry(previous).or_default().entry(END).or_default() += 1;
        }
        Self { transitions, pools, max_len }
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> Vec<SentenceRef> {
        let mut picks: Vec<SentenceRef> = Vec::new();
        let mut role = START;
        while picks.len() < self.max_len {
            role = match self.transitions.get(role).and_then(|next| weighted(next, rng)) {
                Some(next) if next != END => next,
                _ => break,
            };
            let pool = &self.pools[role];
            let pick = pool[rng.random_range(0..pool.len())];
            if !picks.contains(&pick) {
                picks.push(pick);
            }
        }
        picks
    }

    fn transition_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (from, next) in &self.transitions {
            for (to, count) in next {
                counts.insert(format!("{from} -> {to}"), *count);
            }
        }
        counts
    }
}

fn weighted<'a>(options: &BTreeMap<&'a str, u64>, rng: &mut ChaCha8Rng) -> Option<&'a str> {
    let total: u64 = options.values().sum();
    if total == 0 {
        return None;
    }
    let mut at = rng.random_range(0..total);
    for (key, &count) in options {
        if at < count {
            return Some(key);
        }
        at -= count;
    }
    None
}

fn draw_flat(pool: &[SentenceRef], lengths: &[usize], rng: &mut ChaCha8Rng) -> Vec<SentenceRef> {
    if pool.is_empty() {
        return Vec::new();
    }
    let len = lengths[rng.random_range(0..lengths.len())].max(1);
    let mut picks = Vec::with_capacity(len);
    for _ in 0..len {
        let pick = pool[rng.random_range(0..pool.len())];
        if !picks.contains(&pick) {
            picks.push(pick);
        }
    }
    picks
}

/// Joins the picked sentences into one template, renumbering slots.
fn compose(
    reports: &[DelexReport],
    seed: &[Record],
    picks: &[SentenceRef],
    mode: Mode,
    scene: Option<&str>,
) -> Template {
    let mut renumbered: BTreeMap<(usize, &str, u32), u32> = BTreeMap::new();
    let mut next_index: BTreeMap<&str, u32> = BTreeMap::new();
    let mut pieces = Vec::new();
    let mut slots = Vec::new();
    let mut roles = Vec::new();
    let mut seed_ids = BTreeSet::new();
    for (n, &(r, s)) in picks.iter().enumerate() {
        let sentence = &reports[r].sentences[s];
        roles.push(sentence.role.to_string());
        seed_ids.insert(seed[r].id.clone());
        if n > 0 {
            pieces.push(Piece::Text(" ".to_string()));
        }
        for piece in &sentence.pieces {
            let Piece::Slot { kind, index } = piece else {
                pieces.push(piece.clone());
                continue;
            };
            let new_index = *renumbered.entry((r, kind.as_str(), *index)).or_insert_with(|| {
                let next = next_index.entry(kind.as_str()).or_insert(0);
                *next += 1;
                let shape = reports[r].shapes[&(kind.clone(), *index)].clone();
                slots.push(SlotSpec { kind: kind.clone(), index: *next, shape });
                *next
            });
            pieces.push(Piece::Slot { kind: kind.clone(), index: new_index });
        }
    }
    let text = render(&merge_text(pieces));
    Template {
        id: Template::content_id(mode, scene, &text),
        mode,
        scene: scene.map(str::to_string),
        text,
        roles,
        slots,
        seed_ids: seed_ids.into_iter().collect(),
    }
}

fn merge_text(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text(last)), Piece::Text(text)) => last.push_str(&text),
            (_, piece) => merged.push(piece),
        }
    }
    merged
}
