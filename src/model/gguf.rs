//! Loading a Llama-family GGUF file into a [`LlamaConfig`] and f32 tensors
//! under Hugging Face names, ready for [`super::llama::Llama::from_tensors`].
//!
//! Quantized tensors are dequantized to f32 on load: training needs plain
//! tensors, and a 135M-parameter model fits easily.
//!
//! llama.cpp's converter permutes the rows of the query and key projections
//! so that its interleaved RoPE (rotating pairs `2i, 2i + 1`) matches the
//! Hugging Face `rotate_half` RoPE (rotating pairs `i, i + d/2`). The loader
//! undoes that permutation, so the weights are exactly the Hugging Face ones:
//! the model uses `rotate_half`, and adapters trained on the loaded weights
//! apply to the Hugging Face checkpoint too. Tensors other than the Llama
//! ones (`rope_freqs`, for instance) are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::config::{ConfigError, LlamaConfig};

/// Why a GGUF file could not be loaded as a Llama model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("opening `{}`: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("reading GGUF `{}`: {source}", path.display())]
    Read { path: PathBuf, source: candle_core::Error },
    #[error("GGUF `{}` has no tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("GGUF `{}`: {source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
}

/// A GGUF model: its config, its tensors under Hugging Face names
/// (dequantized to f32) and the file's metadata (which carries the
/// tokenizer).
#[derive(Debug)]
pub struct GgufModel {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, Value>,
}

/// Reads the GGUF file at `path`; see the module doc.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel, GgufError> {
    let read_error = |source| GgufError::Read { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path)
        .map_err(|source| GgufError::Open { path: path.to_path_buf(), source })?;
    let content = Content::read(&mut file).map_err(read_error)?;

    let embed = content.tensor_infos.get("token_embd.weight").ok_or_else(|| {
        GgufError::MissingTensor { path: path.to_path_buf(), name: "token_embd.weight".into() }
    })?;
    let vocab_size = embed.shape.dims()[0];
    let tied = !content.tensor_infos.contains_key("output.weight");
    let config = LlamaConfig::from_gguf_metadata(&content.metadata, vocab_size, tied)
        .map_err(|source| GgufError::Config { path: path.to_path_buf(), source })?;

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let Some(hf) = hf_name(name) else {
            tracing::debug!(tensor = %name, "GGUF tensor has no Llama counterpart; skipped");
            continue;
        };
        let qtensor = content.tensor(&mut file, name, &Device::Cpu).map_err(read_error)?;
        let tensor = qtensor.dequantize(&Device::Cpu).map_err(read_error)?;
        let tensor = match hf.rsplit('.').nth(1) {
            Some("q_proj") => unpermute_rope_rows(&tensor, config.num_attention_heads),
            Some("k_proj") => unpermute_rope_rows(&tensor, config.num_kv_heads()),
            _ => Ok(tensor),
        }
        .and_then(|t| t.to_device(device))
        .map_err(read_error)?;
        tensors.insert(hf, tensor);
    }
    Ok(GgufModel { config, tensors, metadata: content.metadata })
}

/// The Hugging Face name of a llama.cpp tensor name, if it is a Llama one.
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(top.to_string());
    }

    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match rest.strip_suffix(".weight")? {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.weight"))
}

/// Undoes llama.cpp's row permutation of a query or key projection
/// (`[heads * head_dim, in]`): within each head, GGUF row `2i + j` is
/// Hugging Face row `j * head_dim / 2 + i`.
pub fn unpermute_rope_rows(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let half = rows / heads / 2;
    weight.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}
