//! LoRA on the attention projections, restricted to selected heads.
//!
//! For a frozen projection `W` (`[out, in]`) an adapter adds `s * B A`, with
//! `A` `[r, in]`, `B` `[out, r]` and `s = alpha / r`; the model computes
//! `x W^T + s (x A^T) B^T` and never forms `B A`.
//!
//! A [`HeadMask`] (layers x query heads) says which heads are adapted:
//!
//! - `q_proj`: the output rows of a selected query head (`head_dim` rows each);
//! - `k_proj`, `v_proj`: with grouped-query attention, `group = heads /
//!   kv_heads` query heads share one key/value head. A key/value head is
//!   adapted when **any** of the query heads it serves is selected, because
//!   changing what a selected head reads means changing that shared head;
//! - `o_proj`: the input columns of a selected query head.
//!
//! Only the selected heads' share of each matrix is a variable: the rows of
//! `B` for q/k/v, the columns of `A` for o. A fixed 0/1 selection matrix
//! scatters them into a full-size `B` or `A` in every forward pass, so the
//! optimizer keeps state for the selected entries alone and
//! [`Lora::trainable_parameters`] counts exactly those. Exported as plain
//! PEFT tensors, the rest are zero rows and columns, and any LoRA loader
//! computes the same model. A layer without a selected head has no adapter.
//!
//! `A` starts uniform in `±1/sqrt(in)` from a seeded ChaCha8 stream (PEFT's
//! Kaiming-uniform bound), `B` at zero, so an untrained adapter changes
//! nothing.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::config::LlamaConfig;
use crate::model::llama::{LowRank, Projection, ProjectionHook};

/// Which query heads of which layers are adapted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadMask {
    /// `layers[l][h]`: query head `h` of layer `l` is selected.
    pub layers: Vec<Vec<bool>>,
}

impl HeadMask {
    /// Every head of every layer.
    pub fn all(layers: usize, heads: usize) -> Self {
        Self { layers: vec![vec![true; heads]; layers] }
    }

    /// The heads listed as `(layer, head)`.
    pub fn from_heads(layers: usize, heads: usize, selected: &[(usize, usize)]) -> Self {
        let mut mask = vec![vec![false; heads]; layers];
        for &(layer, head) in selected {
            mask[layer][head] = true;
        }
        Self { layers: mask }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn heads_per_layer(&self) -> usize {
        self.layers.first().map_or(0, Vec::len)
    }

    /// Selected query heads in all.
    pub fn count(&self) -> usize {
        self.layers.iter().flatten().filter(|&&on| on).count()
    }

    pub fn is_selected(&self, layer: usize, head: usize) -> bool {
        self.layers[layer][head]
    }

    /// Key/value heads of `layer` serving at least one selected query head.
    pub fn kv_heads(&self, layer: usize, kv_heads: usize) -> Vec<bool> {
        let group = self.heads_per_layer() / kv_heads;
        (0..kv_heads)
            .map(|kv| (kv * group..(kv + 1) * group).any(|h| self.layers[layer][h]))
            .collect()
    }

    /// Checks the mask against a model's shape.
    pub fn check(&self, config: &LlamaConfig) -> std::result::Result<(), String> {
        if self.layers.len() != config.num_hidden_layers
            || self.layers.iter().any(|l| l.len() != config.num_attention_heads)
        {
            return Err(format!(
                "the head mask is {} layers x {} heads, the model {} x {}",
                self.layers.len(),
                self.heads_per_layer(),
                config.num_hidden_layers,
                config.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// The shape of an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Projections that get an adapter.
    pub targets: Vec<Projection>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One projection's adapter. Only the selected heads' part is stored: for
/// q/k/v, `b` holds the kept rows (`[kept, r]`) and `select` (`[out, kept]`,
/// one 1 per column) scatters them into `B`; for o, `a` holds the kept
/// columns (`[r, kept]`) and `select` (`[kept, in]`) scatters them into `A`.
#[derive(Debug)]
struct Pair {
    a: Var,
    b: Var,
    select: Option<Tensor>,
    projection: Projection,
}

impl Pair {
    /// Full-size `A` (`[r, in]`) and `B` (`[out, r]`), zero outside the selected heads.
    fn effective(&self) -> Result<(Tensor, Tensor)> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        match (&self.select, self.projection) {
            (None, _) => Ok((a.clone(), b.clone())),
            (Some(select), Projection::O) => Ok((a.matmul(select)?, b.clone())),
            (Some(select), _) => Ok((a.clone(), select.matmul(b)?)),
        }
    }

    fn trainable(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}

/// A LoRA adapter over some heads of a model's attention; a [`ProjectionHook`].
#[derive(Debug)]
pub struct Lora {
    config: LoraConfig,
    mask: HeadMask,
    /// `layers[l][projection]`.
    layers: Vec<BTreeMap<Projection, Pair>>,
}

impl Lora {
    /// A fresh adapter: `A` random from `seed`, `B` zero.
    pub fn new(
        model: &LlamaConfig,
        config: LoraConfig,
        mask: HeadMask,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        mask.check(model).map_err(candle_core::Error::msg)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for layer in 0..model.num_hidden_layers {
            let mut pairs = BTreeMap::new();
            for projection in Projection::ALL {
                if !config.targets.contains(&projection) {
                    continue;
                }
                let (out, inner) = shape(model, projection);
                let (select, kept) = selection(model, &mask, layer, projection, dtype, device)?;
                if kept == 0 {
                    continue;
                }
                let a_cols = if projection == Projection::O { kept } else { inner };
                let b_rows = if projection == Projection::O { out } else { kept };
                // The bound follows the full fan-in, as PEFT's initialisation does.
                let bound = 1.0 / (inner as f64).sqrt();
                let a: Vec<f32> = (0..config.rank * a_cols)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (config.rank, a_cols), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((b_rows, config.rank), dtype, device)?;
                pairs.insert(
                    projection,
                    Pair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, select, projection },
                );
            }
            layers.push(pairs);
        }
        Ok(Self { config, mask, layers })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn mask(&self) -> &HeadMask {
        &self.mask
    }

    /// The variables to optimise (the selected heads' part of each `A` and
    /// `B`), under their PEFT names (see [`peft_name`]).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars = Vec::new();
        for (layer, pairs) in self.layers.iter().enumerate() {
            for (&projection, pair) in pairs {
                vars.push((peft_name(layer, projection, "lora_A"), pair.a.clone()));
                vars.push((peft_name(layer, projection, "lora_B"), pair.b.clone()));
            }
        }
        vars
    }

    /// Parameters that can change: the selected heads' entries of every `A` and `B`.
    pub fn trainable_parameters(&self) -> usize {
        self.layers.iter().flat_map(BTreeMap::values).map(Pair::trainable).sum()
    }

    /// Full-size `A` and `B` of every target projection of every layer, zero
    /// outside the selected heads (all zero in a layer without one), under
    /// PEFT names: what an export writes.
    pub fn tensors(&self, model: &LlamaConfig) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        let (dtype, device) = self.dtype_device();
        for (layer, pairs) in self.layers.iter().enumerate() {
            for &projection in &self.config.targets {
                let (a, b) = match pairs.get(&projection) {
                    Some(pair) => pair.effective()?,
                    None => {
                        let (rows, cols) = shape(model, projection);
                        (
                            Tensor::zeros((self.config.rank, cols), dtype, &device)?,
                            Tensor::zeros((rows, self.config.rank), dtype, &device)?,
                        )
                    }
                };
                out.insert(peft_name(layer, projection, "lora_A"), a);
                out.insert(peft_name(layer, projection, "lora_B"), b);
            }
        }
        Ok(out)
    }

    fn dtype_device(&self) -> (DType, Device) {
        self.layers
            .iter()
            .flat_map(BTreeMap::values)
            .next()
            .map_or((DType::F32, Device::Cpu), |p| (p.a.dtype(), p.a.device().clone()))
    }

    /// Replaces every `A` and `B` with tensors of the same names (a checkpoint).
    pub fn load_tensors(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.vars() {
            let tensor = tensors
                .get(&name)
                .ok_or_else(|| candle_core::Error::msg(format!("`{name}` is missing")))?;
            var.set(&tensor.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// `s * B A` for one projection, `[out, in]`: what a merge adds to `W`.
    pub fn delta(&self, layer: usize, projection: Projection) -> Result<Option<Tensor>> {
        let Some(pair) = self.layers[layer].get(&projection) else {
            return Ok(None);
        };
        let (a, b) = pair.effective()?;
        Ok(Some((b.matmul(&a)? * self.config.scale())?))
    }
}

impl ProjectionHook for Lora {
    fn apply(
        &self,
        layer: usize,
        projection: Projection,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor> {
        let Some(pair) = self.layers[layer].get(&projection) else {
            return Ok(output);
        };
        let (a, b) = pair.effective()?;
        // Adapters train in f32; a half-precision model computes in its own dtype.
        let (a, b) = (a.to_dtype(input.dtype())?, b.to_dtype(input.dtype())?);
        add_low_rank(input, output, &a, &b, self.config.scale())
    }

    fn low_rank(&self, layer: usize, projection: Projection) -> Result<Option<LowRank>> {
        let Some(pair) = self.layers[layer].get(&projection) else {
            return Ok(None);
        };
        let (a, b) = pair.effective()?;
        Ok(Some(LowRank { a, b, scale: self.config.scale() }))
    }
}

/// `output + scale (x Aᵀ) Bᵀ` for a projection's `input` x of any batch
/// shape, never forming `B A`: the LoRA term both the trainable adapter and
/// a loaded one add.
pub fn add_low_rank(
    input: &Tensor,
    output: Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let dims = input.dims();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x = input.reshape((rows, dims[dims.len() - 1]))?;
    let delta = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
    let delta = delta.reshape(output.shape())?;
    output + delta
}

/// `(out, in)` of a projection's weight.
pub fn shape(model: &LlamaConfig, projection: Projection) -> (usize, usize) {
    let head_dim = model.head_dim();
    let q = model.num_attention_heads * head_dim;
    let kv = model.num_kv_heads() * head_dim;
    match projection {
        Projection::Q => (q, model.hidden_size),
        Projection::K | Projection::V => (kv, model.hidden_size),
        Projection::O => (model.hidden_size, q),
    }
}

/// The selection matrix of one projection and how many rows (q/k/v) or
/// columns (o) of the full weight it adapts; no matrix when it adapts all.
fn selection(
    model: &LlamaConfig,
    mask: &HeadMask,
    layer: usize,
    projection: Projection,
    dtype: DType,
    device: &Device,
) -> Result<(Option<Tensor>, usize)> {
    let head_dim = model.head_dim();
    let heads: Vec<bool> = match projection {
        Projection::Q | Projection::O => mask.layers[layer].clone(),
        Projection::K | Projection::V => mask.kv_heads(layer, model.num_kv_heads()),
    };
    let kept_heads: Vec<usize> = (0..heads.len()).filter(|&h| heads[h]).collect();
    let kept = kept_heads.len() * head_dim;
    if kept_heads.len() == heads.len() || kept == 0 {
        return Ok((None, kept));
    }
    let full = heads.len() * head_dim;
    // `[full, kept]`: column j is 1 at the j-th kept row.
    let mut values = vec![0f32; full * kept];
    for (slot, &head) in kept_heads.iter().enumerate() {
        for d in 0..head_dim {
            values[(head * head_dim + d) * kept + slot * head_dim + d] = 1.0;
        }
    }
    let select = Tensor::from_vec(values, (full, kept), device)?.to_dtype(dtype)?;
    let select = if projection == Projection::O { select.t()?.contiguous()? } else { select };
    Ok((Some(select), kept))
}

/// The PEFT tensor name: `base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight`.
pub fn peft_name(layer: usize, projection: Projection, matrix: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.self_attn.{}.{matrix}.weight",
        projection.module_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::testkit::tiny_config;

    #[test]
    fn kv_heads_follow_any_selected_query_head() {
        // 4 query heads, 2 kv heads: group of 2.
        let mask = HeadMask::from_heads(1, 4, &[(0, 1)]);
        assert_eq!(mask.kv_heads(0, 2), vec![true, false]);
        let mask = HeadMask::from_heads(1, 4, &[(0, 2), (0, 3)]);
        assert_eq!(mask.kv_heads(0, 2), vec![false, true]);
    }

    #[test]
    fn trainable_counts_only_selected_rows_and_columns() {
        let config = tiny_config();
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let layers = config.num_hidden_layers;
        let lora_config = LoraConfig { rank: 2, alpha: 4.0, targets: Projection::ALL.to_vec() };
        let all = HeadMask::all(layers, config.num_attention_heads);
        let full =
            Lora::new(&config, lora_config.clone(), all, 1, DType::F32, &Device::Cpu).unwrap();
        let one = HeadMask::from_heads(layers, config.num_attention_heads, &[(0, 0)]);
        let sel = Lora::new(&config, lora_config, one, 1, DType::F32, &Device::Cpu).unwrap();
        let r = 2;
        let (q_out, kv_out) = (shape(&config, Projection::Q).0, shape(&config, Projection::K).0);
        // Layer 0 only: q keeps one head of B's rows, k and v one kv head,
        // o one head of A's columns; the other layers have no adapter.
        let layer0 = (r * hidden + head_dim * r) * 3 + (r * head_dim + hidden * r);
        assert_eq!(sel.trainable_parameters(), layer0);
        assert_eq!(
            full.trainable_parameters(),
            layers
                * ((r * hidden + q_out * r)
                    + 2 * (r * hidden + kv_out * r)
                    + (r * q_out + hidden * r))
        );
    }

    #[test]
    fn exported_tensors_are_zero_outside_selected_heads() {
        let config = tiny_config();
        let head_dim = config.head_dim();
        let lora_config = LoraConfig { rank: 2, alpha: 4.0, targets: Projection::ALL.to_vec() };
        let one =
            HeadMask::from_heads(config.num_hidden_layers, config.num_attention_heads, &[(0, 1)]);
        let lora = Lora::new(&config, lora_config, one, 3, DType::F32, &Device::Cpu).unwrap();
        for (_, var) in lora.vars() {
            var.set(&var.ones_like().unwrap()).unwrap();
        }
        let tensors = lora.tensors(&config).unwrap();
        let b: Vec<Vec<f32>> = tensors[&peft_name(0, Projection::Q, "lora_B")].to_vec2().unwrap();
        for (row, values) in b.iter().enumerate() {
            let selected = row / head_dim == 1;
            assert!(values.iter().all(|&v| v == if selected { 1.0 } else { 0.0 }), "row {row}");
        }
        let a: Vec<Vec<f32>> = tensors[&peft_name(0, Projection::O, "lora_A")].to_vec2().unwrap();
        for values in &a {
            for (col, &v) in values.iter().enumerate() {
                assert_eq!(v, if col / head_dim == 1 { 1.0 } else { 0.0 }, "column {col}");
            }
        }
        let b1: Vec<Vec<f32>> = tensors[&peft_name(1, Projection::V, "lora_B")].to_vec2().unwrap();
        assert!(b1.iter().flatten().all(|&v| v == 0.0));
    }
}
