//! `perplexity`: how well a model predicts a corpus, per document and pooled.
//!
//! The scoring itself is [`crate::model::score`]; this stage reads the
//! documents, loads the model, and writes the figures. It is how a recipe
//! measures general ability before and after adaptation.

use std::path::Path;

use candle_core::{DType, Device};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{write_json, write_jsonl};
use crate::model::load::load;
use crate::model::score::{self, DocumentScore, ScoreOptions};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};

pub struct Perplexity;

/// Weight precision for scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PerplexityParams {
    /// Tokens per window; longer documents are read in overlapping windows.
    pub window: usize,
    /// Tokens between window starts; each token is scored once, with at least
    /// `window - stride` tokens of context once the document is longer than a window.
    pub stride: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Score only the first N documents; 0 scores all.
    pub max_documents: usize,
    /// The field holding the text in a `.jsonl` corpus.
    pub text_field: String,
    /// Weight precision.
    pub dtype: Precision,
}

impl Default for PerplexityParams {
    fn default() -> Self {
        Self {
            window: 256,
            stride: 128,
            batch: 8,
            max_documents: 0,
            text_field: "text".to_string(),
            dtype: Precision::F32,
        }
    }
}

impl Validate for PerplexityParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(2..=8192).contains(&self.window) {
            return Err(ParamError::new("window", "must be between 2 and 8192"));
        }
        if self.stride == 0 || self.stride > self.window {
            return Err(ParamError::new("stride", "must be between 1 and `window`")
                .with_help("half the window is the usual choice"));
        }
        if !(1..=256).contains(&self.batch) {
            return Err(ParamError::new("batch", "must be between 1 and 256"));
        }
        Ok(())
    }
}

/// The summary written as `perplexity.json`.
#[derive(Debug, Serialize)]
struct Summary {
    documents: usize,
    tokens: usize,
    nll: f64,
    /// exp(nll / tokens), pooled over documents.
    perplexity: f64,
    /// Nats per token.
    mean_nll: f64,
}

#[derive(Debug, Serialize)]
struct DocumentRow {
    index: usize,
    tokens: usize,
    nll: f64,
    perplexity: f64,
}

impl Stage for Perplexity {
    type Params = PerplexityParams;

    const KIND: &'static str = "perplexity";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Scores a corpus with a model: negative log-likelihood and \
        perplexity per document and pooled, in overlapping windows of `window` tokens, \
        `batch` windows per forward pass. Documents are the paragraphs of a `.txt` file \
        (separated by blank lines), the `text_field` of each line of a `.jsonl` file, or the \
        `corpus.jsonl` / `records.jsonl` of a stage's artifact.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec {
            name: "model",
            required: true,
            doc: "A `model` stage, or a GGUF file or Hugging Face folder.",
        },
        InputSpec {
            name: "text",
            required: true,
            doc: "A `.txt` or `.jsonl` file, or a stage whose artifact has `corpus.jsonl` or \
                  `records.jsonl`.",
        },
    ];
    const OUTPUTS: &'static [&'static str] = &["perplexity.json", "documents.jsonl"];
    const USES_ALL_CORES: bool = true;

    fn run(params: &PerplexityParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let mut texts = read_documents(ctx.input("text")?, &params.text_field)?;
        if params.max_documents > 0 {
            texts.truncate(params.max_documents);
        }
        if texts.is_empty() {
            return Err(StageError::failed("the text input has no documents"));
        }
        let loaded = load(ctx.input("model")?, params.dtype.dtype(), &Device::Cpu)
            .map_err(|err| StageError::failed(err.to_string()))?;
        let docs = score::tokenize(&loaded.tokenizer, &texts, loaded.config().bos_token_id)
            .map_err(|err| StageError::failed(format!("tokenizing: {err}")))?;
        let opts =
            ScoreOptions { window: params.window, stride: params.stride, batch: params.batch };
        let progress = ctx.progress(Some(score::window_count(&docs, &opts) as u64), "windows");
        let scores = score::score(&loaded.model, &docs, &opts, |n| progress.inc(n as u64))
            .map_err(|err| StageError::failed(format!("scoring: {err}")))?;

        let total = score::pooled(&scores);
        let summary = Summary {
            documents: scores.len(),
            tokens: total.tokens,
            nll: total.nll,
            perplexity: total.perplexity(),
            mean_nll: total.nll / total.tokens.max(1) as f64,
        };
        let rows = scores.iter().enumerate().map(|(index, s): (usize, &DocumentScore)| {
            DocumentRow { index, tokens: s.tokens, nll: s.nll, perplexity: s.perplexity() }
        });
        write_jsonl(&ctx.output("documents.jsonl"), rows.collect::<Vec<_>>().iter())?;
        write_json(&ctx.output("perplexity.json"), &summary)
    }
}

/// Reads documents from a `.txt` or `.jsonl` file, or from a stage artifact
/// folder holding `corpus.jsonl` or `records.jsonl`.
pub fn read_documents(path: &Path, text_field: &str) -> Result<Vec<String>, StageError> {
    let path = if path.is_dir() {
        ["corpus.jsonl", "records.jsonl"]
            .iter()
            .map(|name| path.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
            StageError::data(path, None, "has neither `corpus.jsonl` nor `records.jsonl`")
        })?
    } else {
        path.to_path_buf()
    };
    let text = fs_err::read_to_string(&path)?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|err| StageError::data(&path, Some(i + 1), err.to_string()))?;
            let field = value.get(text_field).and_then(|v| v.as_str()).ok_or_else(|| {
                StageError::data(&path, Some(i + 1), format!("no string field `{text_field}`"))
            })?;
            docs.push(field.to_string());
        }
        Ok(docs)
    } else {
        Ok(paragraphs(&text))
    }
}

/// Paragraphs separated by blank lines, each with its lines joined by
/// newlines and trimmed.
fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(current.join("\n").trim().to_string());
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_split_on_blank_lines() {
        let text = "\n = Title = \n\n first line\nsecond line\n \n\nlast\n";
        assert_eq!(paragraphs(text), vec!["= Title =", "first line\nsecond line", "last"]);
    }
}
