//! Scores of a set of model outputs, one per evaluation example, pooled
//! over examples with bootstrap intervals.
//!
//! The headline figures the report tables show:
//!
//! - **key F1**: entity precision, recall and F1 over the schema's key
//!   types only (the paper's key-entity F1); the all-types figures and the
//!   per-type counts stand beside it.
//! - **CIRS**: key facts stated over key facts, pooled over the summary and
//!   alert outputs.
//! - **CCI**: consistent facts over stated facts, pooled over the outputs of
//!   all three subtasks.
//!
//! Each per-example outcome is kept ([`Outcome`]) so a reader can see why a
//! figure is what it is; a malformed output (an alert line that does not
//! split into five fields, an entity list with no `type: value` line) is
//! scored as wrong and counted in `malformed`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metrics::{
    Consistency, Counts, Lexicon, alert_consistency, bootstrap_interval, entities_consistency,
    match_entities, micro, retained, text_consistency,
};
use crate::adapt::tasks::{Example, NO_ENTITIES, REPORT_HEADER, Task, parse_alert, parse_entities};
use crate::schema::EntitySchema;

/// A model's output for one example, with what it scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    pub task: Task,
    pub output: String,
    pub target: String,
    /// Whether generation stopped at the token limit.
    pub truncated: bool,
    /// The output has the task's form (see the module doc).
    pub well_formed: bool,
    /// Entity counts over all scored types (entities task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, Counts>>,
    /// Key facts stated and in all (summary and alert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<(usize, usize)>,
    pub consistency: Consistency,
}

/// A pooled ratio and its 95% bootstrap interval; the bounds are NaN (null
/// in JSON) when no interval could be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub value: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub low: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub high: f64,
}

/// serde_json writes NaN as `null`; read it back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(de: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(de)?.unwrap_or(f64::NAN))
}

/// Precision, recall and F1 of entity extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: Figure,
    pub counts: Counts,
}

/// What [`score`] makes of a set of outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Examples per task.
    pub examples: BTreeMap<Task, usize>,
    /// Outputs without their task's form, per task.
    pub malformed: BTreeMap<Task, usize>,
    /// Over the schema's key types: the headline F1.
    pub key_entities: Option<EntityScores>,
    /// Over every scored type.
    pub all_entities: Option<EntityScores>,
    /// Counts per normalized type.
    pub per_type: BTreeMap<String, Counts>,
    /// Pooled over summary and alert outputs.
    pub cirs: Option<Figure>,
    /// Pooled over every output that states a fact.
    pub cci: Option<Figure>,
    /// CIRS and CCI of each text task on its own.
    pub per_task: BTreeMap<Task, TaskFigures>,
}

/// CIRS and CCI of one task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskFigures {
    pub cirs: Option<f64>,
    pub cci: Option<f64>,
}

/// How outputs are scored.
#[derive(Debug, Clone)]
pub struct ScoreConfig<'a> {
    pub schema: &'a EntitySchema,
    /// Entity types to score; empty scores every type.
    pub entity_types: &'a [String],
    pub resamples: usize,
    pub seed: u64,
}

/// The report text of an example: its prompt after the `Report:` header.
pub fn report_text(example: &Example) -> &str {
    example.prompt.split_once(REPORT_HEADER).map_or(example.prompt.as_str(), |(_, text)| text)
}

/// The lexicon [`text_consistency`] reads summaries with: every entity value
/// of the examples.
pub fn lexicon(examples: &[Example]) -> Lexicon {
    Lexicon::new(examples.iter().flat_map(|e| e.spans.iter().map(|s| s.value.as_str())))
}

/// Scores one output against its example.
pub fn outcome(
    example: &Example,
    output: &str,
    truncated: bool,
    lexicon: &Lexicon,
    entity_types: &[String],
) -> Outcome {
    let source = report_text(example);
    let mut outcome = Outcome {
        id: example.id.clone(),
        task: example.task,
        output: output.to_string(),
        target: example.target.clone(),
        truncated,
        well_formed: true,
        counts: None,
        retained: None,
        consistency: Consistency::default(),
    };
    match example.task {
        Task::Entities => {
            let keep = |pairs: Vec<(String, String)>| -> Vec<(String, String)> {
                pairs
                    .into_iter()
                    .filter(|(kind, _)| {
                        entity_types.is_empty() || entity_types.iter().any(|t| t == kind)
                    })
                    .collect()
            };
            let predicted_all = parse_entities(output);
            outcome.well_formed =
                !predicted_all.is_empty() || output.trim().eq_ignore_ascii_case(NO_ENTITIES);
            let (gold, predicted) = (keep(parse_entities(&example.target)), keep(predicted_all));
            outcome.counts = Some(match_entities(&gold, &predicted));
            outcome.consistency = entities_consistency(&predicted, &gold, source);
        }
        Task::Summary => {
            outcome.retained = Some(retained(&example.key_facts, output));
            outcome.consistency = text_consistency(output, source, lexicon);
        }
        Task::Alert => {
            outcome.well_formed = parse_alert(output).is_some();
            outcome.retained = Some(retained(&example.key_facts, output));
            if let Some(gold) = parse_alert(&example.target) {
                outcome.consistency = alert_consistency(output, &gold, source);
            }
        }
    }
    outcome
}

/// Pools outcomes into the figures of [`Scores`].
pub fn score(outcomes: &[Outcome], config: &ScoreConfig<'_>) -> Scores {
    let mut examples: BTreeMap<Task, usize> = BTreeMap::new();
    let mut malformed: BTreeMap<Task, usize> = BTreeMap::new();
    for o in outcomes {
        *examples.entry(o.task).or_default() += 1;
        *malformed.entry(o.task).or_default() += usize::from(!o.well_formed);
    }
    let entity: Vec<&Outcome> = outcomes.iter().filter(|o| o.counts.is_some()).collect();
    let text: Vec<&Outcome> = outcomes.iter().filter(|o| o.retained.is_some()).collect();
    let key = |kind: &str| config.schema.is_key(kind);
    let per_type = pooled_counts(&entity, |_| true);
    let mut per_task = BTreeMap::new();
    for task in [Task::Summary, Task::Alert] {
        let of_task: Vec<&Outcome> = outcomes.iter().filter(|o| o.task == task).collect();
        if !of_task.is_empty() {
            per_task.insert(
                task,
                TaskFigures { cirs: retention(&of_task), cci: consistency(&of_task) },
            );
        }
    }
    Scores {
        examples,
        malformed,
        key_entities: entity_scores(&entity, &key, config),
        all_entities: entity_scores(&entity, &|_| true, config),
        per_type,
        cirs: figure(&text, retention, config),
        cci: {
            let all: Vec<&Outcome> = outcomes.iter().collect();
            figure(&all, consistency, config)
        },
        per_task,
    }
}

/// Counts over the outcomes, of the types `keep` accepts.
fn pooled_counts(outcomes: &[&Outcome], keep: impl Fn(&str) -> bool) -> BTreeMap<String, Counts> {
    let mut total: BTreeMap<String, Counts> = BTreeMap::new();
    for counts in outcomes.iter().filter_map(|o| o.counts.as_ref()) {
        for (kind, c) in counts.iter().filter(|(kind, _)| keep(kind)) {
            total.entry(kind.clone()).or_default().add(*c);
        }
    }
    total
}

fn entity_scores(
    outcomes: &[&Outcome],
    keep: &dyn Fn(&str) -> bool,
    config: &ScoreConfig<'_>,
) -> Option<EntityScores> {
    let counts = micro(&pooled_counts(outcomes, keep));
    if outcomes.is_empty() || counts.tp + counts.fp + counts.fn_ == 0 {
        return None;
    }
    let f1 = |sample: &[&&Outcome]| {
        let refs: Vec<&Outcome> = sample.iter().map(|o| **o).collect();
        micro(&pooled_counts(&refs, keep)).f1()
    };
    let (low, high) = bootstrap_interval(outcomes, f1, config.resamples, config.seed);
    Some(EntityScores {
        precision: counts.precision(),
        recall: counts.recall(),
        f1: Figure { value: counts.f1(), low, high },
        counts,
    })
}

/// A pooled ratio over `outcomes` and its interval; `None` when undefined.
fn figure(
    outcomes: &[&Outcome],
    ratio: fn(&[&Outcome]) -> Option<f64>,
    config: &ScoreConfig<'_>,
) -> Option<Figure> {
    let value = ratio(outcomes)?;
    let stat = |sample: &[&&Outcome]| {
        let refs: Vec<&Outcome> = sample.iter().map(|o| **o).collect();
        ratio(&refs).unwrap_or(f64::NAN)
    };
    let (low, high) = bootstrap_interval(outcomes, stat, config.resamples, config.seed);
    Some(Figure { value, low, high })
}

/// Key facts stated over key facts.
fn retention(outcomes: &[&Outcome]) -> Option<f64> {
    let (stated, total) = outcomes
        .iter()
        .filter_map(|o| o.retained)
        .fold((0, 0), |(s, t), (stated, total)| (s + stated, t + total));
    (total > 0).then(|| stated as f64 / total as f64)
}

/// Consistent facts over stated facts.
fn consistency(outcomes: &[&Outcome]) -> Option<f64> {
    let mut total = Consistency::default();
    for o in outcomes {
        total.add(o.consistency);
    }
    total.ratio()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::tasks::KeyFact;
    use crate::schema::EntityRole;

    fn schema() -> EntitySchema {
        EntitySchema(BTreeMap::from([
            ("time".to_string(), EntityRole::Key),
            ("weather".to_string(), EntityRole::Peripheral),
        ]))
    }

    fn example(task: Task, target: &str, facts: &[(&str, &str)]) -> Example {
        Example {
            id: format!("r1:{}", task.name()),
            task,
            source_id: "r1".into(),
            template_id: None,
            prompt: format!("Do it.{REPORT_HEADER}At 14:30 in light rain a van hit a wall."),
            target: target.into(),
            key_facts: facts
                .iter()
                .map(|(k, v)| KeyFact { kind: k.to_string(), value: v.to_string() })
                .collect(),
            spans: Vec::new(),
        }
    }

    fn config(schema: &EntitySchema) -> ScoreConfig<'_> {
        ScoreConfig { schema, entity_types: &[], resamples: 200, seed: 3 }
    }

    #[test]
    fn key_f1_counts_only_key_types() {
        let ex = example(Task::Entities, "time: 14:30\nweather: light rain", &[("time", "14:30")]);
        let lex = Lexicon::default();
        // Right time, wrong weather.
        let o = outcome(&ex, "time: 14:30\nweather: snow", false, &lex, &[]);
        assert!(o.well_formed);
        let s = score(&[o], &config(&schema()));
        let key = s.key_entities.unwrap();
        assert_eq!((key.counts.tp, key.counts.fp, key.counts.fn_), (1, 0, 0));
        assert_eq!(key.f1.value, 1.0);
        let all = s.all_entities.unwrap();
        assert_eq!((all.counts.tp, all.counts.fp, all.counts.fn_), (1, 1, 1));
        assert!((all.f1.value - 0.5).abs() < 1e-12);
        // `snow` is not in the report: one invented fact of two.
        assert_eq!(s.cci.unwrap().value, 0.5);
    }

    #[test]
    fn malformed_outputs_are_wrong_and_counted() {
        let alert = example(
            Task::Alert,
            "COLLISION | unknown | 14:30 | minor | vehicle collision",
            &[("time", "14:30")],
        );
        let entities = example(Task::Entities, "time: 14:30", &[("time", "14:30")]);
        let lex = Lexicon::default();
        let outcomes = [
            outcome(&alert, "a van crashed at 14:30", false, &lex, &[]),
            outcome(&entities, "I cannot help with that", true, &lex, &[]),
        ];
        let s = score(&outcomes, &config(&schema()));
        assert_eq!(s.malformed[&Task::Alert], 1);
        assert_eq!(s.malformed[&Task::Entities], 1);
        // The alert states the time (CIRS counts it) but does not parse (CCI 0).
        assert_eq!(s.cirs.unwrap().value, 1.0);
        assert_eq!(s.cci.unwrap().value, 0.0);
        assert_eq!(s.key_entities.unwrap().recall, 0.0);
    }

    #[test]
    fn entity_types_restrict_scoring() {
        let ex = example(Task::Entities, "time: 14:30\nweather: light rain", &[]);
        let types = ["weather".to_string()];
        let o =
            outcome(&ex, "time: 09:00\nweather: light rain", false, &Lexicon::default(), &types);
        let counts = micro(o.counts.as_ref().unwrap());
        assert_eq!((counts.tp, counts.fp, counts.fn_), (1, 0, 0));
    }

    #[test]
    fn a_figure_without_an_interval_survives_json() {
        let f = Figure { value: 0.5, low: f64::NAN, high: f64::NAN };
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(text, r#"{"value":0.5,"low":null,"high":null}"#);
        let back: Figure = serde_json::from_str(&text).unwrap();
        assert!(back.value == 0.5 && back.low.is_nan() && back.high.is_nan());
    }

    #[test]
    fn intervals_bracket_the_value_and_repeat() {
        let lex = Lexicon::default();
        let good = example(Task::Summary, "x", &[("time", "14:30")]);
        let outs: Vec<Outcome> = (0..20)
            .map(|i| {
                outcome(&good, if i % 4 == 0 { "nothing" } else { "at 14:30" }, false, &lex, &[])
            })
            .collect();
        let a = score(&outs, &config(&schema()));
        let b = score(&outs, &config(&schema()));
        assert_eq!(a, b);
        let cirs = a.cirs.unwrap();
        assert_eq!(cirs.value, 0.75);
        assert!(cirs.low <= cirs.value && cirs.value <= cirs.high && cirs.low < cirs.high);
    }
}
