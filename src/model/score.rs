//! Perplexity of documents under a [`Llama`], batched, with a sliding window.
//!
//! A document longer than the window is read in windows of `window` tokens
//! that start `stride` tokens apart. Each token is scored once, in the first
//! window that predicts it: later windows score only the tokens past the
//! previous window's end, with at least `window - stride` tokens of context
//! before them (the evaluation Hugging Face documents for fixed-length
//! models). Windows from all documents are cut first, then run `batch` at a
//! time, right-padded, so short documents share a forward pass.
//!
//! A document's figure is its summed negative log-likelihood in nats over
//! its scored tokens; perplexity is `exp(nll / tokens)`. The corpus figure
//! pools tokens over documents (not an average of per-document
//! perplexities).

use candle_core::{DType, IndexOp, Result, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::generate::log_softmax;
use super::llama::{ForwardOptions, Llama, ProjectionHook};

/// How documents are cut and batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreOptions {
    /// Tokens per forward pass and row.
    pub window: usize,
    /// Tokens between the starts of consecutive windows of a document.
    pub stride: usize,
    /// Windows per forward pass.
    pub batch: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self { window: 256, stride: 128, batch: 8 }
    }
}

/// The negative log-likelihood of one document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DocumentScore {
    /// Tokens scored (the document's tokens, less the first when there is
    /// no beginning-of-sequence token to predict it from).
    pub tokens: usize,
    /// Summed negative log-likelihood, in nats.
    pub nll: f64,
}

impl DocumentScore {
    pub fn perplexity(&self) -> f64 {
        if self.tokens == 0 { f64::NAN } else { (self.nll / self.tokens as f64).exp() }
    }
}

/// The pooled score of many documents.
pub fn pooled(scores: &[DocumentScore]) -> DocumentScore {
    DocumentScore {
        tokens: scores.iter().map(|s| s.tokens).sum(),
        nll: scores.iter().map(|s| s.nll).sum(),
    }
}

/// Tokenizes `texts` for scoring: no special tokens, with `bos` in front
/// when the model has one (so the first word is scored too).
pub fn tokenize(
    tokenizer: &Tokenizer,
    texts: &[String],
    bos: Option<u32>,
) -> std::result::Result<Vec<Vec<u32>>, tokenizers::Error> {
    let encodings = tokenizer.encode_batch(texts.to_vec(), false)?;
    Ok(encodings
        .into_iter()
        .map(|encoding| bos.into_iter().chain(encoding.get_ids().iter().copied()).collect())
        .collect())
}

/// One row of a forward pass: tokens `begin..end` of document `doc`,
/// scoring the targets at `first..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    doc: usize,
    begin: usize,
    end: usize,
    first: usize,
}

fn windows(docs: &[Vec<u32>], opts: &ScoreOptions) -> Vec<Window> {
    let mut out = Vec::new();
    for (doc, tokens) in docs.iter().enumerate() {
        let n = tokens.len();
        let (mut begin, mut scored_to) = (0, 1);
        while scored_to < n {
            let end = (begin + opts.window).min(n);
            out.push(Window { doc, begin, end, first: scored_to });
            scored_to = end;
            begin += opts.stride;
        }
    }
    out
}

/// Scores every document; `progress` is told how many windows are done
/// after each batch.
pub fn score(
    model: &Llama,
    docs: &[Vec<u32>],
    opts: &ScoreOptions,
    progress: impl FnMut(usize),
) -> Result<Vec<DocumentScore>> {
    score_with_hook(model, None, docs, opts, progress)
}

/// [`score`] with an adapter hook on the projections (a LoRA), so an
/// adapted model is scored without merging it first.
pub fn score_with_hook(
    model: &Llama,
    hook: Option<&dyn ProjectionHook>,
    docs: &[Vec<u32>],
    opts: &ScoreOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<DocumentScore>> {
    if opts.window < 2 || opts.stride == 0 || opts.stride > opts.window || opts.batch == 0 {
        candle_core::bail!("invalid scoring options {opts:?}");
    }
    let mut scores = vec![DocumentScore { tokens: 0, nll: 0.0 }; docs.len()];
    for group in windows(docs, opts).chunks(opts.batch) {
        let width = group.iter().map(|w| w.end - w.begin).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(group.len() * width);
        let mut mask = Vec::with_capacity(group.len() * width);
        for w in group {
            let tokens = &docs[w.doc][w.begin..w.end];
            ids.extend_from_slice(tokens);
            ids.extend(std::iter::repeat_n(0, width - tokens.len()));
            mask.extend(std::iter::repeat_n(1u8, tokens.len()));
            mask.extend(std::iter::repeat_n(0u8, width - tokens.len()));
        }
        let device = model.device();
        let ids = Tensor::from_vec(ids, (group.len(), width), device)?;
        let mask = Tensor::from_vec(mask, (group.len(), width), device)?;
        let padded = group.iter().any(|w| w.end - w.begin < width);
        let opts = ForwardOptions {
            attention_mask: padded.then_some(&mask),
            hook,
            ..ForwardOptions::default()
        };
        let logits = model.forward(&ids, &opts)?.logits;
        for (row, w) in group.iter().enumerate() {
            // Logits at position p predict token p + 1.
            let from = w.first - 1 - w.begin;
            let count = w.end - w.first;
            let rows = logits.i(row)?.narrow(0, from, count)?;
            let logp = log_softmax(&rows)?;
            let targets = Tensor::new(&docs[w.doc][w.first..w.end], device)?.unsqueeze(1)?;
            let picked = logp.gather(&targets, 1)?.to_dtype(DType::F64)?;
            let nll = -picked.sum_all()?.to_scalar::<f64>()?;
            scores[w.doc].tokens += count;
            scores[w.doc].nll += nll;
        }
        progress(group.len());
    }
    Ok(scores)
}

/// How many windows [`score`] will run, for a progress bar.
pub fn window_count(docs: &[Vec<u32>], opts: &ScoreOptions) -> usize {
    windows(docs, opts).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_each_token_once_with_enough_context() {
        let docs = vec![(0..10).collect::<Vec<u32>>(), vec![1], vec![1, 2, 3]];
        let opts = ScoreOptions { window: 4, stride: 2, batch: 1 };
        let got = windows(&docs, &opts);
        let expected = vec![
            Window { doc: 0, begin: 0, end: 4, first: 1 },
            Window { doc: 0, begin: 2, end: 6, first: 4 },
            Window { doc: 0, begin: 4, end: 8, first: 6 },
            Window { doc: 0, begin: 6, end: 10, first: 8 },
            Window { doc: 2, begin: 0, end: 3, first: 1 },
        ];
        assert_eq!(got, expected);
        let scored: usize = got.iter().filter(|w| w.doc == 0).map(|w| w.end - w.first).sum();
        assert_eq!(scored, 9);
    }
}
