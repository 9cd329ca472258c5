//! The model under evaluation: a base model, optionally with a trained
//! adapter (LoRA and per-subtask prefixes) or fully fine-tuned weights.
//!
//! A `train` artifact holds `adapter/` and, for full fine-tuning, `model/`
//! as well. When `model/` is there it replaces the base weights; the
//! adapter folder still carries the prefixes and instructions. Greedy
//! decoding runs over a key/value cache, one prompt at a time or several
//! prompts of one task together, left-padded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapt::batch::chat_prompt;
use crate::adapt::export::Adapter;
use crate::adapt::tasks::Task;
use crate::model::generate::{Generation, Stop, generate_batch};
use crate::model::llama::{ForwardOptions, KvPrefix, ProjectionHook};
use crate::model::load::{LoadedModel, load};

/// Why a model or adapter could not be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error("loading the model at `{}`: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("{0}")]
    Adapter(String),
    #[error("{what}: {source}")]
    Model {
        what: String,
        #[source]
        source: candle_core::Error,
    },
}

impl SubjectError {
    pub fn model(what: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Self {
        let what = what.into();
        move |source| Self::Model { what, source }
    }
}

/// A model ready to answer prompts, with its adapter if it has one.
pub struct Subject {
    pub loaded: LoadedModel,
    pub adapter: Option<Adapter>,
    prefixes: BTreeMap<Task, KvPrefix>,
}

/// Where a `train` artifact or an adapter folder keeps its pieces.
struct AdapterPaths {
    adapter: Option<PathBuf>,
    weights: Option<PathBuf>,
}

fn adapter_paths(path: &Path) -> AdapterPaths {
    let weights = path.join("model");
    let weights = weights.join("config.json").is_file().then_some(weights);
    let nested = path.join("adapter");
    let adapter = if nested.is_dir() {
        Some(nested)
    } else if path.join("adapter_config.json").is_file() || path.join("watchfire.json").is_file() {
        Some(path.to_path_buf())
    } else {
        None
    };
    AdapterPaths { adapter, weights }
}

impl Subject {
    /// The base model at `model` in f32 on the CPU, adapted by `adapter`
    /// (a `train` artifact or an adapter folder) when given.
    pub fn load(model: &Path, adapter: Option<&Path>) -> Result<Self, SubjectError> {
        let paths = adapter.map(adapter_paths);
        let weights = paths.as_ref().and_then(|p| p.weights.clone());
        let model_path = weights.as_deref().unwrap_or(model);
        let loaded = load_f32(model_path)?;
        let adapter = match paths.and_then(|p| p.adapter) {
            None if adapter.is_some() && weights.is_none() => {
                return Err(SubjectError::Adapter(format!(
                    "`{}` holds neither an adapter nor a model",
                    adapter.unwrap_or(model).display()
                )));
            }
            None => None,
            Some(dir) => Some(
                Adapter::load(&dir, loaded.config(), DType::F32, &Device::Cpu)
                    .map_err(|e| SubjectError::Adapter(e.to_string()))?,
            ),
        };
        let mut prefixes = BTreeMap::new();
        if let Some(adapter) = &adapter {
            for &task in adapter.prefixes.keys() {
                let prefix = adapter
                    .prefix(task, DType::F32, &Device::Cpu)
                    .map_err(|e| SubjectError::Adapter(e.to_string()))?;
                if let Some(prefix) = prefix {
                    prefixes.insert(task, prefix);
                }
            }
        }
        Ok(Self { loaded, adapter, prefixes })
    }

    /// The LoRA hook, when the adapter has one.
    pub fn hook(&self) -> Option<&dyn ProjectionHook> {
        self.adapter.as_ref().and_then(|a| a.lora.as_ref()).map(|l| l as &dyn ProjectionHook)
    }

    /// Forward options for `task`: the LoRA, and the task's prefix when the
    /// adapter has one (`None` runs without a prefix).
    pub fn options(&self, task: Option<Task>) -> ForwardOptions<'_> {
        ForwardOptions {
            hook: self.hook(),
            prefix: task.and_then(|t| self.prefixes.get(&t)),
            ..ForwardOptions::default()
        }
    }

    /// The token ids of `prompt` as the model sees it in training: one
    /// ChatML user turn and an open assistant turn.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, SubjectError> {
        let text = chat_prompt(prompt);
        self.loaded
            .tokenizer
            .encode(text.as_str(), false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| SubjectError::Adapter(format!("tokenizing a prompt: {e}")))
    }

    /// Greedy answers to several prompts of one task, decoded together
    /// (see [`generate_batch`]); each with whether it was cut at the limit.
    pub fn answer_batch(
        &self,
        task: Task,
        prompts: &[&str],
        max_tokens: usize,
    ) -> Result<Vec<(String, bool)>, SubjectError> {
        let ids: Vec<Vec<u32>> =
            prompts.iter().map(|p| self.encode_prompt(p)).collect::<Result<_, _>>()?;
        let _span =
            tracing::trace_span!("answer_batch", task = task.name(), rows = ids.len()).entered();
        let opts = self.options(Some(task));
        let generations =
            generate_batch(&self.loaded.model, &ids, max_tokens, &self.loaded.eos_ids, &opts)
                .map_err(SubjectError::model("generating"))?;
        generations.iter().map(|g| self.decoded(g)).collect()
    }

    fn decoded(&self, generation: &Generation) -> Result<(String, bool), SubjectError> {
        let text = self
            .loaded
            .tokenizer
            .decode(&generation.tokens, true)
            .map_err(|e| SubjectError::Adapter(format!("decoding: {e}")))?;
        Ok((text.trim().to_string(), generation.stop == Stop::Length))
    }

    /// Hidden states of layer `layer` for `ids` under `task`'s prefix:
    /// `[seq, hidden]`.
    pub fn hidden(&self, ids: &[u32], task: Task, layer: usize) -> Result<Tensor, SubjectError> {
        let input = Tensor::new(ids, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(SubjectError::model("building the input"))?;
        let layers = [layer];
        let opts = ForwardOptions {
            hidden_layers: &layers,
            last_logits_only: true,
            ..self.options(Some(task))
        };
        let out =
            self.loaded.model.forward(&input, &opts).map_err(SubjectError::model("forward"))?;
        out.hidden
            .get(&layer)
            .ok_or_else(|| SubjectError::Adapter(format!("layer {layer} was not returned")))?
            .squeeze(0)
            .map_err(SubjectError::model("reading hidden states"))
    }
}

/// Loads a model in f32 on the CPU.
pub fn load_f32(path: &Path) -> Result<LoadedModel, SubjectError> {
    load(path, DType::F32, &Device::Cpu)
        .map_err(|e| SubjectError::Load { path: path.to_path_buf(), message: e.to_string() })
}
