//! The contrastive term of the joint loss: InfoNCE over entity-span
//! embeddings, and a batch order that gives anchors their positives.
//!
//! A span's embedding is the mean of one layer's hidden states over the
//! span's tokens, L2-normalised. In a batch:
//!
//! - every **key** span with at least one positive is an anchor;
//! - its **positives** are spans of the same type and value in *another*
//!   report of the batch (the same key fact, told in other words around it);
//! - every other span of the batch, peripheral details and other key facts,
//!   is a **negative**. The anchor itself, and repeats of its value in its
//!   own report, are left out of the denominator.
//!
//! `loss = - mean over anchors a of mean over positives p of
//! log( exp(s_ap / t) / sum over c != a of exp(s_ac / t) )`, with `s` the
//! cosine similarity and `t` the temperature (the multi-positive form of
//! InfoNCE, as in supervised contrastive learning).
//!
//! Positives only exist when the same fact appears in two reports of one
//! batch, so [`paired_order`] orders each epoch in pairs of examples that
//! share a key fact wherever one exists. Every training method uses this
//! order, so an ablation without the contrastive term sees the same batches.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::batch::{Batch, Sequence};
use crate::schema::EntityRole;

/// InfoNCE over the batch's spans, from `hidden` (`[batch, seq, width]`);
/// `None` when no span has a positive. Also returns the number of anchors.
pub fn span_infonce(
    hidden: &Tensor,
    batch: &Batch,
    temperature: f64,
) -> Result<Option<(Tensor, usize)>> {
    let spans = &batch.spans;
    let n = spans.len();
    let mut positive = vec![0f32; n * n];
    let mut excluded = vec![0f32; n * n];
    let mut anchors = 0usize;
    for (a, (row_a, span_a)) in spans.iter().enumerate() {
        excluded[a * n + a] = 1.0;
        let mut count = 0;
        for (p, (row_p, span_p)) in spans.iter().enumerate() {
            let same_fact = span_a.kind == span_p.kind && span_a.value == span_p.value;
            if p == a || !same_fact {
                continue;
            }
            if row_a == row_p {
                excluded[a * n + p] = 1.0;
            } else if span_a.role == EntityRole::Key {
                positive[a * n + p] = 1.0;
                count += 1;
            }
        }
        if count > 0 {
            anchors += 1;
            for p in 0..n {
                positive[a * n + p] /= count as f32;
            }
        }
    }
    if anchors == 0 {
        return Ok(None);
    }
    let device = hidden.device();
    let (rows, seq, width) = hidden.dims3()?;
    let mut pool = vec![0f32; n * rows * seq];
    for (s, (row, span)) in spans.iter().enumerate() {
        let weight = 1.0 / (span.end - span.start) as f32;
        for t in span.start..span.end {
            pool[s * rows * seq + row * seq + t] = weight;
        }
    }
    let pool = Tensor::from_vec(pool, (n, rows * seq), device)?;
    let flat = hidden.reshape((rows * seq, width))?.to_dtype(DType::F32)?;
    let emb = pool.matmul(&flat)?;
    let norm = (emb.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    let emb = emb.broadcast_div(&norm)?;
    let sim = (emb.matmul(&emb.t()?)? / temperature)?;
    let excluded = (Tensor::from_vec(excluded, (n, n), device)? * -1e9)?;
    let log_probs = super::batch::log_softmax(&(sim + excluded)?)?;
    let positive = Tensor::from_vec(positive, (n, n), device)?;
    let loss = ((log_probs * positive)?.sum_all()?.neg()? / anchors as f64)?;
    Ok(Some((loss, anchors)))
}

/// One epoch's order of `sequences`: a seeded shuffle, then greedy pairing so
/// that each example is followed, where possible, by an example of another
/// report that shares a key fact with it. Every index appears once.
pub fn paired_order(sequences: &[Sequence], seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut shuffled: Vec<usize> = (0..sequences.len()).collect();
    shuffled.shuffle(&mut rng);

    // Key fact -> examples holding it, in shuffled order.
    let mut holders: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for &i in &shuffled {
        let mut facts: Vec<(&str, &str)> = sequences[i]
            .spans
            .iter()
            .filter(|s| s.role == EntityRole::Key)
            .map(|s| (s.kind.as_str(), s.value.as_str()))
            .collect();
        facts.sort_unstable();
        facts.dedup();
        for fact in facts {
            holders.entry(fact).or_default().push(i);
        }
    }
    let mut cursor: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut used = vec![false; sequences.len()];
    let mut order = Vec::with_capacity(sequences.len());
    for &i in &shuffled {
        if used[i] {
            continue;
        }
        used[i] = true;
        order.push(i);
        let mut facts: Vec<(&str, &str)> = sequences[i]
            .spans
            .iter()
            .filter(|s| s.role == EntityRole::Key)
            .map(|s| (s.kind.as_str(), s.value.as_str()))
            .collect();
        facts.sort_unstable();
        facts.dedup();
        'facts: for fact in facts {
            let list = &holders[&fact];
            let at = cursor.entry(fact).or_default();
            while *at < list.len() {
                let j = list[*at];
                if used[j] {
                    *at += 1;
                    continue;
                }
                if sequences[j].source_id == sequences[i].source_id {
                    // Same report: not a positive. Leave it for a later pair
                    // and look at the next fact (the cursor stays, so the
                    // skip costs one look per fact).
                    break;
                }
                used[j] = true;
                order.push(j);
                break 'facts;
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::batch::{TokenSpan, collate};
    use crate::adapt::tasks::Task;
    use candle_core::{Device, Var};

    fn span(kind: &str, value: &str, role: EntityRole, start: usize) -> TokenSpan {
        TokenSpan { kind: kind.into(), role, value: value.into(), start, end: start + 2 }
    }

    fn sequence(source: &str, spans: Vec<TokenSpan>) -> Sequence {
        Sequence {
            ids: vec![1; 8],
            target_start: 6,
            task: Task::Entities,
            spans,
            source_id: source.into(),
        }
    }

    #[test]
    fn pulling_positives_together_lowers_the_loss() {
        let a = sequence(
            "r1",
            vec![
                span("location", "Elm St", EntityRole::Key, 0),
                span("weather", "rain", EntityRole::Peripheral, 3),
            ],
        );
        let b = sequence("r2", vec![span("location", "Elm St", EntityRole::Key, 4)]);
        let batch = collate(&[&a, &b], 0, |_| 0, &Device::Cpu).unwrap();
        // Hidden states: row 0 tokens 0..2 and row 1 tokens 4..6 are the
        // positive pair; row 0 tokens 3..5 the negative.
        let mut data = vec![0f32; 2 * 8 * 3];
        let mut put = |row: usize, t: usize, v: [f32; 3]| {
            data[(row * 8 + t) * 3..(row * 8 + t) * 3 + 3].copy_from_slice(&v);
        };
        for t in 0..2 {
            put(0, t, [1.0, 0.0, 0.0]);
        }
        for t in 3..5 {
            put(0, t, [0.0, 1.0, 0.0]);
        }
        for t in 4..6 {
            put(1, t, [0.0, 1.0, 0.0]);
        }
        let hidden = Var::from_vec(data, (2, 8, 3), &Device::Cpu).unwrap();
        let (loss, anchors) = span_infonce(hidden.as_tensor(), &batch, 0.1).unwrap().unwrap();
        assert_eq!(anchors, 2);
        let before: f32 = loss.to_scalar().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(hidden.as_tensor()).unwrap();
        let stepped = (hidden.as_tensor() - (g * 0.5).unwrap()).unwrap();
        let after: f32 =
            span_infonce(&stepped, &batch, 0.1).unwrap().unwrap().0.to_scalar().unwrap();
        assert!(after < before, "{after} >= {before}");
    }

    #[test]
    fn no_positive_no_loss() {
        let a = sequence("r1", vec![span("location", "Elm St", EntityRole::Key, 0)]);
        let b = sequence("r2", vec![span("location", "Oak Ave", EntityRole::Key, 0)]);
        let batch = collate(&[&a, &b], 0, |_| 0, &Device::Cpu).unwrap();
        let hidden = Tensor::ones((2, 8, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(span_infonce(&hidden, &batch, 0.1).unwrap().is_none());
    }

    #[test]
    fn pairs_share_a_key_fact_across_reports() {
        let fact = |v: &str| span("location", v, EntityRole::Key, 0);
        let seqs = vec![
            sequence("r1", vec![fact("A")]),
            sequence("r1", vec![fact("A")]),
            sequence("r2", vec![fact("B")]),
            sequence("r3", vec![fact("A")]),
            sequence("r4", vec![fact("B")]),
            sequence("r5", vec![fact("C")]),
        ];
        let order = paired_order(&seqs, 7);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..6).collect::<Vec<_>>());
        assert_eq!(order, paired_order(&seqs, 7));
        // r2 and r4 (value B) end up next to each other.
        let at = |i: usize| order.iter().position(|&x| x == i).unwrap();
        assert_eq!(at(2).abs_diff(at(4)), 1, "{order:?}");
    }
}
