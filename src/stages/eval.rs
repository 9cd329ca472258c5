//! `eval`: runs a model (with an adapter, when given) on held-out examples
//! of the three subtasks and scores what it writes; see [`crate::eval`].

use std::path::Path;
use std::time::Instant;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapt::tasks::{Example, Task};
use crate::corpus::{read_jsonl, write_json, write_jsonl};
use crate::eval::evaluate::{
    EmbeddingSummary, EvalConfig, MaxTokens, SubjectInfo, evaluate, first_reports, report_count,
};
use crate::eval::general::{GeneralConfig, GeneralScores};
use crate::eval::score::Scores;
use crate::eval::subject::{Subject, load_f32};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::stages::perplexity::read_documents;

pub struct Eval;

/// Which examples of a `tasks` artifact to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `validation.jsonl`: reports whose templates training never saw.
    Validation,
    /// `train.jsonl`.
    Train,
    /// Both files: for a set of real reports that no model trained on.
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvalParams {
    /// The examples of a `tasks` artifact to read.
    pub split: Split,
    /// Subtasks to evaluate.
    pub tasks: Vec<Task>,
    /// Evaluate the examples of the first N reports only (in file order); 0 evaluates all.
    pub max_reports: usize,
    /// Token limit of each answer, per subtask.
    pub max_tokens: MaxTokens,
    /// Entity types to score (the types the data annotates); empty scores every type.
    pub entity_types: Vec<String>,
    /// Bootstrap resamples for the 95% intervals.
    pub resamples: usize,
    /// Prompts of one subtask decoded together (left-padded, masked); 1 decodes one at a
    /// time. The answers do not depend on it beyond floating-point summation order.
    pub batch: usize,
    /// Hidden-state layer of the span embeddings; default: the middle layer, where the
    /// contrastive loss reads them by default.
    pub embedding_layer: Option<usize>,
    /// Reports whose entity spans are embedded for the key/peripheral projection; 0 none.
    pub embedding_reports: usize,
    /// Paragraphs of the `general` text used for retained ability.
    pub general_documents: usize,
    /// Window of the general-text perplexity, in tokens.
    pub general_window: usize,
    /// Continuations the base model writes for the KL figure.
    pub kl_samples: usize,
    /// Tokens per continuation.
    pub kl_new_tokens: usize,
}

impl Default for EvalParams {
    fn default() -> Self {
        Self {
            split: Split::Validation,
            tasks: Task::ALL.to_vec(),
            max_reports: 0,
            max_tokens: MaxTokens::default(),
            entity_types: Vec::new(),
            resamples: 1000,
            batch: 8,
            embedding_layer: None,
            embedding_reports: 24,
            general_documents: 8,
            general_window: 256,
            kl_samples: 4,
            kl_new_tokens: 48,
        }
    }
}

impl Validate for EvalParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.tasks.is_empty() {
            return Err(ParamError::new("tasks", "must name at least one task"));
        }
        for (name, value) in [
            ("max_tokens.entities", self.max_tokens.entities),
            ("max_tokens.summary", self.max_tokens.summary),
            ("max_tokens.alert", self.max_tokens.alert),
        ] {
            if !(1..=1024).contains(&value) {
                return Err(ParamError::new(name, "must be between 1 and 1024"));
            }
        }
        if !(1..=64).contains(&self.batch) {
            return Err(ParamError::new("batch", "must be between 1 and 64"));
        }
        if self.resamples == 0 {
            return Err(ParamError::new("resamples", "must be at least 1")
                .with_help("1000 resamples give stable 95% intervals"));
        }
        if !(16..=4096).contains(&self.general_window) {
            return Err(ParamError::new("general_window", "must be between 16 and 4096"));
        }
        Ok(())
    }
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub subject: SubjectInfo,
    /// Reports the examples came from.
    pub reports: usize,
    pub scores: Scores,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub general: Option<GeneralScores>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<EmbeddingSummary>,
}

impl Stage for Eval {
    type Params = EvalParams;

    const KIND: &'static str = "eval";
    const VERSION: u32 = 2;
    const DOC: &'static str = "Runs a model, with a trained adapter (its LoRA and each subtask's \
        prefix) or fine-tuned weights when `adapter` is given, on held-out `tasks` examples \
        with batched greedy decoding, and scores the answers: key-entity and all-entity precision, \
        recall and F1, CIRS (key facts a summary or alert keeps) and CCI (facts stated that \
        agree with the report), each with a 95% bootstrap interval. With `general` text it \
        also measures retained ability: the perplexity ratio against the base model and the \
        mean per-token KL from the base model on text the base model wrote. Writes \
        `metrics.json`, every answer with its scores (`outcomes.jsonl`), and entity-span \
        embeddings for the report's projection (`embeddings.jsonl`). Malformed answers count \
        as wrong and are kept for inspection.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec {
            name: "model",
            required: true,
            doc: "The base model: a `model` stage, a GGUF file or a Hugging Face folder.",
        },
        InputSpec {
            name: "adapter",
            required: false,
            doc: "A `train` stage: its adapter, or its weights for full fine-tuning.",
        },
        InputSpec {
            name: "examples",
            required: true,
            doc: "A `tasks` stage (the `split` param picks its files), or a JSONL file of \
                  examples.",
        },
        InputSpec {
            name: "general",
            required: false,
            doc: "General text (`.txt` paragraphs or `.jsonl`) for retained ability.",
        },
    ];
    const OUTPUTS: &'static [&'static str] =
        &["metrics.json", "outcomes.jsonl", "embeddings.jsonl"];
    const USES_ALL_CORES: bool = true;
    const USES_SCHEMA: bool = true;

    fn run(params: &EvalParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let failed = |e: crate::eval::subject::SubjectError| StageError::failed(e.to_string());
        let examples = read_examples(ctx.input("examples")?, params)?;
        let base = load_f32(ctx.input("model")?).map_err(failed)?;
        let subject =
            Subject::load(ctx.input("model")?, ctx.optional_input("adapter")).map_err(failed)?;
        let general = match ctx.optional_input("general") {
            Some(path) => {
                let mut docs = read_documents(path, "text")?;
                docs.truncate(params.general_documents);
                docs
            }
            None => Vec::new(),
        };
        let layers = base.config().num_hidden_layers;
        let config = EvalConfig {
            schema: ctx.schema,
            max_tokens: params.max_tokens,
            entity_types: &params.entity_types,
            resamples: params.resamples,
            seed: ctx.seed,
            batch: params.batch,
            embedding_layer: params.embedding_layer.unwrap_or(layers / 2).min(layers),
            embedding_reports: params.embedding_reports,
            general: (!general.is_empty()).then(|| {
                let general_config = GeneralConfig {
                    window: params.general_window,
                    kl_samples: params.kl_samples,
                    kl_prompt_tokens: 16,
                    kl_new_tokens: params.kl_new_tokens,
                    seed: ctx.seed,
                };
                (general.as_slice(), general_config)
            }),
        };
        let progress = ctx.progress(Some(examples.len() as u64), "answers");
        let started = Instant::now();
        let evaluation = evaluate(&subject, &base, &examples, &config, |n| progress.inc(n as u64))
            .map_err(failed)?;
        ctx.notice(&format!(
            "{} answers in {:.1} s; {}",
            examples.len(),
            started.elapsed().as_secs_f64(),
            headline(&evaluation.scores)
        ));
        let metrics = EvalMetrics {
            subject: SubjectInfo::of(&subject, &base),
            reports: report_count(&examples),
            scores: evaluation.scores,
            general: evaluation.general,
            embeddings: evaluation.embedding_summary,
        };
        write_jsonl(&ctx.output("outcomes.jsonl"), &evaluation.outcomes)?;
        write_jsonl(&ctx.output("embeddings.jsonl"), &evaluation.embeddings)?;
        write_json(&ctx.output("metrics.json"), &metrics)
    }
}

/// One line of the headline figures, for the terminal.
pub fn headline(scores: &Scores) -> String {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    format!(
        "key F1 {}, CIRS {}, CCI {}",
        fmt(scores.key_entities.as_ref().map(|s| s.f1.value)),
        fmt(scores.cirs.map(|f| f.value)),
        fmt(scores.cci.map(|f| f.value))
    )
}

/// The examples to evaluate: the chosen split of a `tasks` artifact, or a
/// JSONL file; only the chosen tasks and the first `max_reports` reports.
fn read_examples(path: &Path, params: &EvalParams) -> Result<Vec<Example>, StageError> {
    let mut examples: Vec<Example> = if path.is_dir() {
        let files: &[&str] = match params.split {
            Split::Validation => &["validation.jsonl"],
            Split::Train => &["train.jsonl"],
            Split::All => &["train.jsonl", "validation.jsonl"],
        };
        let mut all = Vec::new();
        for file in files {
            all.extend(read_jsonl::<Example>(&path.join(file))?);
        }
        all
    } else {
        read_jsonl(path)?
    };
    examples.retain(|e| params.tasks.contains(&e.task));
    let examples = first_reports(examples, params.max_reports);
    if examples.is_empty() {
        return Err(StageError::data(path, None, "has no examples of the chosen tasks"));
    }
    Ok(examples)
}
