//! [`LlamaConfig`]: the shape of a Llama-family model, read from a Hugging
//! Face `config.json` or from a GGUF file's `{arch}.*` metadata keys.
//!
//! Rope scaling (Llama 3.1's `rope_scaling`), attention and MLP biases, and
//! `model_type`s other than `llama` and `mistral` are not supported: a
//! config that asks for them is refused rather than silently run as a plain
//! Llama.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

/// Why a model config could not be read or is not one watchfire can run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading `{}`: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("`{}` is not a valid Llama config: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("GGUF metadata key `{key}`: {message}")]
    Gguf { key: String, message: String },
    #[error("model config: {0}")]
    Invalid(String),
}

/// The hyper-parameters of a Llama-family model, named as in Hugging Face's
/// `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "first_id")]
    pub eos_token_id: Option<u32>,
    /// Only checked to be absent; see the module doc.
    #[serde(default, skip_serializing)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Only checked to be false.
    #[serde(default, skip_serializing)]
    pub attention_bias: bool,
    /// Only checked to be false.
    #[serde(default, skip_serializing)]
    pub mlp_bias: bool,
    /// Only checked to be a Llama-family type when present.
    #[serde(default, skip_serializing)]
    pub model_type: Option<String>,
}

/// `model_type`s whose weights and forward pass are a plain Llama's.
const LLAMA_TYPES: &[&str] = &["llama", "mistral"];

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

/// `eos_token_id` is a number or a list of numbers; the first one is kept.
fn first_id<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    let value = Option::<OneOrMany>::deserialize(de)?;
    Ok(match value {
        Some(OneOrMany::One(id)) => Some(id),
        Some(OneOrMany::Many(ids)) => ids.first().copied(),
        None => None,
    })
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|source| ConfigError::Json { path: path.to_path_buf(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the `{arch}.*` keys of a GGUF file's metadata. `vocab_size` is
    /// the fallback when the metadata does not name one (it usually comes
    /// from the token embedding's shape); the output head is tied when the
    /// file has no `output.weight`, which the caller says with `tied`.
    pub fn from_gguf_metadata(
        metadata: &HashMap<String, Value>,
        vocab_size: usize,
        tied: bool,
    ) -> Result<Self, ConfigError> {
        let arch = metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".to_string());
        let key = |name: &str| format!("{arch}.{name}");
        let usize_of = |name: &str| gguf_usize(metadata, &key(name));
        let optional = |name: &str| metadata.get(&key(name)).map(|_| usize_of(name)).transpose();

        let hidden_size = usize_of("embedding_length")?;
        let num_attention_heads = usize_of("attention.head_count")?;
        let head_dim = optional("rope.dimension_count")?
            .or(optional("attention.key_length")?)
            .filter(|&d| d != hidden_size / num_attention_heads.max(1));
        let config = Self {
            vocab_size: optional("vocab_size")?.unwrap_or(vocab_size),
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads,
            num_key_value_heads: optional("attention.head_count_kv")?,
            head_dim,
            rms_norm_eps: gguf_f64(metadata, &key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: gguf_f64(metadata, &key("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: optional("context_length")?.unwrap_or(2048),
            tie_word_embeddings: tied,
            bos_token_id: gguf_u32(metadata, "tokenizer.ggml.bos_token_id"),
            eos_token_id: gguf_u32(metadata, "tokenizer.ggml.eos_token_id"),
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            model_type: Some(arch),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return invalid(format!("rope_scaling {scaling} is not supported"));
        }
        if self.attention_bias || self.mlp_bias {
            return invalid("attention and MLP biases are not supported".to_string());
        }
        if let Some(kind) = &self.model_type
            && !LLAMA_TYPES.contains(&kind.as_str())
        {
            return invalid(format!(
                "model_type `{kind}` is not supported (only {})",
                LLAMA_TYPES.join(" and ")
            ));
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_kv_heads();
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return invalid(format!(
                "{heads} attention heads cannot be shared among {kv_heads} key/value heads"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return invalid(format!(
                "hidden size {} is not a multiple of {heads} heads",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return invalid(format!("head dimension {} is odd; RoPE needs pairs", self.head_dim()));
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

fn gguf_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize, ConfigError> {
    let error = |message: String| ConfigError::Gguf { key: key.to_string(), message };
    let value = metadata.get(key).ok_or_else(|| error("missing".to_string()))?;
    let number = match value {
        Value::U8(v) => u64::from(*v),
        Value::U16(v) => u64::from(*v),
        Value::U32(v) => u64::from(*v),
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).map_err(|e| error(e.to_string()))?,
        Value::I16(v) => u64::try_from(*v).map_err(|e| error(e.to_string()))?,
        Value::I32(v) => u64::try_from(*v).map_err(|e| error(e.to_string()))?,
        Value::I64(v) => u64::try_from(*v).map_err(|e| error(e.to_string()))?,
        other => return Err(error(format!("expected an integer, found {other:?}"))),
    };
    usize::try_from(number).map_err(|e| error(e.to_string()))
}

fn gguf_f64(metadata: &HashMap<String, Value>, key: &str) -> Option<f64> {
    match metadata.get(key)? {
        Value::F32(v) => Some(f64::from(*v)),
        Value::F64(v) => Some(*v),
        _ => None,
    }
}

/// A token id from the metadata; absent or malformed ids read as absent.
pub(crate) fn gguf_u32(metadata: &HashMap<String, Value>, key: &str) -> Option<u32> {
    gguf_usize(metadata, key).ok().and_then(|v| u32::try_from(v).ok())
}
