//! Examples as token sequences, and batches of them.
//!
//! An example becomes the ChatML conversation the model will see at
//! inference: `<|im_start|>user\nPROMPT<|im_end|>\n<|im_start|>assistant\n`
//! then `TARGET<|im_end|>`. The prompt part and the target part are
//! tokenized separately (as they are when generating), and only the target's
//! tokens are scored. Each entity span of the report is mapped to the prompt
//! tokens it overlaps, for span embeddings.
//!
//! Batches pad on the right with the end-of-sequence id; padding is masked
//! out of attention and of the loss.

use candle_core::{Device, Result, Tensor};
use tokenizers::Tokenizer;

use super::tasks::{Example, Task};
use crate::model::tokenizer::{ChatMessage, chatml};
use crate::schema::EntityRole;

/// An entity span as a range of token positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpan {
    pub kind: String,
    pub role: EntityRole,
    pub value: String,
    /// Token positions, end exclusive.
    pub start: usize,
    pub end: usize,
}

/// One example, tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Tokens before the target: position `target_start - 1` is the first
    /// whose next token is scored.
    pub target_start: usize,
    pub task: Task,
    pub spans: Vec<TokenSpan>,
    /// The report the example was made from (positives for the contrastive
    /// loss come from other reports).
    pub source_id: String,
}

/// The text a model is given for `prompt`: one user turn and an open
/// assistant turn.
pub fn chat_prompt(prompt: &str) -> String {
    chatml(&[ChatMessage::new("user", prompt)], true)
}

/// What follows the prompt in a training sequence.
pub const END_OF_TURN: &str = "<|im_end|>";

/// Tokenizes `example`; `None` when it is longer than `max_len` tokens.
pub fn encode(
    tokenizer: &Tokenizer,
    example: &Example,
    max_len: usize,
) -> std::result::Result<Option<Sequence>, String> {
    let prompt = chat_prompt(&example.prompt);
    let shift = prompt.find(&example.prompt).map_or(0, |byte| prompt[..byte].chars().count());
    let prompt_enc =
        tokenizer.encode_char_offsets(prompt.as_str(), false).map_err(|e| e.to_string())?;
    let target = format!("{}{END_OF_TURN}", example.target);
    let target_enc =
        tokenizer.encode_char_offsets(target.as_str(), false).map_err(|e| e.to_string())?;
    let mut ids = prompt_enc.get_ids().to_vec();
    let target_start = ids.len();
    ids.extend_from_slice(target_enc.get_ids());
    if ids.len() > max_len || target_start == 0 {
        return Ok(None);
    }
    let offsets = prompt_enc.get_offsets();
    let spans = example
        .spans
        .iter()
        .filter_map(|span| {
            let (from, to) = (span.start + shift, span.end + shift);
            let hit: Vec<usize> = (0..offsets.len())
                .filter(|&t| {
                    offsets[t].0 < to && offsets[t].1 > from && offsets[t].1 > offsets[t].0
                })
                .collect();
            let (&first, &last) = (hit.first()?, hit.last()?);
            Some(TokenSpan {
                kind: span.kind.clone(),
                role: span.role,
                value: span.value.clone(),
                start: first,
                end: last + 1,
            })
        })
        .collect();
    Ok(Some(Sequence {
        ids,
        target_start,
        task: example.task,
        spans,
        source_id: example.source_id.clone(),
    }))
}

/// A padded batch, ready for the model.
pub struct Batch {
    /// `[batch, seq]` u32.
    pub ids: Tensor,
    /// `[batch, seq]` f32: 1 for real tokens.
    pub attention: Tensor,
    /// `[batch * seq]` u32: the next token at each position (0 where unscored).
    pub labels: Tensor,
    /// `[batch * seq]` f32: 1 where the next token is a target token.
    pub scored: Tensor,
    /// Scored positions in all.
    pub scored_count: usize,
    /// Real (unpadded) tokens in all.
    pub tokens: usize,
    /// Row -> index of its subtask in the trainer's task list.
    pub task_of_row: Vec<u32>,
    /// `(row, span)` for every span of every row.
    pub spans: Vec<(usize, TokenSpan)>,
    pub source_ids: Vec<String>,
    pub seq_len: usize,
}

/// Pads `rows` into one batch; `task_index` maps a task to its prefix slot.
pub fn collate(
    rows: &[&Sequence],
    pad: u32,
    task_index: impl Fn(Task) -> u32,
    device: &Device,
) -> Result<Batch> {
    let seq_len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
    let b = rows.len();
    let mut ids = vec![pad; b * seq_len];
    let mut attention = vec![0f32; b * seq_len];
    let mut labels = vec![0u32; b * seq_len];
    let mut scored = vec![0f32; b * seq_len];
    let mut spans = Vec::new();
    let mut scored_count = 0;
    for (row, seq) in rows.iter().enumerate() {
        let base = row * seq_len;
        for (t, &id) in seq.ids.iter().enumerate() {
            ids[base + t] = id;
            attention[base + t] = 1.0;
        }
        for t in seq.target_start - 1..seq.ids.len() - 1 {
            labels[base + t] = seq.ids[t + 1];
            scored[base + t] = 1.0;
            scored_count += 1;
        }
        spans.extend(seq.spans.iter().map(|s| (row, s.clone())));
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, seq_len), device)?,
        attention: Tensor::from_vec(attention, (b, seq_len), device)?,
        labels: Tensor::from_vec(labels, b * seq_len, device)?,
        scored: Tensor::from_vec(scored, b * seq_len, device)?,
        scored_count,
        tokens: rows.iter().map(|r| r.ids.len()).sum(),
        task_of_row: rows.iter().map(|r| task_index(r.task)).collect(),
        spans,
        source_ids: rows.iter().map(|r| r.source_id.clone()).collect(),
        seq_len,
    })
}

/// Log-softmax over the last axis from differentiable ops (the max is a
/// constant shift and is detached).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(candle_core::D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::tasks::PromptSpan;
    use crate::adapt::testkit::byte_tokenizer;

    fn example() -> Example {
        let prompt = "List entities.\n\nReport:\nFire at Elm St.".to_string();
        let start = prompt.find("Elm St").unwrap();
        Example {
            id: "r1:entities".into(),
            task: Task::Entities,
            source_id: "r1".into(),
            template_id: None,
            prompt,
            target: "location: Elm St".into(),
            key_facts: vec![],
            spans: vec![PromptSpan {
                kind: "location".into(),
                role: EntityRole::Key,
                value: "Elm St".into(),
                start,
                end: start + 6,
            }],
        }
    }

    #[test]
    fn spans_map_to_the_prompt_tokens_they_cover() {
        let tokenizer = byte_tokenizer();
        let seq = encode(&tokenizer, &example(), 512).unwrap().unwrap();
        let span = &seq.spans[0];
        let text = tokenizer.decode(&seq.ids[span.start..span.end], false).unwrap();
        assert_eq!(text, "Elm St");
        let target = tokenizer.decode(&seq.ids[seq.target_start..], false).unwrap();
        assert_eq!(target, "location: Elm St<|im_end|>");
        assert!(encode(&tokenizer, &example(), 10).unwrap().is_none());
    }

    #[test]
    fn the_models_loss_matches_the_loss_from_its_logits() {
        // Two rows of different lengths: padding, prompt positions and
        // target positions, so scored and unscored rows interleave.
        let tokenizer = byte_tokenizer();
        let long = encode(&tokenizer, &example(), 512).unwrap().unwrap();
        let mut short = long.clone();
        short.ids.truncate(short.target_start + 3);
        let batch = collate(&[&long, &short], 0, |_| 0, &Device::Cpu).unwrap();
        let model = crate::adapt::testkit::tiny_loaded(5, candle_core::DType::F32).model;
        let opts = crate::model::llama::ForwardOptions {
            attention_mask: Some(&batch.attention),
            ..Default::default()
        };
        let (nll, _) = model.nll(&batch.ids, &opts, &batch.labels, &batch.scored).unwrap();
        let logits = model.forward(&batch.ids, &opts).unwrap().logits;
        let vocab = logits.dim(2).unwrap();
        let from_logits = crate::model::ops::weighted_nll(
            &logits.reshape(((), vocab)).unwrap(),
            &batch.labels,
            &batch.scored,
        )
        .unwrap();
        let (a, b) = (nll.to_scalar::<f32>().unwrap(), from_logits.to_scalar::<f32>().unwrap());
        assert!(a > 0.0 && (a - b).abs() <= 1e-4 * b, "{a} vs {b}");
    }

    #[test]
    fn only_target_tokens_are_scored() {
        let tokenizer = byte_tokenizer();
        let long = encode(&tokenizer, &example(), 512).unwrap().unwrap();
        let mut short = long.clone();
        short.ids.truncate(short.target_start + 2);
        let batch = collate(&[&long, &short], 0, |_| 0, &Device::Cpu).unwrap();
        let target_len = long.ids.len() - long.target_start;
        assert_eq!(batch.scored_count, target_len + 2);
        let scored: Vec<f32> = batch.scored.to_vec1().unwrap();
        let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
        let first = long.target_start - 1;
        assert_eq!(scored[first], 1.0);
        assert_eq!(scored[first - 1], 0.0);
        assert_eq!(labels[first], long.ids[long.target_start]);
    }
}
