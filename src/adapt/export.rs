//! Adapters on disk, in a layout other tools load, and merging them.
//!
//! An adapter folder holds:
//!
//! - `adapter_config.json` and `adapter_model.safetensors`: the LoRA in
//!   PEFT's layout (`peft_type: LORA`, `r`, `lora_alpha`, `target_modules`;
//!   tensors `base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight`
//!   `[r, in]` and `...lora_B.weight` `[out, r]`, f32). A selective adapter
//!   is written at full size with zero rows (B of q/k/v) and columns (A of
//!   o) outside its heads, so PEFT, mistralrs or a merge compute exactly the
//!   model watchfire trained. Absent when only prefixes were trained.
//! - `prefixes.safetensors`: one tensor per subtask, `prefix.TASK`, shaped
//!   `[layers, 2, kv_heads, P, head_dim]` (index 0 keys, 1 values; keys
//!   already rotated, as a key/value cache holds them). The tokens of a
//!   prompt take positions `P, P+1, ...`. Absent without prefixes.
//! - `watchfire.json`: the method, rank, head mask, prefix tasks and length,
//!   and the parameter counts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::lora::{HeadMask, peft_name, shape};
use super::prefix::prefix_from_tensor;
use super::tasks::Task;
use super::train::{Method, Trainer};
use crate::model::config::LlamaConfig;
use crate::model::llama::{KvPrefix, LowRank, Projection, ProjectionHook};
use crate::model::load::LoadedModel;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const PREFIXES: &str = "prefixes.safetensors";
pub const META: &str = "watchfire.json";

/// `watchfire.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub method: Method,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraMeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixMeta>,
    /// Parameters the optimizer updated.
    pub trainable_parameters: usize,
    /// Parameters of the base model.
    pub base_parameters: usize,
    /// Each subtask's instruction, as in the training prompts: `watchfire
    /// generate --task` puts a new report after it the same way.
    #[serde(default)]
    pub instructions: BTreeMap<Task, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraMeta {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Projection>,
    pub mask: HeadMask,
    pub selected_heads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefixMeta {
    pub tasks: Vec<Task>,
    pub length: usize,
}

/// Writes a trained adapter into `dir`; returns the files written.
pub fn write_adapter(
    trainer: &Trainer<'_>,
    base: &LoadedModel,
    base_name: &str,
    instructions: &BTreeMap<Task, String>,
    dir: &Path,
) -> std::io::Result<Vec<PathBuf>> {
    fs_err::create_dir_all(dir)?;
    let mut written = Vec::new();
    let config = base.config();
    let mut meta = AdapterMeta {
        method: trainer.config().method,
        lora: None,
        prefix: None,
        trainable_parameters: trainer.trainable_parameters(),
        base_parameters: base.tensors().values().map(Tensor::elem_count).sum(),
        instructions: instructions.clone(),
    };
    if let Some(lora) = trainer.lora() {
        let lc = lora.config();
        let peft = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_name,
            "r": lc.rank,
            "lora_alpha": lc.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "target_modules": lc.targets.iter().map(|p| p.module_name()).collect::<Vec<_>>(),
        });
        let path = dir.join(ADAPTER_CONFIG);
        fs_err::write(&path, serde_json::to_vec_pretty(&peft).map_err(std::io::Error::other)?)?;
        written.push(path);
        let tensors: HashMap<String, Tensor> =
            lora.tensors(config).map_err(std::io::Error::other)?.into_iter().collect();
        let path = dir.join(ADAPTER_WEIGHTS);
        candle_core::safetensors::save(&tensors, &path).map_err(std::io::Error::other)?;
        written.push(path);
        meta.lora = Some(LoraMeta {
            rank: lc.rank,
            alpha: lc.alpha,
            targets: lc.targets.clone(),
            mask: lora.mask().clone(),
            selected_heads: lora.mask().count(),
        });
    }
    if let Some(prefixes) = trainer.prefixes() {
        let tensors: HashMap<String, Tensor> = prefixes
            .materialise()
            .map_err(std::io::Error::other)?
            .into_iter()
            .map(|(task, t)| (format!("prefix.{}", task.name()), t))
            .collect();
        let path = dir.join(PREFIXES);
        candle_core::safetensors::save(&tensors, &path).map_err(std::io::Error::other)?;
        written.push(path);
        meta.prefix = Some(PrefixMeta { tasks: prefixes.tasks().to_vec(), length: prefixes.len() });
    }
    let path = dir.join(META);
    fs_err::write(&path, serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?)?;
    written.push(path);
    Ok(written)
}

/// Why an adapter could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("`{}` is not an adapter folder: it has no `{META}`", .0.display())]
    NotAnAdapter(PathBuf),
    #[error("reading the adapter at `{}`: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("the adapter has no prefix for `{task}`; it has: {available}")]
    NoPrefix { task: String, available: String },
    #[error("the adapter was not trained on `{task}`; it knows: {available}")]
    NoTask { task: String, available: String },
}

/// A LoRA read back from PEFT tensors: a [`ProjectionHook`].
#[derive(Debug)]
pub struct LoadedLora {
    scale: f64,
    /// `(layer, projection)` -> `(A, B)`.
    pairs: BTreeMap<(usize, Projection), (Tensor, Tensor)>,
}

impl LoadedLora {
    /// `scale * B A` for one projection.
    pub fn delta(&self, layer: usize, projection: Projection) -> Result<Option<Tensor>> {
        match self.pairs.get(&(layer, projection)) {
            Some((a, b)) => Ok(Some((b.matmul(a)? * self.scale)?)),
            None => Ok(None),
        }
    }
}

impl ProjectionHook for LoadedLora {
    fn apply(
        &self,
        layer: usize,
        projection: Projection,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor> {
        let Some((a, b)) = self.pairs.get(&(layer, projection)) else {
            return Ok(output);
        };
        super::lora::add_low_rank(input, output, a, b, self.scale)
    }

    fn low_rank(&self, layer: usize, projection: Projection) -> Result<Option<LowRank>> {
        Ok(self.pairs.get(&(layer, projection)).map(|(a, b)| LowRank {
            a: a.clone(),
            b: b.clone(),
            scale: self.scale,
        }))
    }
}

/// An adapter folder, loaded for inference.
#[derive(Debug)]
pub struct Adapter {
    pub meta: AdapterMeta,
    pub lora: Option<LoadedLora>,
    pub prefixes: BTreeMap<Task, Tensor>,
}

impl Adapter {
    /// Reads `dir` for a model of shape `config`, in `dtype` on `device`.
    pub fn load(
        dir: &Path,
        config: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, AdapterError> {
        let meta_path = dir.join(META);
        if !meta_path.is_file() {
            return Err(AdapterError::NotAnAdapter(dir.to_path_buf()));
        }
        let read = |message: String| AdapterError::Read { path: dir.to_path_buf(), message };
        let meta: AdapterMeta =
            serde_json::from_slice(&std::fs::read(&meta_path).map_err(|e| read(e.to_string()))?)
                .map_err(|e| read(e.to_string()))?;
        let lora = match &meta.lora {
            None => None,
            Some(lm) => {
                let tensors = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), device)
                    .map_err(|e| read(e.to_string()))?;
                let mut pairs = BTreeMap::new();
                for layer in 0..config.num_hidden_layers {
                    for &projection in &lm.targets {
                        let get = |m: &str| {
                            let name = peft_name(layer, projection, m);
                            tensors
                                .get(&name)
                                .ok_or_else(|| read(format!("`{name}` is missing")))
                                .and_then(|t| t.to_dtype(dtype).map_err(|e| read(e.to_string())))
                        };
                        let (a, b) = (get("lora_A")?, get("lora_B")?);
                        let (out, inner) = shape(config, projection);
                        if a.dims() != [lm.rank, inner] || b.dims() != [out, lm.rank] {
                            return Err(read(format!(
                                "layer {layer} {projection}: A is {:?} and B {:?}, the model \
                                 needs [{}, {inner}] and [{out}, {}]",
                                a.dims(),
                                b.dims(),
                                lm.rank,
                                lm.rank
                            )));
                        }
                        pairs.insert((layer, projection), (a, b));
                    }
                }
                Some(LoadedLora { scale: lm.alpha / lm.rank as f64, pairs })
            }
        };
        let mut prefixes = BTreeMap::new();
        if let Some(pm) = &meta.prefix {
            let tensors = candle_core::safetensors::load(dir.join(PREFIXES), device)
                .map_err(|e| read(e.to_string()))?;
            for task in &pm.tasks {
                let name = format!("prefix.{}", task.name());
                let t = tensors.get(&name).ok_or_else(|| read(format!("`{name}` is missing")))?;
                prefixes.insert(*task, t.clone());
            }
        }
        Ok(Self { meta, lora, prefixes })
    }

    /// The prompt for `report` under `task`, as in training: the task's
    /// instruction, a blank line, `Report:` and the report.
    pub fn prompt(&self, task: Task, report: &str) -> std::result::Result<String, AdapterError> {
        let instruction = self.meta.instructions.get(&task).ok_or_else(|| {
            let available: Vec<&str> = self.meta.instructions.keys().map(|t| t.name()).collect();
            AdapterError::NoTask { task: task.name().to_string(), available: available.join(", ") }
        })?;
        Ok(format!("{instruction}{}{report}", super::tasks::REPORT_HEADER))
    }

    /// The prefix of `task`, ready for a forward pass; `None` when the
    /// adapter was trained without prefixes.
    pub fn prefix(
        &self,
        task: Task,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Option<KvPrefix>, AdapterError> {
        if self.prefixes.is_empty() {
            return Ok(None);
        }
        let Some(kv) = self.prefixes.get(&task) else {
            let available: Vec<&str> = self.prefixes.keys().map(|t| t.name()).collect();
            return Err(AdapterError::NoPrefix {
                task: task.name().to_string(),
                available: available.join(", "),
            });
        };
        prefix_from_tensor(kv, dtype, device).map(Some).map_err(|e| AdapterError::Read {
            path: PathBuf::from(PREFIXES),
            message: e.to_string(),
        })
    }
}

/// The base model with the adapter's LoRA added into its weights (prefixes
/// cannot be merged and are left out).
pub fn merge(base: &LoadedModel, lora: &LoadedLora) -> Result<LoadedModel> {
    let config = base.config().clone();
    let mut tensors = base.tensors().clone();
    for layer in 0..config.num_hidden_layers {
        for projection in Projection::ALL {
            if let Some(delta) = lora.delta(layer, projection)? {
                let name =
                    format!("model.layers.{layer}.self_attn.{}.weight", projection.module_name());
                let w = &tensors[&name];
                let merged = (w.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
                tensors.insert(name, merged.to_dtype(w.dtype())?);
            }
        }
    }
    LoadedModel::from_parts(
        &config,
        tensors,
        base.tokenizer.clone(),
        base.chat_template.clone(),
        base.model.dtype(),
        base.model.device(),
    )
    .map_err(candle_core::Error::wrap)
}
