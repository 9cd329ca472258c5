//! Tokenizers for Llama-family models, from a `tokenizer.json` or from a
//! GGUF file's `tokenizer.ggml.*` metadata, and the ChatML chat template.
//!
//! Only GGUF's `gpt2` tokenizer model (byte-level BPE) is rebuilt. Its
//! pre-tokenizer is the GPT-2 split, preceded by a split into single digits
//! for the `tokenizer.ggml.pre` types known to do that (`smollm`,
//! `starcoder`, `refact`, ...); other `pre` types fall back to the plain
//! GPT-2 split with a warning, and a few of their texts will tokenize
//! differently from the original. Control and user-defined tokens become
//! special tokens, so `<|im_start|>` in a text is one token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// `tokenizer.ggml.pre` types whose pre-tokenizer splits digits one by one.
const SINGLE_DIGIT_PRE: &[&str] = &["smollm", "starcoder", "refact", "codeshell", "exaone"];

/// llama.cpp token types that are special: 3 is control, 4 user-defined.
const SPECIAL_TOKEN_TYPES: [i32; 2] = [3, 4];

/// Why a tokenizer could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("loading tokenizer `{}`: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("GGUF metadata key `{key}`: {message}")]
    Metadata { key: String, message: String },
    #[error("GGUF tokenizer model `{0}` is not supported (only `gpt2` byte-level BPE is)")]
    UnsupportedModel(String),
    #[error("building the BPE tokenizer: {0}")]
    Build(String),
}

fn metadata_error(key: &str, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Metadata { key: key.to_string(), message: message.into() }
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer_json(path: &Path) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_file(path)
        .map_err(|err| TokenizerError::Load { path: path.to_path_buf(), message: err.to_string() })
}

/// Rebuilds the tokenizer a GGUF file carries; see the module doc.
pub fn tokenizer_from_gguf(metadata: &HashMap<String, Value>) -> Result<Tokenizer, TokenizerError> {
    let model = string(metadata, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(model.to_string()));
    }
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            let (a, b) = merge.split_once(' ').ok_or_else(|| {
                metadata_error("tokenizer.ggml.merges", format!("merge `{merge}` has no space"))
            })?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>, TokenizerError>>()?;
    let vocab: Vocab =
        tokens.iter().enumerate().map(|(id, t)| (t.to_string(), id as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|err| TokenizerError::Build(err.to_string()))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(metadata)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special = special_tokens(metadata, &tokens)?;
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

fn pre_tokenizer(metadata: &HashMap<String, Value>) -> PreTokenizerWrapper {
    let byte_level = ByteLevel::new(false, true, true);
    let pre = metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok());
    match pre.map(String::as_str) {
        Some(pre) if SINGLE_DIGIT_PRE.contains(&pre) => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        None | Some("default" | "gpt2" | "gpt-2") => byte_level.into(),
        Some(other) => {
            tracing::warn!(pre = other, "unknown GGUF pre-tokenizer; using the GPT-2 split");
            byte_level.into()
        }
    }
}

/// The control and user-defined tokens, as special added tokens.
fn special_tokens(
    metadata: &HashMap<String, Value>,
    tokens: &[&str],
) -> Result<Vec<AddedToken>, TokenizerError> {
    let key = "tokenizer.ggml.token_type";
    let Some(types) = metadata.get(key) else {
        return Ok(Vec::new());
    };
    let types = types.to_vec().map_err(|err| metadata_error(key, err.to_string()))?;
    let mut special = Vec::new();
    for (token, kind) in tokens.iter().zip(types) {
        let kind = kind.to_i32().map_err(|err| metadata_error(key, err.to_string()))?;
        if SPECIAL_TOKEN_TYPES.contains(&kind) {
            special.push(AddedToken::from(token.to_string(), true));
        }
    }
    Ok(special)
}

fn string<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a str, TokenizerError> {
    let value = metadata.get(key).ok_or_else(|| metadata_error(key, "missing"))?;
    value.to_string().map(String::as_str).map_err(|err| metadata_error(key, err.to_string()))
}

fn strings<'a>(
    metadata: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Vec<&'a str>, TokenizerError> {
    let value = metadata.get(key).ok_or_else(|| metadata_error(key, "missing"))?;
    let items = value.to_vec().map_err(|err| metadata_error(key, err.to_string()))?;
    items
        .iter()
        .map(|item| item.to_string().map(String::as_str))
        .collect::<Result<_, _>>()
        .map_err(|err| metadata_error(key, err.to_string()))
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Renders `messages` in ChatML (`<|im_start|>role\ncontent<|im_end|>\n`),
/// ending with an open assistant turn when `add_generation_prompt` is set.
/// No default system prompt is added: pass one as the first message if the
/// model expects it (SmolLM2-Instruct's own template does).
pub fn chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut text = String::new();
    for message in messages {
        text.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", message.role, message.content));
    }
    if add_generation_prompt {
        text.push_str("<|im_start|>assistant\n");
    }
    text
}
