//! How much general ability an adapted model keeps.
//!
//! Two figures, both against the base model on general text:
//!
//! - **perplexity ratio**: the adapted model's perplexity over the base
//!   model's, on the same documents, windows and tokens. 1.0 means no
//!   change; above 1 the adapted model predicts general text worse.
//! - **mean KL**: the base model writes continuations of a few documents
//!   (seeded sampling at temperature 1), and both models read them back;
//!   the figure is the mean over generated positions of
//!   `KL(p_base || p_adapted)` of the next-token distributions, in nats.
//!   Text the base model wrote itself is where it is most at home, so this
//!   shows drift that perplexity on human text can hide.
//!
//! Prefixes are per subtask and play no part here: only the LoRA (or the
//! fine-tuned weights) changes the model on general text.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::subject::{Subject, SubjectError};
use crate::model::generate::{Sampling, generate, log_softmax};
use crate::model::llama::{ForwardOptions, Llama};
use crate::model::load::LoadedModel;
use crate::model::score::{ScoreOptions, pooled, score_with_hook, tokenize};

/// How much general text to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneralConfig {
    pub window: usize,
    /// Continuations the base model writes for the KL figure.
    pub kl_samples: usize,
    /// Tokens of each document that start a continuation.
    pub kl_prompt_tokens: usize,
    /// Tokens per continuation.
    pub kl_new_tokens: usize,
    pub seed: u64,
}

/// The figures of the module doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneralScores {
    pub documents: usize,
    pub tokens: usize,
    pub base_perplexity: f64,
    pub perplexity: f64,
    /// `perplexity / base_perplexity`.
    pub perplexity_ratio: f64,
    /// Generated positions the KL is averaged over.
    pub kl_tokens: usize,
    /// Mean per-token `KL(base || adapted)` in nats.
    pub mean_kl: f64,
}

/// Scores `subject` against `base` on `documents`.
pub fn general_ability(
    base: &LoadedModel,
    subject: &Subject,
    documents: &[String],
    config: &GeneralConfig,
) -> Result<GeneralScores, SubjectError> {
    let bos = base.config().bos_token_id;
    let docs = tokenize(&base.tokenizer, documents, bos)
        .map_err(|e| SubjectError::Adapter(format!("tokenizing general text: {e}")))?;
    let opts = ScoreOptions { window: config.window, stride: config.window / 2, batch: 4 };
    let base_scores = score_with_hook(&base.model, None, &docs, &opts, |_| {})
        .map_err(SubjectError::model("scoring general text"))?;
    let scores = score_with_hook(&subject.loaded.model, subject.hook(), &docs, &opts, |_| {})
        .map_err(SubjectError::model("scoring general text"))?;
    let (base_total, total) = (pooled(&base_scores), pooled(&scores));

    let mut kl_sum = 0.0;
    let mut kl_tokens = 0;
    for (i, doc) in docs.iter().filter(|d| d.len() > config.kl_prompt_tokens).enumerate() {
        if i == config.kl_samples {
            break;
        }
        let (sum, count) =
            continuation_kl(base, subject, &doc[..config.kl_prompt_tokens], config, i)?;
        kl_sum += sum;
        kl_tokens += count;
    }
    Ok(GeneralScores {
        documents: docs.len(),
        tokens: total.tokens,
        base_perplexity: base_total.perplexity(),
        perplexity: total.perplexity(),
        perplexity_ratio: total.perplexity() / base_total.perplexity(),
        kl_tokens,
        mean_kl: if kl_tokens > 0 { kl_sum / kl_tokens as f64 } else { 0.0 },
    })
}

/// The summed KL over the generated positions of one continuation, and
/// how many there are.
fn continuation_kl(
    base: &LoadedModel,
    subject: &Subject,
    prompt: &[u32],
    config: &GeneralConfig,
    index: usize,
) -> Result<(f64, usize), SubjectError> {
    let sampling = Sampling {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: config.seed.wrapping_add(index as u64),
    };
    let plain = ForwardOptions::default();
    let written =
        generate(&base.model, prompt, config.kl_new_tokens, &[], &sampling, &plain, |_| {})
            .map_err(SubjectError::model("writing a continuation"))?;
    if written.tokens.is_empty() {
        return Ok((0.0, 0));
    }
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&written.tokens);
    // Positions prompt.len() - 1 .. ids.len() - 1 predict the written tokens.
    let from = prompt.len() - 1;
    let count = written.tokens.len();
    let adapted = ForwardOptions { hook: subject.hook(), ..ForwardOptions::default() };
    let p = log_probs(&base.model, &ids, &plain, from, count)?;
    let q = log_probs(&subject.loaded.model, &ids, &adapted, from, count)?;
    let kl = summed_kl(&p, &q).map_err(SubjectError::model("KL"))?;
    Ok((kl, count))
}

/// `sum over rows of KL(p || q)` for log-probabilities `[rows, vocab]`:
/// each row's `sum_v exp(p_v) (p_v - q_v)`, in nats.
pub fn summed_kl(p: &Tensor, q: &Tensor) -> candle_core::Result<f64> {
    (p.exp()? * (p - q)?)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Log-probabilities `[count, vocab]` at positions `from..from + count`.
fn log_probs(
    model: &Llama,
    ids: &[u32],
    opts: &ForwardOptions,
    from: usize,
    count: usize,
) -> Result<Tensor, SubjectError> {
    let input = Tensor::new(ids, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .map_err(SubjectError::model("building the input"))?;
    let logits = model.forward(&input, opts).map_err(SubjectError::model("forward"))?.logits;
    logits
        .squeeze(0)
        .and_then(|t| t.narrow(0, from, count))
        .and_then(|t| log_softmax(&t))
        .and_then(|t| t.contiguous())
        .map_err(SubjectError::model("log-softmax"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_rows(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().map(|p| p.ln()).collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn kl_of_hand_made_distributions() {
        // KL([0.5, 0.5] || [0.9, 0.1]) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108 nats;
        // a row compared with itself adds 0.
        let p = log_rows(&[[0.5, 0.5], [0.2, 0.8]]);
        let q = log_rows(&[[0.9, 0.1], [0.2, 0.8]]);
        let kl = summed_kl(&p, &q).unwrap();
        let want = 0.5 * (0.5f64 / 0.9).ln() + 0.5 * (0.5f64 / 0.1).ln();
        assert!((kl - want).abs() < 1e-6, "{kl} vs {want}");
        assert!((want - 0.5108).abs() < 1e-4);
        assert_eq!(summed_kl(&p, &p).unwrap(), 0.0);
    }
}
