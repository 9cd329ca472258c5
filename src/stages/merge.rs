//! `merge`: a base model with a trained LoRA folded into its weights,
//! written as a Hugging Face folder that any tool loads without an adapter.

use candle_core::Device;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapt::export::{Adapter, merge};
use crate::stage::{InputSpec, Stage, StageContext, StageError, Validate};
use crate::stages::perplexity::Precision;
use crate::stages::train::load_model;

pub struct Merge;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MergeParams {
    /// Precision of the merged weights.
    pub dtype: Precision,
}

impl Default for MergeParams {
    fn default() -> Self {
        Self { dtype: Precision::F32 }
    }
}

impl Validate for MergeParams {}

impl Stage for Merge {
    type Params = MergeParams;

    const KIND: &'static str = "merge";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Adds a trained LoRA into the base model's weights (W + alpha / r \
        * B A) and writes the result as a Hugging Face folder: `config.json`, \
        `model.safetensors`, `tokenizer.json` and the chat template. Prefixes cannot be folded \
        into weights and are left out; the artifact is a model input for any stage.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec {
            name: "model",
            required: true,
            doc: "The base model the adapter was trained on.",
        },
        InputSpec {
            name: "adapter",
            required: true,
            doc: "A `train` stage (its `adapter/` folder) or an adapter folder.",
        },
    ];
    const OUTPUTS: &'static [&'static str] =
        &["config.json", "model.safetensors", "tokenizer.json"];
    const USES_ALL_CORES: bool = true;

    fn run(params: &MergeParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let base = load_model(ctx, params.dtype.dtype())?;
        let input = ctx.input("adapter")?;
        let dir = if input.join("adapter").is_dir() {
            input.join("adapter")
        } else {
            input.to_path_buf()
        };
        let adapter = Adapter::load(&dir, base.config(), base.model.dtype(), &Device::Cpu)
            .map_err(|e| StageError::failed(e.to_string()))?;
        let Some(lora) = &adapter.lora else {
            return Err(StageError::failed(
                "the adapter has no LoRA weights (it trained prefixes only); nothing to merge",
            ));
        };
        if !adapter.prefixes.is_empty() {
            ctx.notice("the adapter's prefixes are not part of the merged model");
        }
        let merged = merge(&base, lora).map_err(|e| StageError::failed(format!("merging: {e}")))?;
        merged.export(ctx.out_dir).map_err(|e| StageError::failed(e.to_string()))?;
        Ok(())
    }
}
