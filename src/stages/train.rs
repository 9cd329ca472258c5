//! `train`: fine-tunes a model on `tasks` examples with one of the methods of
//! [`crate::adapt::train`], and writes the adapter (or, for full
//! fine-tuning, the model) with its curves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapt::batch::{Sequence, chat_prompt, encode};
use crate::adapt::export::write_adapter;
use crate::adapt::lora::HeadMask;
use crate::adapt::optim::AdamWParams;
use crate::adapt::tasks::{Example, Task};
use crate::adapt::train::{Method, TrainConfig, Trainer};
use crate::corpus::{read_jsonl, write_json, write_jsonl};
use crate::model::llama::Projection;
use crate::model::load::{LoadedModel, load};
use crate::model::source::SourceRecord;
use crate::plot::{Series, line_chart};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::stages::perplexity::Precision;

pub struct Train;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// Which weights train: `full` (every weight), `lora` (LoRA on every head), `selective`
    /// (LoRA on the heads of the `mask` input, a `probe` stage), or `none` (prefixes only).
    pub method: Method,
    /// LoRA rank r.
    pub rank: usize,
    /// LoRA alpha; the update is scaled by alpha / r.
    pub alpha: f64,
    /// Projections that get LoRA (`q`, `k`, `v`, `o`). Default: `[q, v]` for `lora`, all four
    /// for `selective`.
    pub targets: Option<Vec<Projection>>,
    /// Train one key/value prefix per subtask; each example uses its subtask's prefix.
    pub prefix: bool,
    /// Virtual tokens per prefix.
    pub prefix_len: usize,
    /// Hidden width of the MLP that reparameterises the prefixes while training; 0 trains
    /// them directly.
    pub prefix_mlp: usize,
    /// Weight of the contrastive (InfoNCE) term over entity-span embeddings; 0 turns it off.
    pub contrastive_lambda: f64,
    /// InfoNCE temperature.
    pub temperature: f64,
    /// Hidden-state layer for span embeddings (0 = embeddings, L = last layer). Default:
    /// the middle layer.
    pub contrastive_layer: Option<usize>,
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps before the cosine decay.
    pub warmup: usize,
    /// The cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub clip: f64,
    /// Examples longer than this many tokens (prompt and target) are left out.
    pub max_len: usize,
    /// Use only the first N examples; 0 uses all.
    pub max_examples: usize,
    /// Precision of the frozen weights; adapters and optimizer state are f32. Full
    /// fine-tuning needs `f32`.
    pub dtype: Precision,
    /// Write a checkpoint every N steps; a killed run resumes from the last one. 0 never.
    pub checkpoint_every: usize,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self {
            method: Method::Selective,
            rank: 8,
            alpha: 16.0,
            targets: None,
            prefix: true,
            prefix_len: 8,
            prefix_mlp: 0,
            contrastive_lambda: 0.1,
            temperature: 0.1,
            contrastive_layer: None,
            steps: 100,
            batch: 8,
            grad_accum: 1,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            clip: 1.0,
            max_len: 256,
            max_examples: 0,
            dtype: Precision::F32,
            checkpoint_every: 25,
        }
    }
}

impl Validate for TrainParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.method == Method::None && !self.prefix {
            return Err(ParamError::new("method", "`none` trains nothing without `prefix: true`")
                .with_help("set `prefix: true`, or pick `lora`, `selective` or `full`"));
        }
        if self.method == Method::Full && self.dtype != Precision::F32 {
            return Err(ParamError::new("dtype", "full fine-tuning trains f32 weights"));
        }
        if !(1..=512).contains(&self.rank) {
            return Err(ParamError::new("rank", "must be between 1 and 512"));
        }
        if self.alpha <= 0.0 {
            return Err(ParamError::new("alpha", "must be positive"));
        }
        if let Some(targets) = &self.targets
            && targets.is_empty()
        {
            return Err(ParamError::new("targets", "must name at least one projection"));
        }
        if self.prefix && !(1..=256).contains(&self.prefix_len) {
            return Err(ParamError::new("prefix_len", "must be between 1 and 256"));
        }
        if !(self.contrastive_lambda >= 0.0 && self.contrastive_lambda.is_finite()) {
            return Err(ParamError::new("contrastive_lambda", "must be 0 or more"));
        }
        if self.temperature <= 0.0 {
            return Err(ParamError::new("temperature", "must be positive"));
        }
        if self.steps == 0 || self.batch == 0 || self.grad_accum == 0 {
            let which = if self.steps == 0 {
                "steps"
            } else if self.batch == 0 {
                "batch"
            } else {
                "grad_accum"
            };
            return Err(ParamError::new(which, "must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return Err(ParamError::new("lr", "must be in (0, 1)"));
        }
        if self.warmup > self.steps {
            return Err(ParamError::new("warmup", "must not exceed `steps`"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(ParamError::new("min_lr_ratio", "must be in [0, 1]"));
        }
        if self.max_len < 8 {
            return Err(ParamError::new("max_len", "must be at least 8"));
        }
        Ok(())
    }
}

/// `train.json`: what was trained and how much of it.
#[derive(Debug, Serialize)]
struct Summary {
    method: Method,
    trainable_parameters: usize,
    base_parameters: usize,
    /// Trainable share of the base model's parameters, in percent.
    trainable_percent: f64,
    optimizer_state_bytes: usize,
    selected_heads: Option<usize>,
    total_heads: usize,
    examples: usize,
    examples_too_long: usize,
    steps: usize,
    tokens: usize,
    first_loss: f64,
    final_loss: f64,
}

impl Stage for Train {
    type Params = TrainParams;

    const KIND: &'static str = "train";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Fine-tunes a model on `tasks` examples: full fine-tuning, standard \
        LoRA, or LoRA on only the heads a `probe` selected, optionally with one learned \
        key/value prefix per subtask and a contrastive term over entity-span embeddings \
        (loss = CE + contrastive_lambda * InfoNCE). AdamW with warmup and cosine decay, gradient \
        clipping and accumulation. Writes the adapter in PEFT's layout (`adapter/`), or the \
        whole model for `full` (`model/`), the loss and learning-rate curves, and a plot. \
        Checkpoints let a killed run resume where it stopped; the same seed gives the same \
        bytes on the CPU.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec {
            name: "model",
            required: true,
            doc: "The base model: a `model` stage, a GGUF file or a Hugging Face folder.",
        },
        InputSpec {
            name: "examples",
            required: true,
            doc: "A `tasks` stage (its `train.jsonl`), or a JSONL file of examples.",
        },
        InputSpec {
            name: "mask",
            required: false,
            doc: "A `probe` stage (its `mask.json`); required by `method: selective`.",
        },
    ];
    const OUTPUTS: &'static [&'static str] =
        &["adapter", "model", "curves.jsonl", "loss.svg", "train.json"];
    const USES_ALL_CORES: bool = true;

    fn check_inputs(params: &TrainParams, bound: &[&str]) -> Result<(), ParamError> {
        if params.method == Method::Selective && !bound.contains(&"mask") {
            return Err(ParamError::new("mask", "`method: selective` needs a head mask")
                .with_help("bind `mask` to a `probe` stage"));
        }
        Ok(())
    }

    fn run(params: &TrainParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let failed = |what: &str| {
            let what = what.to_string();
            move |err: candle_core::Error| StageError::failed(format!("{what}: {err}"))
        };
        let base = load_model(ctx, params.dtype.dtype())?;
        let examples = read_examples(ctx, "examples", params.max_examples)?;
        let (sequences, too_long) = encode_all(&base, &examples, params.max_len)?;
        if too_long > 0 {
            ctx.notice(&format!(
                "{too_long} of {} examples are longer than max_len {} and were left out",
                examples.len(),
                params.max_len
            ));
        }
        let mask = match ctx.optional_input("mask") {
            Some(_) if params.method == Method::Selective => Some(read_mask(ctx)?),
            _ => None,
        };
        let tasks = tasks_of(&examples);
        let instructions = instructions(&base, &examples, &tasks)?;
        let config = train_config(params, base.config().num_hidden_layers, ctx.seed);
        let mut trainer =
            Trainer::new(&base, config, mask, sequences.clone(), tasks.clone(), &instructions)
                .map_err(failed("setting up training"))?;
        let base_parameters: usize =
            base.tensors().values().map(candle_core::Tensor::elem_count).sum();
        ctx.notice(&format!(
            "{:?}: {} trainable parameters ({:.3}% of {}), optimizer state {:.1} MiB",
            params.method,
            trainable_fmt(trainer.trainable_parameters()),
            100.0 * trainer.trainable_parameters() as f64 / base_parameters as f64,
            trainable_fmt(base_parameters),
            trainer.optimizer_bytes() as f64 / (1 << 20) as f64
        ));

        if let Some(step) = trainer.resume(ctx.checkpoints).map_err(failed("resuming"))? {
            ctx.notice(&format!("resuming from the checkpoint at step {step}"));
        }
        let progress = ctx.progress(Some(params.steps as u64), "steps");
        progress.inc(trainer.step_count() as u64);
        let stop_after = fault_injection();
        let started = Instant::now();
        let mut tokens_here = 0usize;
        while trainer.step_count() < params.steps {
            let point = trainer.step().map_err(failed("training"))?;
            tokens_here += point.tokens;
            progress.inc(1);
            progress.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tokens/s",
                point.loss,
                point.lr,
                tokens_here as f64 / started.elapsed().as_secs_f64()
            ));
            let step = trainer.step_count();
            if params.checkpoint_every > 0
                && step % params.checkpoint_every == 0
                && step < params.steps
            {
                trainer.save_checkpoint(ctx.checkpoints)?;
            }
            if stop_after.is_some_and(|n| step >= n) {
                return Err(StageError::failed(format!(
                    "stopped after step {step} (WATCHFIRE_FAIL_AFTER_STEPS)"
                )));
            }
        }
        ctx.notice(&format!(
            "{} steps, {:.0} tokens/s",
            params.steps,
            tokens_here as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));

        if params.method == Method::Full {
            let model = trainer.trained_model().map_err(failed("collecting weights"))?;
            if let Some(model) = model {
                model
                    .export(&ctx.output("model"))
                    .map_err(|e| StageError::failed(e.to_string()))?;
            }
        }
        let instruction_texts: BTreeMap<Task, String> =
            tasks.iter().map(|&t| (t, instruction_text(&examples, t).to_string())).collect();
        write_adapter(
            &trainer,
            &base,
            &base_name(ctx),
            &instruction_texts,
            &ctx.output("adapter"),
        )?;
        let curve = trainer.curve();
        write_jsonl(&ctx.output("curves.jsonl"), curve)?;
        plot_curves(&ctx.output("loss.svg"), curve, params.contrastive_lambda > 0.0)?;
        let summary = Summary {
            method: params.method,
            trainable_parameters: trainer.trainable_parameters(),
            base_parameters,
            trainable_percent: 100.0 * trainer.trainable_parameters() as f64
                / base_parameters as f64,
            optimizer_state_bytes: trainer.optimizer_bytes(),
            selected_heads: trainer.lora().map(|l| l.mask().count()),
            total_heads: base.config().num_hidden_layers * base.config().num_attention_heads,
            examples: sequences.len(),
            examples_too_long: too_long,
            steps: params.steps,
            tokens: curve.iter().map(|p| p.tokens).sum(),
            first_loss: curve.first().map_or(0.0, |p| p.loss),
            final_loss: curve.last().map_or(0.0, |p| p.loss),
        };
        write_json(&ctx.output("train.json"), &summary)
    }
}

fn trainable_fmt(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}k", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

/// `WATCHFIRE_FAIL_AFTER_STEPS=N` makes a train stage fail after step N, as
/// a killed run would: how the resume test interrupts a run.
fn fault_injection() -> Option<usize> {
    std::env::var("WATCHFIRE_FAIL_AFTER_STEPS").ok().and_then(|v| v.parse().ok())
}

fn train_config(params: &TrainParams, layers: usize, seed: u64) -> TrainConfig {
    let targets = params.targets.clone().unwrap_or_else(|| match params.method {
        Method::Lora => vec![Projection::Q, Projection::V],
        _ => Projection::ALL.to_vec(),
    });
    TrainConfig {
        method: params.method,
        rank: params.rank,
        alpha: params.alpha,
        targets,
        prefix: params.prefix,
        prefix_len: params.prefix_len,
        prefix_mlp: params.prefix_mlp,
        contrastive_lambda: params.contrastive_lambda,
        temperature: params.temperature,
        contrastive_layer: params.contrastive_layer.unwrap_or(layers / 2).min(layers),
        steps: params.steps,
        batch: params.batch,
        grad_accum: params.grad_accum,
        lr: params.lr,
        warmup: params.warmup,
        min_lr_ratio: params.min_lr_ratio,
        adamw: AdamWParams { weight_decay: params.weight_decay, ..AdamWParams::default() },
        clip: params.clip,
        seed,
    }
}

fn plot_curves(
    path: &Path,
    curve: &[crate::adapt::train::CurvePoint],
    contrastive: bool,
) -> Result<(), StageError> {
    let mut series = vec![
        Series { name: "loss", points: curve.iter().map(|p| (p.step as f64, p.loss)).collect() },
        Series {
            name: "cross-entropy",
            points: curve.iter().map(|p| (p.step as f64, p.ce)).collect(),
        },
    ];
    if contrastive {
        series.push(Series {
            name: "InfoNCE",
            points: curve
                .iter()
                .filter_map(|p| p.contrastive.map(|c| (p.step as f64, c)))
                .collect(),
        });
    }
    line_chart(path, "Training loss", "step", "loss", &series)
        .map_err(|e| StageError::failed(e.to_string()))
}

/// Loads the `model` input in `dtype` on the CPU.
pub(crate) fn load_model(ctx: &StageContext<'_>, dtype: DType) -> Result<LoadedModel, StageError> {
    load(ctx.input("model")?, dtype, &Device::Cpu)
        .map_err(|err| StageError::failed(err.to_string()))
}

/// A name for the base model: the source a `model` stage fetched, or the
/// input's file name.
pub(crate) fn base_name(ctx: &StageContext<'_>) -> String {
    let Ok(input) = ctx.input("model") else { return String::new() };
    std::fs::read(input.join("source.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<SourceRecord>(&b).ok())
        .map(|s| s.source)
        .unwrap_or_else(|| {
            input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        })
}

/// The examples of input `name`: a file, or `train.jsonl` in a `tasks` artifact.
pub(crate) fn read_examples(
    ctx: &StageContext<'_>,
    name: &str,
    max: usize,
) -> Result<Vec<Example>, StageError> {
    let path: PathBuf = ctx.input_file(name, "train.jsonl")?;
    let mut examples: Vec<Example> = read_jsonl(&path)?;
    if max > 0 {
        examples.truncate(max);
    }
    if examples.is_empty() {
        return Err(StageError::data(&path, None, "has no examples"));
    }
    Ok(examples)
}

/// Tokenizes every example; returns those that fit and how many did not.
pub(crate) fn encode_all(
    base: &LoadedModel,
    examples: &[Example],
    max_len: usize,
) -> Result<(Vec<Sequence>, usize), StageError> {
    let mut out = Vec::with_capacity(examples.len());
    let mut too_long = 0;
    for example in examples {
        match encode(&base.tokenizer, example, max_len)
            .map_err(|e| StageError::failed(format!("tokenizing `{}`: {e}", example.id)))?
        {
            Some(seq) => out.push(seq),
            None => too_long += 1,
        }
    }
    if out.is_empty() {
        return Err(StageError::failed(format!(
            "none of the {} examples fits in max_len {max_len} tokens",
            examples.len()
        )));
    }
    Ok((out, too_long))
}

/// The subtasks present, in canonical order.
fn tasks_of(examples: &[Example]) -> Vec<Task> {
    Task::ALL.into_iter().filter(|t| examples.iter().any(|e| e.task == *t)).collect()
}

/// Each task's instruction as the model sees it at the start of a prompt,
/// tokenized: the text prefixes start from.
fn instructions(
    base: &LoadedModel,
    examples: &[Example],
    tasks: &[Task],
) -> Result<Vec<Vec<u32>>, StageError> {
    tasks
        .iter()
        .map(|task| {
            let text = instruction_text(examples, *task);
            let text = if text.is_empty() { task.name() } else { text };
            let prompt = chat_prompt(text);
            base.tokenizer
                .encode(prompt.as_str(), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| StageError::failed(format!("tokenizing an instruction: {e}")))
        })
        .collect()
}

/// The instruction of `task`'s first example: its prompt up to the report.
fn instruction_text(examples: &[Example], task: Task) -> &str {
    let Some(example) = examples.iter().find(|e| e.task == task) else { return "" };
    let cut = example.prompt.find(crate::adapt::tasks::REPORT_HEADER);
    cut.map_or(example.prompt.as_str(), |at| &example.prompt[..at])
}

/// The `mask` input's `mask.json`.
fn read_mask(ctx: &StageContext<'_>) -> Result<HeadMask, StageError> {
    let path = ctx.input_file("mask", "mask.json")?;
    let text = fs_err::read_to_string(&path)?;
    #[derive(Deserialize)]
    struct MaskFile {
        mask: HeadMask,
    }
    let file: MaskFile =
        serde_json::from_str(&text).map_err(|e| StageError::data(&path, None, e.to_string()))?;
    Ok(file.mask)
}
