//! IDRISI-R English gold: disaster tweets, one JSON object per line, with
//! `humAID_class` and `location_mentions` (`text`, `type`, `start_offset`,
//! `end_offset`, character offsets). Each tweet becomes a record of scene
//! `humAID_class` with `location` entities and an `event` attribute taken from
//! the file name (`hurricane_irma_2017_train.jsonl` -> `hurricane_irma_2017`).
//! A mention whose offsets do not slice out its text is moved to the nearest
//! occurrence of that text, or dropped when there is none.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use crate::corpus::{CharIndex, Entity, Record, read_lines};
use crate::schema::EntitySchema;
use crate::stage::StageError;
use crate::synth::seed::{SeedStats, tidy_spans};

#[derive(Deserialize)]
struct Tweet {
    tweet_id: Option<String>,
    text: String,
    #[serde(rename = "humAID_class")]
    class: String,
    #[serde(default)]
    location_mentions: Vec<Mention>,
}

#[derive(Deserialize)]
struct Mention {
    text: String,
    start_offset: usize,
    end_offset: usize,
}

/// Reads one file, appending to `records`, until `limit` records are held.
pub fn read(
    path: &Path,
    schema: &EntitySchema,
    records: &mut Vec<Record>,
    ids: &mut BTreeSet<String>,
    stats: &mut SeedStats,
    limit: usize,
) -> Result<(), StageError> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let event = stem.trim_end_matches("_train").trim_end_matches("_dev").trim_end_matches("_test");
    for (number, line) in read_lines(path)? {
        if records.len() >= limit {
            break;
        }
        let tweet: Tweet = serde_json::from_str(&line)
            .map_err(|e| StageError::data(path, Some(number), e.to_string()))?;
        let id = tweet.tweet_id.clone().unwrap_or_else(|| format!("{stem}-{number}"));
        if tweet.text.trim().is_empty() || !ids.insert(id.clone()) {
            stats.skip_report(if tweet.text.trim().is_empty() {
                "empty_text"
            } else {
                "repeated_id"
            });
            continue;
        }
        let entities = locate(&tweet, stats);
        stats.read += 1;
        records.push(Record {
            id,
            entities: tidy_spans(&tweet.text, entities, schema, stats),
            text: tweet.text,
            scene: tweet.class,
            attributes: BTreeMap::from([("event".to_string(), event.to_string())]),
            synthetic: false,
            provenance: None,
        });
    }
    Ok(())
}

/// Mentions as entities, repaired or dropped when their offsets are off.
fn locate(tweet: &Tweet, stats: &mut SeedStats) -> Vec<Entity> {
    let index = CharIndex::new(&tweet.text);
    let mut entities = Vec::new();
    for mention in &tweet.location_mentions {
        let (start, end) = (mention.start_offset, mention.end_offset);
        let span = if index.slice(&tweet.text, start, end) == Some(mention.text.as_str()) {
            Some((start, end))
        } else {
            let found = nearest(&tweet.text, &index, &mention.text, start);
            if found.is_some() {
                stats.repaired += 1;
            } else {
                stats.drop_span("mention_not_found");
            }
            found
        };
        if let Some((start, end)) = span {
            entities.push(Entity { kind: "location".into(), start, end, value: None });
        }
    }
    entities
}

/// Char span of the occurrence of `needle` nearest to char offset `near`.
fn nearest(text: &str, index: &CharIndex, needle: &str, near: usize) -> Option<(usize, usize)> {
    if needle.is_empty() {
        return None;
    }
    let len = needle.chars().count();
    text.match_indices(needle)
        .filter_map(|(at, _)| index.char_at_byte(at))
        .min_by_key(|&start| start.abs_diff(near))
        .map(|start| (start, start + len))
}
