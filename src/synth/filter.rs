//! Keeps the generated records that are consistent, not copied and not
//! near-duplicates, and measures what is left.
//!
//! Records are taken in input order. A record the LLM backend of `detail`
//! flagged invalid (its answer could not be used) is dropped first, with the
//! reason it carries (see [`crate::synth::llm::INVALID_REASONS`]). Every
//! other record goes through [`crate::synth::checks`]; then it is dropped as
//! `copied_ngram` when it shares a run of `max_copied_ngram` words
//! (lowercase, punctuation ignored) verbatim with any seed report; then as
//! `near_duplicate` when its estimated
//! Jaccard similarity over word shingles with an already kept record reaches
//! the threshold. Similarity uses gaoya's MinHash LSH with fixed hash seeds;
//! band buckets are keyed by a randomly seeded hasher, which only changes
//! where candidates are stored, not which are found, so results are the same
//! on every run.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use gaoya::minhash::{MinHashIndex, MinHasher, MinHasher32};
use serde::Serialize;

use crate::corpus::Record;
use crate::synth::checks::{self, SeedFacts};
use crate::synth::llm;

const BANDS: usize = 32;
const BAND_WIDTH: usize = 4;

#[derive(Debug, Clone, Copy)]
pub struct FilterConfig {
    pub near_duplicate_threshold: f64,
    pub shingle_words: usize,
    /// 0 turns the copy check off.
    pub max_copied_ngram: usize,
}

/// One dropped record, one line of `dropped.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    pub id: String,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diversity {
    pub tokens: usize,
    pub distinct_1: f64,
    pub distinct_2: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemplateUsage {
    pub distinct: usize,
    pub max_share: f64,
    pub most_used: Option<String>,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct FilterReport {
    pub input: usize,
    pub kept: usize,
    pub dropped: BTreeMap<&'static str, usize>,
    pub diversity: Diversity,
    pub templates: TemplateUsage,
    pub scenes: BTreeMap<String, usize>,
}

pub struct FilterOutcome {
    pub kept: Vec<Record>,
    pub dropped: Vec<Dropped>,
    pub report: FilterReport,
}

/// Every reason `filter` gives to records of the template backend, in the
/// order it checks them. Records of the LLM backend can also be dropped for
/// one of [`llm::INVALID_REASONS`] (or `llm_invalid`), checked first.
pub fn reasons() -> impl Iterator<Item = &'static str> {
    checks::REASONS.iter().copied().chain(["copied_ngram", "near_duplicate"])
}

pub fn filter(records: Vec<Record>, seed: &[Record], config: &FilterConfig) -> FilterOutcome {
    let facts = SeedFacts::learn(seed);
    let seed_ngrams = ngram_set(seed, config.max_copied_ngram);
    let hasher = MinHasher32::new(BANDS * BAND_WIDTH);
    let mut index: MinHashIndex<u32, usize> =
        MinHashIndex::new(BANDS, BAND_WIDTH, config.near_duplicate_threshold);
    let input = records.len();
    let mut kept = Vec::new();
    let mut dropped = Vec::new();

    let mut from_llm = false;
    for record in records {
        from_llm |= record.provenance.as_ref().is_some_and(|p| p.generator == llm::GENERATOR);
        if let Some(flag) = record.attributes.get(llm::INVALID_ATTRIBUTE) {
            let (reason, detail) = llm::invalid_reason(flag);
            dropped.push(Dropped { id: record.id, reason, detail });
            continue;
        }
        let words = words(&record.text);
        let verdict = checks::check(&record, &facts)
            .map_err(|v| (v.reason, v.detail))
            .and_then(|()| copied(&words, &seed_ngrams, config.max_copied_ngram))
            .and_then(|()| {
                let signature = hasher.create_signature(shingles(&words, config.shingle_words));
                if index.query(&signature).is_empty() {
                    index.insert(kept.len(), signature);
                    Ok(())
                } else {
                    Err(("near_duplicate", "similar to a kept record".to_string()))
                }
            });
        match verdict {
            Ok(()) => kept.push(record),
            Err((reason, detail)) => dropped.push(Dropped { id: record.id, reason, detail }),
        }
    }
    let report = report(input, &kept, &dropped, from_llm);
    FilterOutcome { kept, dropped, report }
}

/// Lowercase alphanumeric words.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn shingles(words: &[String], size: usize) -> impl Iterator<Item = String> + '_ {
    let size = size.clamp(1, words.len().max(1));
    words.windows(size).map(|w| w.join(" "))
}

/// FNV-1a over the words of an n-gram: stable across runs and platforms.
fn ngram_hash(words: &[String]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for word in words {
        for byte in word.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn ngram_set(seed: &[Record], n: usize) -> HashSet<u64> {
    if n == 0 {
        return HashSet::new();
    }
    seed.iter()
        .flat_map(|r| words(&r.text).windows(n).map(ngram_hash).collect::<Vec<_>>())
        .collect()
}

fn copied(words: &[String], seed: &HashSet<u64>, n: usize) -> Result<(), (&'static str, String)> {
    if n == 0 {
        return Ok(());
    }
    match words.windows(n).find(|w| seed.contains(&ngram_hash(w))) {
        Some(window) => Err(("copied_ngram", format!("copies `{}`", window.join(" ")))),
        None => Ok(()),
    }
}

/// `from_llm`: some input came from the LLM backend, so its reasons are
/// listed even when nothing was dropped for them (they are left out
/// otherwise, so that template-backend reports stay as they were).
fn report(input: usize, kept: &[Record], dropped: &[Dropped], from_llm: bool) -> FilterReport {
    let llm_reasons = llm::INVALID_REASONS.iter().copied().filter(|_| from_llm);
    let mut dropped_counts: BTreeMap<&'static str, usize> =
        reasons().chain(llm_reasons).map(|r| (r, 0)).collect();
    for d in dropped {
        *dropped_counts.entry(d.reason).or_default() += 1;
    }
    let mut scenes = BTreeMap::new();
    let mut usage: BTreeMap<&str, usize> = BTreeMap::new();
    for record in kept {
        *scenes.entry(record.scene.clone()).or_default() += 1;
        if let Some(p) = &record.provenance {
            *usage.entry(p.template_id.as_str()).or_default() += 1;
        }
    }
    let most_used = usage.iter().max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)));
    FilterReport {
        input,
        kept: kept.len(),
        dropped: dropped_counts,
        diversity: diversity(kept),
        templates: TemplateUsage {
            distinct: usage.len(),
            max_share: most_used.map_or(0.0, |(_, n)| round(*n as f64 / kept.len() as f64)),
            most_used: most_used.map(|(id, _)| id.to_string()),
        },
        scenes,
    }
}

/// Distinct-1 and distinct-2: distinct unigrams (bigrams) over all of them.
pub fn diversity(records: &[Record]) -> Diversity {
    let mut unigrams = BTreeSet::new();
    let mut bigrams = BTreeSet::new();
    let (mut tokens, mut pairs) = (0, 0);
    for record in records {
        let words = words(&record.text);
        tokens += words.len();
        pairs += words.len().saturating_sub(1);
        for pair in words.windows(2) {
            bigrams.insert(ngram_hash(pair));
        }
        unigrams.extend(words);
    }
    let ratio = |distinct: usize, total: usize| {
        if total == 0 { 0.0 } else { round(distinct as f64 / total as f64) }
    };
    Diversity {
        tokens,
        distinct_1: ratio(unigrams.len(), tokens),
        distinct_2: ratio(bigrams.len(), pairs),
    }
}

/// Six decimals, so reports do not show float noise.
fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}
