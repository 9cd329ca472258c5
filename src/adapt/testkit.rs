//! A tiny random Llama and a byte-level tokenizer, built in code: what unit
//! tests, integration tests and the training benchmark's smoke runs use when
//! a real model would be too slow or is not at hand.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, decoders};

use crate::model::config::LlamaConfig;
use crate::model::load::LoadedModel;

/// The tokenizer's special tokens, after its 256 byte tokens.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// 2 layers, 4 query heads over 2 key/value heads, head size 8, and a
/// vocabulary of the 256 bytes plus [`SPECIALS`].
pub fn tiny_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 256 + SPECIALS.len(),
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": true,
        "bos_token_id": 256,
        "eos_token_id": 258,
    }))
    .expect("a valid config")
}

/// A byte-level BPE without merges: one token per byte, plus [`SPECIALS`].
pub fn byte_tokenizer() -> Tokenizer {
    let vocab: Vocab = ByteLevel::alphabet()
        .into_iter()
        .map(|c| c.to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, id as u32))
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build();
    let mut tokenizer = Tokenizer::new(bpe.expect("a valid BPE"));
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tokenizer.with_decoder(Some(decoders::byte_level::ByteLevel::default()));
    let specials: Vec<AddedToken> =
        SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    tokenizer.add_special_tokens(&specials);
    tokenizer
}

/// Random weights under Hugging Face names, drawn from `seed`.
pub fn tiny_weights(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut random = |shape: &[usize], mean: f32, spread: f32| {
        let n = shape.iter().product();
        let data: Vec<f32> =
            (0..n).map(|_| mean + spread * (rng.random::<f32>() * 2.0 - 1.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data")
    };
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) =
        (config.num_attention_heads * config.head_dim(), config.num_kv_heads() * config.head_dim());
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), random(&[v, h], 0.0, 0.5));
    w.insert("model.norm.weight".into(), random(&[h], 1.0, 0.1));
    for l in 0..config.num_hidden_layers {
        let p = |name: &str| format!("model.layers.{l}.{name}.weight");
        for (name, shape) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            w.insert(p(name), random(&shape, 0.0, 0.3));
        }
        w.insert(p("input_layernorm"), random(&[h], 1.0, 0.1));
        w.insert(p("post_attention_layernorm"), random(&[h], 1.0, 0.1));
    }
    w
}

/// The tiny model with the byte tokenizer, in `dtype` on the CPU.
pub fn tiny_loaded(seed: u64, dtype: DType) -> LoadedModel {
    let config = tiny_config();
    LoadedModel::from_parts(
        &config,
        tiny_weights(&config, seed),
        byte_tokenizer(),
        None,
        dtype,
        &Device::Cpu,
    )
    .expect("the tiny model loads")
}
