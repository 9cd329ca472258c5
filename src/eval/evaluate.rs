//! One evaluation from end to end: answer every example, score the
//! answers, measure general ability and embed entity spans. The `eval`
//! stage and `watchfire eval` both call [`evaluate`].

use serde::{Deserialize, Serialize};

use super::embed::{SpanEmbedding, separation, span_embeddings};
use super::general::{GeneralConfig, GeneralScores, general_ability};
use super::score::{Outcome, ScoreConfig, Scores, lexicon, outcome, score};
use super::subject::{Subject, SubjectError};
use crate::adapt::export::AdapterMeta;
use crate::adapt::tasks::{Example, Task};
use crate::model::load::LoadedModel;
use crate::schema::EntitySchema;

/// Token limits of the answers, per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MaxTokens {
    pub entities: usize,
    pub summary: usize,
    pub alert: usize,
}

impl Default for MaxTokens {
    fn default() -> Self {
        Self { entities: 96, summary: 96, alert: 48 }
    }
}

impl MaxTokens {
    pub fn of(&self, task: Task) -> usize {
        match task {
            Task::Entities => self.entities,
            Task::Summary => self.summary,
            Task::Alert => self.alert,
        }
    }
}

/// What to evaluate and how.
pub struct EvalConfig<'a> {
    pub schema: &'a EntitySchema,
    pub max_tokens: MaxTokens,
    /// Entity types to score; empty scores all.
    pub entity_types: &'a [String],
    pub resamples: usize,
    pub seed: u64,
    /// Prompts of one task decoded together.
    pub batch: usize,
    /// Layer of the span embeddings, and how many reports to embed (0: none).
    pub embedding_layer: usize,
    pub embedding_reports: usize,
    /// General text for the retained-ability figures, with their settings.
    pub general: Option<(&'a [String], GeneralConfig)>,
}

/// What the model under evaluation is, as `metrics.json` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectInfo {
    /// `base` when there is no adapter, else the training method.
    pub method: String,
    pub trainable_parameters: usize,
    pub base_parameters: usize,
    /// Trainable share of the base model's parameters, in percent.
    pub trainable_percent: f64,
    pub prefixes: Vec<Task>,
}

impl SubjectInfo {
    pub fn of(subject: &Subject, base: &LoadedModel) -> Self {
        let base_parameters: usize =
            base.tensors().values().map(candle_core::Tensor::elem_count).sum();
        let meta: Option<&AdapterMeta> = subject.adapter.as_ref().map(|a| &a.meta);
        let trainable = meta.map_or(0, |m| m.trainable_parameters);
        let method = match meta {
            Some(m) => serde_json::to_value(m.method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            None => "base".to_string(),
        };
        Self {
            method,
            trainable_parameters: trainable,
            base_parameters,
            trainable_percent: 100.0 * trainable as f64 / base_parameters.max(1) as f64,
            prefixes: subject
                .adapter
                .as_ref()
                .map_or_else(Vec::new, |a| a.prefixes.keys().copied().collect()),
        }
    }
}

/// Span embeddings summed up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingSummary {
    pub layer: usize,
    pub key: usize,
    pub peripheral: usize,
    /// Mean silhouette of key vs peripheral (see [`super::embed`]).
    pub separation: Option<f64>,
}

/// Everything one evaluation finds.
pub struct Evaluation {
    pub outcomes: Vec<Outcome>,
    pub scores: Scores,
    pub general: Option<GeneralScores>,
    pub embeddings: Vec<SpanEmbedding>,
    pub embedding_summary: Option<EmbeddingSummary>,
}

/// Answers every example, `config.batch` prompts of one task at a time
/// (shortest first, so rows of a batch pad little), then scores; `progress`
/// is called with the number of answers after each batch.
pub fn evaluate(
    subject: &Subject,
    base: &LoadedModel,
    examples: &[Example],
    config: &EvalConfig<'_>,
    mut progress: impl FnMut(usize),
) -> Result<Evaluation, SubjectError> {
    let lexicon = lexicon(examples);
    let mut answers: Vec<Option<(String, bool)>> = vec![None; examples.len()];
    for task in Task::ALL {
        let mut order: Vec<usize> =
            (0..examples.len()).filter(|&i| examples[i].task == task).collect();
        order.sort_by_key(|&i| (examples[i].prompt.len(), i));
        for chunk in order.chunks(config.batch.max(1)) {
            let prompts: Vec<&str> = chunk.iter().map(|&i| examples[i].prompt.as_str()).collect();
            let batch = subject.answer_batch(task, &prompts, config.max_tokens.of(task))?;
            for (&i, answer) in chunk.iter().zip(batch) {
                answers[i] = Some(answer);
            }
            progress(chunk.len());
        }
    }
    let outcomes: Vec<Outcome> = examples
        .iter()
        .zip(answers)
        .map(|(example, answer)| {
            let (output, truncated) = answer.unwrap_or_default();
            outcome(example, &output, truncated, &lexicon, config.entity_types)
        })
        .collect();
    let score_config = ScoreConfig {
        schema: config.schema,
        entity_types: config.entity_types,
        resamples: config.resamples,
        seed: config.seed,
    };
    let scores = score(&outcomes, &score_config);
    let general = match &config.general {
        Some((documents, general)) if !documents.is_empty() => {
            Some(general_ability(base, subject, documents, general)?)
        }
        _ => None,
    };
    let embeddings = if config.embedding_reports > 0 {
        span_embeddings(subject, examples, config.embedding_layer, config.embedding_reports)?
    } else {
        Vec::new()
    };
    let embedding_summary = (!embeddings.is_empty()).then(|| {
        let key = embeddings.iter().filter(|e| e.role == crate::schema::EntityRole::Key).count();
        EmbeddingSummary {
            layer: config.embedding_layer,
            key,
            peripheral: embeddings.len() - key,
            separation: separation(&embeddings),
        }
    });
    Ok(Evaluation { outcomes, scores, general, embeddings, embedding_summary })
}

/// How many reports the examples come from.
pub fn report_count(examples: &[Example]) -> usize {
    let ids: std::collections::BTreeSet<&str> =
        examples.iter().map(|e| e.source_id.as_str()).collect();
    ids.len()
}

/// The examples of the first `max` reports, in order; all when `max` is 0.
pub fn first_reports(mut examples: Vec<Example>, max: usize) -> Vec<Example> {
    if max == 0 {
        return examples;
    }
    let mut kept = std::collections::BTreeSet::new();
    examples.retain(|e| {
        if !kept.contains(&e.source_id) && kept.len() >= max {
            return false;
        }
        kept.insert(e.source_id.clone());
        true
    });
    examples
}
