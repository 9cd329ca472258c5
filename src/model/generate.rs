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

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        let logits = [10.0, 0.0, 0.0, 0.0];
        let sampling = Sampling { temperature: 1.0, top_k: None, top_p: Some(0.9), seed: 1 };
        let mut sampler = Sampler::new(sampling);
        assert!((0..100).all(|_| sampler.pick(&logits).0 == 0));
    }
}
