//! Text generation with [`Llama`]: greedy or sampled decoding over a
//! key/value cache.
//!
//! The prompt is run once; each later step feeds only the newest token. A
//! [`Sampler`] picks the next token from the last position's logits: the
//! arg-max at temperature 0, otherwise a draw from the temperature-scaled
//! distribution cut to its `top_k` most likely tokens and to the smallest set
//! holding `top_p` of the probability. Draws come from a ChaCha8 stream
//! seeded by the caller, so the same prompt, model and seed give the same
//! tokens on the CPU.

use candle_core::{D, DType, Result, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::llama::{ForwardOptions, KvCache, Llama};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probabilities sum to `p`.
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// An end-of-sequence token was produced (it is not in the output).
    Eos,
    /// `max_new_tokens` were produced.
    Length,
}

/// What [`generate`] produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Log-probability of each produced token under the model (before
    /// temperature and truncation).
    pub logprobs: Vec<f32>,
    pub stop: Stop,
}

/// Picks tokens from logits; holds the random stream.
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        Self { sampling, rng }
    }

    /// The next token for `logits` (one row of f32 logits), and its
    /// log-probability under the untouched distribution.
    pub fn pick(&mut self, logits: &[f32]) -> (u32, f32) {
        let log_norm = log_sum_exp(logits);
        let token = if self.sampling.is_greedy() { argmax(logits) } else { self.draw(logits) };
        (token as u32, logits[token] - log_norm)
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let temperature = self.sampling.temperature as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Ties broken by token id, so the order never depends on the sort.
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.sampling.top_k {
            order.truncate(k.max(1));
        }
        let top = logits[order[0]];
        let mut weights: Vec<f64> =
            order.iter().map(|&i| f64::from((logits[i] - top) / temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        if let Some(p) = self.sampling.top_p {
            let mut kept = 0.0;
            let mut cut = weights.len();
            for (i, w) in weights.iter().enumerate() {
                kept += w / total;
                if kept >= p {
                    cut = i + 1;
                    break;
                }
            }
            weights.truncate(cut);
            order.truncate(cut);
        }
        let total: f64 = weights.iter().sum();
        let mut target = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if target < *w {
                return order[i];
            }
            target -= w;
        }
        order[weights.len() - 1]
    }
}

/// Index of the largest value; the lowest index among equals.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

pub fn log_sum_exp(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = values.iter().map(|v| f64::from(v - max).exp()).sum();
    max + sum.ln() as f32
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with
/// each token as it is produced (for streaming). `opts` carries an adapter
/// hook or prefix; its attention mask must be empty.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: &[u32],
    sampling: &Sampling,
    opts: &ForwardOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt has no tokens");
    }
    if opts.attention_mask.is_some() {
        candle_core::bail!("generation takes one unpadded prompt");
    }
    let opts = ForwardOptions { last_logits_only: true, ..*opts };
    let mut sampler = Sampler::new(sampling.clone());
    let mut cache = KvCache::new();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let mut generation =
        Generation { tokens: Vec::new(), logprobs: Vec::new(), stop: Stop::Length };
    while generation.tokens.len() < max_new_tokens {
        let logits = model.forward_cached(&input, &opts, &mut cache)?.logits;
        let last = last_logits(&logits)?;
        let (token, logprob) = sampler.pick(&last);
        if eos.contains(&token) {
            generation.stop = Stop::Eos;
            break;
        }
        on_token(token);
        generation.tokens.push(token);
        generation.logprobs.push(logprob);
        input = Tensor::new(&[token], model.device())?.unsqueeze(0)?;
    }
    Ok(generation)
}

/// Greedy generation for several prompts at once: prompts are padded on
/// the left to one width and masked, each row's positions are shifted so
/// that its first real token sits where it would alone (see
/// [`ForwardOptions::left_padding`]), and every step feeds one token per
/// row over a shared key/value cache. Each row gives the tokens
/// [`generate`] gives it alone with greedy sampling, up to floating-point
/// summation order. A row that has stopped keeps being fed (its output is
/// cut at its stop) until every row has stopped. `opts` carries the hook
/// and prefix; its own mask and padding must be empty.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    opts: &ForwardOptions,
) -> Result<Vec<Generation>> {
    if prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("a prompt has no tokens");
    }
    if opts.attention_mask.is_some() || opts.left_padding.is_some() {
        candle_core::bail!("batched generation pads and masks the prompts itself");
    }
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padding: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let pad_id = eos.first().copied().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch * width);
    let mut mask = Vec::with_capacity(batch * width);
    for (prompt, &pad) in prompts.iter().zip(&padding) {
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0f32, pad).chain(std::iter::repeat_n(1f32, prompt.len())));
    }
    let device = model.device();
    let mut input = Tensor::from_vec(ids, (batch, width), device)?;
    let prompt_mask = Tensor::from_vec(mask, (batch, width), device)?;
    let mut cache = KvCache::new();
    let mut out: Vec<Generation> = (0..batch)
        .map(|_| Generation { tokens: Vec::new(), logprobs: Vec::new(), stop: Stop::Length })
        .collect();
    let mut running = vec![true; batch];
    for step in 0..max_new_tokens {
        let step_opts = ForwardOptions {
            attention_mask: (step == 0).then_some(&prompt_mask),
            left_padding: Some(&padding),
            last_logits_only: true,
            ..*opts
        };
        let logits = model.forward_cached(&input, &step_opts, &mut cache)?.logits;
        let rows: Vec<Vec<f32>> = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(batch);
        for (row, values) in rows.iter().enumerate() {
            let token = argmax(values) as u32;
            next.push(token);
            if !running[row] {
                continue;
            }
            if eos.contains(&token) {
                out[row].stop = Stop::Eos;
                running[row] = false;
                continue;
            }
            out[row].tokens.push(token);
            out[row].logprobs.push(values[token as usize] - log_sum_exp(values));
        }
        if !running.iter().any(|r| *r) {
            break;
        }
        input = Tensor::from_vec(next, (batch, 1), device)?;
    }
    Ok(out)
}

/// The last position's logits of a `[1, seq, vocab]` tensor, as f32.
pub fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let seq = logits.dim(1)?;
    logits.narrow(1, seq - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// Log-softmax over the vocabulary, `[.., vocab]`; half-precision logits
/// are widened to f32 first.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let logits = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    candle_nn::ops::log_softmax(&logits, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_of_equal_maxima() {
        let mut sampler = Sampler::new(Sampling::greedy());
        let (token, logprob) = sampler.pick(&[1.0, 3.0, 3.0, 0.0]);
        assert_eq!(token, 1);
        let expected = 3.0 - log_sum_exp(&[1.0, 3.0, 3.0, 0.0]);
        assert!((logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let sampling = Sampling { temperature: 0.9, top_k: Some(3), top_p: None, seed: 7 };
        let draw = |s: &Sampling| {
            let mut sampler = Sampler::new(s.clone());
            (0..200).map(|_| sampler.pick(&logits).0).collect::<Vec<_>>()
        };
        let first = draw(&sampling);
        assert_eq!(first, draw(&sampling));
        // The three largest logits are at 6, 13 and 20 (value 1.8, lowest ids first).
        assert!(first.iter().all(|t| [6, 13, 20].contains(t)), "{first:?}");
        assert!([6, 13, 20].iter().all(|t| first.contains(t)));
        let other = draw(&Sampling { seed: 8, ..sampling });
        assert_ne!(first, other);
    }

    /// Greedy tokens of each prompt alone and of all prompts in one batch.
    fn alone_and_batched(
        prefix: Option<&super::super::llama::KvPrefix>,
    ) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        use crate::adapt::testkit::tiny_loaded;
        let loaded = tiny_loaded(5, DType::F32);
        let prompts: Vec<Vec<u32>> = vec![
            vec![256, 72, 101, 108],
            vec![256, 7, 9],
            vec![256, 1, 2, 3, 4, 5, 6, 7, 8],
            vec![256],
        ];
        let opts = ForwardOptions { prefix, ..ForwardOptions::default() };
        let alone = prompts
            .iter()
            .map(|p| {
                generate(&loaded.model, p, 12, &[], &Sampling::greedy(), &opts, |_| {})
                    .unwrap()
                    .tokens
            })
            .collect();
        let batched = generate_batch(&loaded.model, &prompts, 12, &[], &opts)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect();
        (alone, batched)
    }

    #[test]
    fn batched_greedy_decoding_matches_one_prompt_at_a_time() {
        let (alone, batched) = alone_and_batched(None);
        assert!(alone.iter().all(|t| t.len() == 12));
        assert_eq!(alone, batched);
    }

    #[test]
    fn batched_decoding_keeps_an_unrotated_prefix_at_its_positions() {
        use candle_core::Device;
        let config = crate::adapt::testkit::tiny_config();
        let (kv, dim) = (config.num_kv_heads(), config.head_dim());
        let layer = |seed: f64| {
            let values: Vec<f32> =
                (0..kv * 3 * dim).map(|i| ((i as f64 * 0.37 + seed).sin() * 0.5) as f32).collect();
            Tensor::from_vec(values, (1, kv, 3, dim), &Device::Cpu).unwrap()
        };
        let keys = (0..config.num_hidden_layers).map(|l| layer(l as f64)).collect();
        let values = (0..config.num_hidden_layers).map(|l| layer(10.0 + l as f64)).collect();
        let prefix = super::super::llama::KvPrefix::new(keys, values).unwrap();
        let (alone, batched) = alone_and_batched(Some(&prefix));
        assert_eq!(alone, batched);
        let (plain, _) = alone_and_batched(None);
        assert_ne!(alone, plain, "the prefix should change what the model writes");
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        let logits = [10.0, 0.0, 0.0, 0.0];
        let sampling = Sampling { temperature: 1.0, top_k: None, top_p: Some(0.9), seed: 1 };
        let mut sampler = Sampler::new(sampling);
        assert!((0..100).all(|_| sampler.pick(&logits).0 == 0));
    }
}
