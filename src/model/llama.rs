//! [`Llama`]: a Llama-family decoder written for training.
//!
//! Every op on the forward path has a backward pass: plain candle ops
//! (matmul, index-select, broadcast arithmetic, silu) and, on the CPU, the
//! fused ops of [`super::ops`] (linear with a frozen weight, softmax,
//! RMSNorm, RoPE), whose backward passes are written by hand and tested
//! against the composed ops. Three hooks are designed in:
//!
//! - a [`ProjectionHook`] sees the input and output of every attention
//!   projection (q, k, v, o) and may replace the output: this is where LoRA
//!   adapters, per-head or not, plug in;
//! - a [`KvPrefix`] prepends learned key/value pairs to every layer's
//!   attention, visible to every token (prefix tuning);
//! - [`ForwardOptions::hidden_layers`] returns the residual stream after any
//!   layer, for the contrastive loss.
//!
//! Weights use the Hugging Face layout and names (`model.layers.N.self_attn.q_proj.weight`, ...)
//! and RoPE is the `rotate_half` form. Positions count from 0 for every row
//! (after the prefix), so padding is expected on the right; a left-padded
//! batch gets shifted positions.
//!
//! [`Llama::forward_cached`] keeps each layer's keys and values in a
//! [`KvCache`] so that generation feeds one new token per step. When no
//! tensor on the path needs a gradient (inference), RMSNorm and softmax use
//! candle's own fused kernels.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::LlamaConfig;
use super::ops::{self, linear};

/// One of the four attention projections a [`ProjectionHook`] sees; in
/// recipes `q`, `k`, `v` or `o`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    Q,
    K,
    V,
    O,
}

impl Projection {
    pub const ALL: [Projection; 4] = [Self::Q, Self::K, Self::V, Self::O];

    /// The Hugging Face (and PEFT) module name: `q_proj`, ...
    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module_name())
    }
}

/// Called on every attention projection; returns the output to use.
///
/// `input` is `[batch, seq, in]` and `output` (the frozen projection's result)
/// is `[batch, seq, out]`. A LoRA hook returns `output + scale * (input A^T) B^T`.
pub trait ProjectionHook: Send + Sync {
    fn apply(
        &self,
        layer: usize,
        projection: Projection,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor>;

    /// The hook as a low-rank pair, when it is plain LoRA: the model then
    /// computes the projection and `scale * (x A^T) B^T` in one fused op
    /// ([`ops::lora_linear`]) instead of calling [`ProjectionHook::apply`].
    /// Both must give the same result.
    fn low_rank(&self, _layer: usize, _projection: Projection) -> Result<Option<LowRank>> {
        Ok(None)
    }
}

/// `A` `[r, in]`, `B` `[out, r]` and the scale of a LoRA term.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// Key/value pairs prepended to every layer's attention.
///
/// Each tensor is `[batch or 1, kv_heads, prefix_len, head_dim]`, one key and
/// one value per layer, all with the same `prefix_len`. Keys are used as
/// given (no rotation is applied to them, as with a key/value cache), and
/// the tokens' positions start at `prefix_len`, as if the prefix were the
/// cached past (the layout PEFT's prefix tuning uses).
#[derive(Debug, Clone)]
pub struct KvPrefix {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
}

impl KvPrefix {
    pub fn new(keys: Vec<Tensor>, values: Vec<Tensor>) -> Result<Self> {
        if keys.len() != values.len() || keys.is_empty() {
            candle_core::bail!("a prefix needs one key and one value per layer");
        }
        let len = keys[0].dim(2)?;
        for (key, value) in keys.iter().zip(&values) {
            if key.rank() != 4 || key.dims() != value.dims() || key.dim(2)? != len {
                candle_core::bail!(
                    "prefix keys and values must all be [b, kv_heads, {len}, head_dim], found \
                     {:?} and {:?}",
                    key.dims(),
                    value.dims()
                );
            }
        }
        Ok(Self { keys, values, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `i`'s prefix keys and values.
    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.keys[i], &self.values[i])
    }
}

/// Keys and values of the tokens seen so far, one pair per layer, for
/// [`Llama::forward_cached`]. Keys are stored after RoPE.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// `[batch, len]`, 1 for real tokens: kept once a masked batch was fed,
    /// so later steps keep hiding its padding.
    mask: Option<Tensor>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many tokens the cache holds (a prefix is not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
        self.mask = None;
    }

    /// Layer `i`'s keys (after RoPE) and values, `[batch, kv_heads, len, head_dim]`.
    pub fn layer(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(i).and_then(Option::as_ref).map(|(k, v)| (k, v))
    }
}

/// What a forward pass should do besides computing logits.
#[derive(Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// `[batch, seq]`, 1 for real tokens and 0 for padding (any dtype).
    /// Padding keys are hidden from every query.
    pub attention_mask: Option<&'a Tensor>,
    pub hook: Option<&'a dyn ProjectionHook>,
    pub prefix: Option<&'a KvPrefix>,
    /// Residual-stream taps: `l` is the hidden state after `l` layers (0 is
    /// the embeddings, `num_hidden_layers` the last layer's output before the
    /// final norm).
    pub hidden_layers: &'a [usize],
    /// Compute logits for the last position only (`[batch, 1, vocab]`), as
    /// generation needs: the vocabulary projection is a fifth of a small
    /// model's work per token.
    pub last_logits_only: bool,
    /// For batched generation over left-padded prompts: how many padding
    /// columns begin each row (cached tokens included). Row `r`'s positions
    /// are shifted down by `left_padding[r]`, so its first real token sits
    /// at the position it would have alone, and RoPE (and an unrotated
    /// prefix) see the same positions as an unpadded run. Padding columns
    /// must be masked through `attention_mask` when they are fed.
    pub left_padding: Option<&'a [usize]>,
}

/// The result of [`Llama::forward`].
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor,
    /// `[batch, seq, hidden]` for each layer asked for.
    pub hidden: BTreeMap<usize, Tensor>,
}

/// A Llama-family decoder; see the module doc.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
}

impl Llama {
    /// Builds the model from `vb`, under Hugging Face names. With a
    /// `VarMap`-backed builder, missing weights are created: projections and
    /// embeddings random (std 0.02), norms at 1.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let embed_shape = (config.vocab_size, config.hidden_size);
        let embed = vb.get_with_hints(embed_shape, "model.embed_tokens.weight", normal())?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::new(config, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(config, vb.pp("model.norm"))?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get_with_hints(embed_shape, "lm_head.weight", normal())?
        };
        let rope = Rope::new(config, vb.dtype(), vb.device())?;
        Ok(Self { config: config.clone(), embed, layers, norm, lm_head, rope })
    }

    /// Builds the model from tensors under Hugging Face names, cast to
    /// `dtype`. The tensors are constants: no gradient flows into them.
    pub fn from_tensors(
        config: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(config, VarBuilder::from_tensors(tensors, dtype, device))
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Runs `ids` (`[batch, seq]`, u32) through the model.
    pub fn forward(&self, ids: &Tensor, opts: &ForwardOptions) -> Result<ForwardOutput> {
        self.run(ids, opts, None, None)
    }

    /// Runs `ids` as the continuation of the tokens in `cache`, and appends
    /// their keys and values to it. The attention mask, if any, covers the
    /// new tokens only; the cached ones are all visible.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        cache: &mut KvCache,
    ) -> Result<ForwardOutput> {
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.layers.len()];
        }
        let past_mask = cache.mask.clone();
        let output = self.run(ids, opts, Some(&mut cache.layers), past_mask.as_ref())?;
        let (batch, seq) = ids.dims2()?;
        if opts.attention_mask.is_some() || past_mask.is_some() {
            let new = match opts.attention_mask {
                Some(mask) => mask.to_dtype(DType::F32)?,
                None => Tensor::ones((batch, seq), DType::F32, self.device())?,
            };
            cache.mask = Some(match past_mask {
                Some(past) => Tensor::cat(&[&past, &new], 1)?,
                None if cache.len > 0 => {
                    let seen = Tensor::ones((batch, cache.len), DType::F32, self.device())?;
                    Tensor::cat(&[&seen, &new], 1)?
                }
                None => new,
            });
        }
        cache.len += seq;
        Ok(output)
    }

    /// The summed negative log-likelihood of `labels` (u32 `[batch * seq]`,
    /// the token each position should predict) weighted by `weights` (f32
    /// `[batch * seq]`, 0 for positions that are not scored), and the taps
    /// `opts.hidden_layers` asks for: a training step's loss without the
    /// `[batch * seq, vocab]` logits when the vocabulary projection is
    /// frozen ([`ops::head_nll`]). `opts.last_logits_only` is ignored.
    pub fn nll(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        labels: &Tensor,
        weights: &Tensor,
    ) -> Result<(Tensor, BTreeMap<usize, Tensor>)> {
        let (x, hidden) = self.trunk(ids, opts, None, None)?;
        let x = self.norm.forward(&x)?;
        let x = x.reshape(((), self.config.hidden_size))?;
        Ok((ops::head_nll(&x, &self.lm_head, labels, weights)?, hidden))
    }

    fn run(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        cache: Option<&mut Vec<Option<(Tensor, Tensor)>>>,
        past_mask: Option<&Tensor>,
    ) -> Result<ForwardOutput> {
        let (x, hidden) = self.trunk(ids, opts, cache, past_mask)?;
        let seq = x.dim(1)?;
        let x = if opts.last_logits_only { x.narrow(1, seq - 1, 1)? } else { x };
        let x = self.norm.forward(&x)?;
        let logits = linear(&x, &self.lm_head)?;
        Ok(ForwardOutput { logits, hidden })
    }

    /// Every layer: the last layer's output before the final norm, and the
    /// taps.
    fn trunk(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        mut cache: Option<&mut Vec<Option<(Tensor, Tensor)>>>,
        past_mask: Option<&Tensor>,
    ) -> Result<(Tensor, BTreeMap<usize, Tensor>)> {
        let _span = tracing::trace_span!("llama_forward", dims = ?ids.dims()).entered();
        let (batch, seq) = ids.dims2()?;
        let past = match cache.as_deref() {
            Some(layers) => {
                layers.first().and_then(Option::as_ref).map_or(Ok(0), |(k, _)| k.dim(2))?
            }
            None => 0,
        };
        let prefix_len = opts.prefix.map_or(0, KvPrefix::len) + past;
        if let Some(prefix) = opts.prefix
            && prefix.keys.len() != self.layers.len()
        {
            candle_core::bail!(
                "the prefix has {} layers, the model {}",
                prefix.keys.len(),
                self.layers.len()
            );
        }

        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        x = x.reshape((batch, seq, self.config.hidden_size))?;
        let (cos, sin) = match opts.left_padding {
            None => self.rope.at(prefix_len, seq)?,
            Some(padding) => self.rope.at_rows(prefix_len, seq, padding)?,
        };
        let learned = opts.prefix.map_or(0, KvPrefix::len);
        let visible = Visible { learned, past, past_mask, mask: opts.attention_mask };
        let bias = self.attention_bias(batch, seq, &visible)?;
        let context =
            AttentionContext { cos: &cos, sin: &sin, bias: bias.as_ref(), hook: opts.hook };

        let mut hidden = BTreeMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if opts.hidden_layers.contains(&i) {
                hidden.insert(i, x.clone());
            }
            let prefix = opts.prefix.map(|p| (&p.keys[i], &p.values[i]));
            let past = cache.as_deref_mut().map(|layers| &mut layers[i]);
            x = layer.forward(i, &x, &context, prefix, past)?;
        }
        let last = self.layers.len();
        if opts.hidden_layers.contains(&last) {
            hidden.insert(last, x.clone());
        }
        if let Some(bad) = opts.hidden_layers.iter().find(|&&l| l > last) {
            candle_core::bail!("hidden layer {bad} asked for, the model has {last} layers");
        }

        Ok((x, hidden))
    }

    /// `[batch, 1, seq, prefix + past + seq]`: 0 where a query may attend, a
    /// large negative number where it may not (later tokens, padding). A
    /// learned prefix is always visible, cached tokens unless `past_mask`
    /// hides them. `None` when every query may see every key: one new
    /// token, no mask.
    fn attention_bias(
        &self,
        batch: usize,
        seq: usize,
        visible: &Visible<'_>,
    ) -> Result<Option<Tensor>> {
        let prefix_len = visible.learned + visible.past;
        if seq == 1 && visible.mask.is_none() && visible.past_mask.is_none() {
            return Ok(None);
        }
        let blocked = blocked_value(self.dtype());
        let total = prefix_len + seq;
        let mut causal = vec![0f32; seq * total];
        for query in 0..seq {
            for key in query + 1..seq {
                causal[query * total + prefix_len + key] = blocked;
            }
        }
        let causal = Tensor::from_vec(causal, (1, 1, seq, total), self.device())?;
        if visible.mask.is_none() && visible.past_mask.is_none() {
            return causal.to_dtype(self.dtype()).map(Some);
        }

        let hidden = |mask: &Tensor, width: usize, what: &str| -> Result<Tensor> {
            if mask.dims() != [batch, width] {
                candle_core::bail!("{what} is {:?}, expected [{batch}, {width}]", mask.dims());
            }
            mask.to_dtype(DType::F32)?.eq(0f64)?.to_dtype(DType::F32)? * f64::from(blocked)
        };
        let zeros = |width: usize| Tensor::zeros((batch, width), DType::F32, self.device());
        let mut columns = vec![zeros(visible.learned)?];
        columns.push(match visible.past_mask {
            Some(mask) => hidden(mask, visible.past, "the cached mask")?,
            None => zeros(visible.past)?,
        });
        columns.push(match visible.mask {
            Some(mask) => hidden(mask, seq, "attention mask")?,
            None => zeros(seq)?,
        });
        let padding = Tensor::cat(&columns, 1)?.reshape((batch, 1, 1, total))?;
        causal.broadcast_add(&padding)?.to_dtype(self.dtype()).map(Some)
    }
}

/// Which keys a forward pass may see besides the causal rule.
struct Visible<'a> {
    /// Learned prefix columns: always visible.
    learned: usize,
    /// Cached columns, hidden where `past_mask` is 0.
    past: usize,
    past_mask: Option<&'a Tensor>,
    /// The new tokens, hidden where `mask` is 0.
    mask: Option<&'a Tensor>,
}

/// Large enough that exp() of it is 0, small enough not to overflow.
fn blocked_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -30_000.0,
        _ => -1e9,
    }
}

fn normal() -> Init {
    Init::Randn { mean: 0.0, stdev: 0.02 }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(config.hidden_size, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps: config.rms_norm_eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// Cos/sin tables for `rotate_half` RoPE, `[max_positions, head_dim]`.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head_dim = config.head_dim();
        let positions = config.max_position_embeddings;
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| (1.0 / config.rope_theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?;
        let freqs = t.reshape((positions, 1))?.broadcast_mul(&inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// The tables for positions `start..start + len`.
    fn at(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let max = self.cos.dim(0)?;
        if start + len > max {
            candle_core::bail!("{} positions asked for, the model has {max}", start + len);
        }
        Ok((self.cos.narrow(0, start, len)?, self.sin.narrow(0, start, len)?))
    }

    /// Per-row tables `[batch, 1, len, head_dim]` for positions
    /// `start..start + len`, each row shifted down by its left padding
    /// (padding columns, whose shifted position would be negative, get 0).
    fn at_rows(&self, start: usize, len: usize, padding: &[usize]) -> Result<(Tensor, Tensor)> {
        let max = self.cos.dim(0)?;
        let positions: Vec<u32> = padding
            .iter()
            .flat_map(|&pad| (start..start + len).map(move |p| p.saturating_sub(pad) as u32))
            .collect();
        if let Some(&top) = positions.iter().max()
            && top as usize >= max
        {
            candle_core::bail!("position {top} asked for, the model has {max}");
        }
        let index = Tensor::from_vec(positions, padding.len() * len, self.cos.device())?;
        let dim = self.cos.dim(1)?;
        let table = |t: &Tensor| t.index_select(&index, 0)?.reshape((padding.len(), 1, len, dim));
        Ok((table(&self.cos)?, table(&self.sin)?))
    }
}

/// What every layer's attention shares in one forward pass.
struct AttentionContext<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    bias: Option<&'a Tensor>,
    hook: Option<&'a dyn ProjectionHook>,
}

#[derive(Debug, Clone)]
struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let heads = config.num_attention_heads;
        let kv_heads = config.num_kv_heads();
        let get = |out: usize, inner: usize, name: &str| {
            vb.get_with_hints((out, inner), &format!("{name}.weight"), normal())
        };
        Ok(Self {
            q: get(heads * head_dim, hidden, "q_proj")?,
            k: get(kv_heads * head_dim, hidden, "k_proj")?,
            v: get(kv_heads * head_dim, hidden, "v_proj")?,
            o: get(hidden, heads * head_dim, "o_proj")?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    fn project(
        &self,
        layer: usize,
        projection: Projection,
        x: &Tensor,
        ctx: &AttentionContext,
    ) -> Result<Tensor> {
        let weight = match projection {
            Projection::Q => &self.q,
            Projection::K => &self.k,
            Projection::V => &self.v,
            Projection::O => &self.o,
        };
        let Some(hook) = ctx.hook else {
            return linear(x, weight);
        };
        match hook.low_rank(layer, projection)? {
            Some(LowRank { a, b, scale }) => {
                let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
                ops::lora_linear(x, weight, &a, &b, scale)
            }
            None => hook.apply(layer, projection, x, linear(x, weight)?),
        }
    }

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttentionContext,
        prefix: Option<(&Tensor, &Tensor)>,
        past: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| {
            t.reshape((batch, seq, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = self.project(layer, Projection::Q, x, ctx)?;
        let q = ops::rope_heads(&q, self.heads, ctx.cos, ctx.sin)?;
        let k = self.project(layer, Projection::K, x, ctx)?;
        let mut k = ops::rope_heads(&k, self.kv_heads, ctx.cos, ctx.sin)?;
        let v = split(self.project(layer, Projection::V, x, ctx)?, self.kv_heads)?;
        let mut v = v;
        if let Some(slot) = past {
            if let Some((past_k, past_v)) = slot.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        if let Some((pk, pv)) = prefix {
            let expand =
                |p: &Tensor| p.broadcast_as((batch, self.kv_heads, p.dim(2)?, self.head_dim));
            k = Tensor::cat(&[&expand(pk)?.contiguous()?, &k], 2)?;
            v = Tensor::cat(&[&expand(pv)?.contiguous()?, &v], 2)?;
        }

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let attended = super::attention::attention(&q, &k, &v, scale, ctx.bias)?;
        self.project(layer, Projection::O, &attended, ctx)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

impl Mlp {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let get = |shape: (usize, usize), name: &str| {
            vb.get_with_hints(shape, &format!("{name}.weight"), normal())
        };
        Ok(Self {
            gate: get((inter, hidden), "gate_proj")?,
            up: get((inter, hidden), "up_proj")?,
            down: get((hidden, inter), "down_proj")?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = ops::swiglu(&linear(x, &self.gate)?, &linear(x, &self.up)?)?;
        linear(&gated, &self.down)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: RmsNorm,
    attention: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_norm: RmsNorm::new(config, vb.pp("input_layernorm"))?,
            attention: Attention::new(config, vb.pp("self_attn"))?,
            post_norm: RmsNorm::new(config, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(config, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttentionContext,
        prefix: Option<(&Tensor, &Tensor)>,
        past: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let normed = self.input_norm.forward(x)?;
        let x = (x + self.attention.forward(layer, &normed, ctx, prefix, past)?)?;
        let normed = self.post_norm.forward(&x)?;
        x + self.mlp.forward(&normed)?
    }
}
