//! Head probing: which attention heads a task's gradient flows through.
//!
//! A short preliminary fine-tune trains the q, k, v and o projections of
//! every layer (everything else frozen) with AdamW for a few steps on the
//! probe data. At every step, before the update, each query head `h` of
//! layer `l` is scored with the squared gradient norm of its slices:
//!
//! `g(l, h) = |dq_h|^2 + |do_h|^2 + (|dk_j|^2 + |dv_j|^2) / group`
//!
//! where `dq_h` are the gradient's `head_dim` rows of `q_proj` for head `h`,
//! `do_h` its columns of `o_proj`, and `j = h / group` the key/value head
//! that `h` shares with `group - 1` other query heads (so a shared head's
//! gradient is split evenly among the heads that read it). The score of a
//! head is the sum over steps of `sqrt(g)`.
//!
//! A [`MaskRule`] turns the scores into a [`HeadMask`].

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::batch::{Sequence, collate};
use super::contrastive::paired_order;
use super::lora::HeadMask;
use super::optim::{AdamW, AdamWParams};
use crate::model::llama::{ForwardOptions, Llama, Projection};
use crate::model::load::LoadedModel;

/// How the probe's scores become a mask.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum MaskRule {
    /// The `k` best heads of the whole model.
    TopK { k: usize },
    /// The `k` best heads of every layer.
    TopKPerLayer { k: usize },
    /// The fewest best heads whose scores hold `share` of the total.
    Share { share: f64 },
}

impl MaskRule {
    /// Applies the rule to `scores[layer][head]`.
    pub fn select(&self, scores: &[Vec<f64>]) -> HeadMask {
        let layers = scores.len();
        let heads = scores.first().map_or(0, Vec::len);
        let ranked = rank(scores);
        let chosen: Vec<(usize, usize)> = match *self {
            MaskRule::TopK { k } => ranked.iter().take(k).map(|h| (h.layer, h.head)).collect(),
            MaskRule::TopKPerLayer { k } => {
                let mut taken = vec![0; layers];
                ranked
                    .iter()
                    .filter(|h| {
                        taken[h.layer] += 1;
                        taken[h.layer] <= k
                    })
                    .map(|h| (h.layer, h.head))
                    .collect()
            }
            MaskRule::Share { share } => {
                let total: f64 = ranked.iter().map(|h| h.score).sum();
                let mut held = 0.0;
                let mut out = Vec::new();
                for h in &ranked {
                    if total > 0.0 && held >= share * total {
                        break;
                    }
                    held += h.score;
                    out.push((h.layer, h.head));
                }
                out
            }
        };
        HeadMask::from_heads(layers, heads, &chosen)
    }
}

/// One head's probe score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadScore {
    pub layer: usize,
    pub head: usize,
    pub score: f64,
}

/// Heads from the highest score down; ties by layer, then head.
pub fn rank(scores: &[Vec<f64>]) -> Vec<HeadScore> {
    let mut all: Vec<HeadScore> = scores
        .iter()
        .enumerate()
        .flat_map(|(layer, row)| {
            row.iter().enumerate().map(move |(head, &score)| HeadScore { layer, head, score })
        })
        .collect();
    all.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(a.layer.cmp(&b.layer)).then(a.head.cmp(&b.head))
    });
    all
}

/// The preliminary fine-tune's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// What a probe run measured.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// `[layer][head]`: summed gradient norms.
    pub scores: Vec<Vec<f64>>,
    /// Training loss at each step.
    pub losses: Vec<f64>,
    pub tokens: usize,
}

/// Runs the probe on `sequences`; `on_step` sees each step's loss.
pub fn probe(
    base: &LoadedModel,
    sequences: &[Sequence],
    config: &ProbeConfig,
    mut on_step: impl FnMut(usize, f64, usize),
) -> Result<ProbeResult> {
    if sequences.is_empty() {
        candle_core::bail!("no probe example fits");
    }
    let model_config = base.config().clone();
    let (layers, heads, kv_heads, head_dim) = (
        model_config.num_hidden_layers,
        model_config.num_attention_heads,
        model_config.num_kv_heads(),
        model_config.head_dim(),
    );
    let group = heads / kv_heads;
    let device = base.model.device().clone();

    // q, k, v and o of every layer become variables, in f32.
    let mut tensors: HashMap<String, Tensor> = base.tensors().clone();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut names = Vec::new();
    for layer in 0..layers {
        for projection in Projection::ALL {
            let name =
                format!("model.layers.{layer}.self_attn.{}.weight", projection.module_name());
            let var = Var::from_tensor(&tensors[&name].to_dtype(DType::F32)?)?;
            tensors.insert(name.clone(), var.as_tensor().clone());
            names.push((layer, projection));
            vars.push((name, var));
        }
    }
    let model = Llama::from_tensors(&model_config, tensors, DType::F32, &device)?;
    let mut optimizer = AdamW::new(vars.clone(), AdamWParams::default())?;
    let pad = base.eos_ids.first().copied().unwrap_or(0);

    let mut scores = vec![vec![0f64; heads]; layers];
    let mut losses = Vec::with_capacity(config.steps);
    let mut order = paired_order(sequences, config.seed);
    let (mut position, mut epoch, mut tokens) = (0usize, 0u64, 0usize);
    for step in 0..config.steps {
        let mut rows = Vec::with_capacity(config.batch);
        while rows.len() < config.batch {
            if position == order.len() {
                epoch += 1;
                order = paired_order(sequences, config.seed.wrapping_add(epoch));
                position = 0;
            }
            rows.push(&sequences[order[position]]);
            position += 1;
        }
        let batch = collate(&rows, pad, |_| 0, &device)?;
        tokens += batch.tokens;
        let opts = ForwardOptions { attention_mask: Some(&batch.attention), ..Default::default() };
        let (nll, _) = model.nll(&batch.ids, &opts, &batch.labels, &batch.scored)?;
        let loss = (nll / batch.scored_count.max(1) as f64)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        losses.push(value);
        let grads = loss.backward()?;

        let mut step_scores = vec![vec![0f64; heads]; layers];
        let mut grad_list = Vec::with_capacity(vars.len());
        for ((layer, projection), (_, var)) in names.iter().zip(&vars) {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.zeros_like()?,
            };
            let per_head: Vec<f64> = match projection {
                // Rows of head h: [heads, head_dim * hidden].
                Projection::Q | Projection::K | Projection::V => {
                    let n = if *projection == Projection::Q { heads } else { kv_heads };
                    g.reshape((n, ()))?.sqr()?.sum(1)?.to_dtype(DType::F64)?.to_vec1()?
                }
                // Columns of head h: [hidden, heads, head_dim].
                Projection::O => g
                    .reshape((g.dim(0)?, heads, head_dim))?
                    .sqr()?
                    .sum(2)?
                    .sum(0)?
                    .to_dtype(DType::F64)?
                    .to_vec1()?,
            };
            for h in 0..heads {
                step_scores[*layer][h] += match projection {
                    Projection::Q | Projection::O => per_head[h],
                    Projection::K | Projection::V => per_head[h / group] / group as f64,
                };
            }
            grad_list.push(g);
        }
        for (row, step_row) in scores.iter_mut().zip(&step_scores) {
            for (s, g) in row.iter_mut().zip(step_row) {
                *s += g.sqrt();
            }
        }
        optimizer.step(&grad_list, config.lr)?;
        on_step(step + 1, value, batch.tokens);
    }
    Ok(ProbeResult { scores, losses, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores() -> Vec<Vec<f64>> {
        vec![vec![1.0, 5.0, 0.5, 0.5], vec![3.0, 0.0, 2.0, 0.0]]
    }

    #[test]
    fn top_k_takes_the_best_heads_overall() {
        let mask = MaskRule::TopK { k: 2 }.select(&scores());
        assert_eq!(
            mask.layers,
            vec![vec![false, true, false, false], vec![true, false, false, false]]
        );
    }

    #[test]
    fn top_k_per_layer_takes_k_in_every_layer() {
        let mask = MaskRule::TopKPerLayer { k: 1 }.select(&scores());
        assert_eq!(mask.count(), 2);
        assert!(mask.is_selected(0, 1) && mask.is_selected(1, 0));
    }

    #[test]
    fn share_takes_the_fewest_heads_holding_it() {
        // Total 12: 5 + 3 = 8 < 9 (75%), + 2 = 10 >= 9.
        let mask = MaskRule::Share { share: 0.75 }.select(&scores());
        assert_eq!(mask.count(), 3);
        assert!(mask.is_selected(1, 2));
        assert_eq!(MaskRule::Share { share: 1.0 }.select(&scores()).count(), 6);
    }
}
