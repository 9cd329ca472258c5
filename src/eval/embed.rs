//! Span embeddings of key and peripheral entities, and how well they
//! separate.
//!
//! An entity's embedding is the mean of one layer's hidden states over the
//! prompt tokens its span covers, under the entity task's prefix: the same
//! vector the contrastive loss shapes in training. The separation score is
//! the mean silhouette of the key / peripheral labelling under cosine
//! distance: for each point, `(b - a) / max(a, b)` with `a` its mean distance
//! to the other points of its own role and `b` its mean distance to the
//! points of the other role. It ranges from -1 to 1; above 0 the two roles
//! form clusters of their own.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::subject::{Subject, SubjectError};
use crate::adapt::batch::encode;
use crate::adapt::tasks::{Example, Task};
use crate::schema::EntityRole;

/// One entity span's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanEmbedding {
    pub source_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: EntityRole,
    pub value: String,
    pub vector: Vec<f32>,
}

/// Embeds the spans of the entity examples, at most `max_reports` of them.
pub fn span_embeddings(
    subject: &Subject,
    examples: &[Example],
    layer: usize,
    max_reports: usize,
) -> Result<Vec<SpanEmbedding>, SubjectError> {
    let mut out = Vec::new();
    let entity_examples =
        examples.iter().filter(|e| e.task == Task::Entities && !e.spans.is_empty());
    for example in entity_examples.take(max_reports) {
        let sequence = encode(&subject.loaded.tokenizer, example, usize::MAX)
            .map_err(SubjectError::Adapter)?
            .ok_or_else(|| SubjectError::Adapter(format!("`{}` has no prompt", example.id)))?;
        let prompt = &sequence.ids[..sequence.target_start];
        let hidden = subject.hidden(prompt, Task::Entities, layer)?;
        for span in sequence.spans.iter().filter(|s| s.end <= prompt.len()) {
            let vector = mean_rows(&hidden, span.start, span.end - span.start)
                .map_err(SubjectError::model("pooling a span"))?;
            out.push(SpanEmbedding {
                source_id: example.source_id.clone(),
                kind: span.kind.clone(),
                role: span.role,
                value: span.value.clone(),
                vector,
            });
        }
    }
    Ok(out)
}

fn mean_rows(hidden: &Tensor, start: usize, len: usize) -> candle_core::Result<Vec<f32>> {
    hidden.narrow(0, start, len)?.mean(0)?.to_vec1::<f32>()
}

/// Cosine distance, 1 - cos; 1 when either vector is zero.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 { 1.0 } else { 1.0 - dot / (na.sqrt() * nb.sqrt()) }
}

/// The mean silhouette of the key / peripheral labelling (see the module
/// doc); `None` unless each role has at least two points.
pub fn separation(points: &[SpanEmbedding]) -> Option<f64> {
    let is_key: Vec<bool> = points.iter().map(|p| p.role == EntityRole::Key).collect();
    let keys = is_key.iter().filter(|k| **k).count();
    if keys < 2 || points.len() - keys < 2 {
        return None;
    }
    let mut total = 0.0;
    for (i, p) in points.iter().enumerate() {
        let (mut same, mut other) = ((0.0, 0usize), (0.0, 0usize));
        for (j, q) in points.iter().enumerate() {
            if i == j {
                continue;
            }
            let d = cosine_distance(&p.vector, &q.vector);
            let bucket = if is_key[i] == is_key[j] { &mut same } else { &mut other };
            bucket.0 += d;
            bucket.1 += 1;
        }
        let (a, b) = (same.0 / same.1 as f64, other.0 / other.1 as f64);
        let denom = a.max(b);
        total += if denom > 0.0 { (b - a) / denom } else { 0.0 };
    }
    Some(total / points.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(role: EntityRole, vector: Vec<f32>) -> SpanEmbedding {
        SpanEmbedding { source_id: "r".into(), kind: "t".into(), role, value: "v".into(), vector }
    }

    #[test]
    fn separated_clusters_score_near_one_and_mixed_near_zero() {
        use EntityRole::{Key, Peripheral};
        let apart = [
            point(Key, vec![1.0, 0.0]),
            point(Key, vec![0.99, 0.05]),
            point(Peripheral, vec![0.0, 1.0]),
            point(Peripheral, vec![0.05, 0.99]),
        ];
        assert!(separation(&apart).unwrap() > 0.9);
        let mixed = [
            point(Key, vec![1.0, 0.0]),
            point(Peripheral, vec![0.99, 0.05]),
            point(Key, vec![0.0, 1.0]),
            point(Peripheral, vec![0.05, 0.99]),
        ];
        assert!(separation(&mixed).unwrap() < 0.0);
        assert_eq!(separation(&apart[..3]), None);
    }

    #[test]
    fn cosine_distance_of_parallel_and_orthogonal_vectors() {
        assert!(cosine_distance(&[1.0, 2.0], &[2.0, 4.0]).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 3.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine_distance(&[0.0, 0.0], &[1.0, 0.0]), 1.0);
    }
}
