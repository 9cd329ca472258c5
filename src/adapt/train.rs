//! The training loop shared by every method: full fine-tuning, standard
//! LoRA, selective (per-head) LoRA, each with or without per-subtask
//! prefixes and the contrastive term.
//!
//! One optimizer step runs `grad_accum` micro-batches of `batch` examples,
//! each `L = CE + lambda * InfoNCE` (see [`super::contrastive`]), sums their
//! gradients, clips the global norm, and applies AdamW at the scheduled
//! learning rate ([`super::optim`]).
//!
//! Data order is a function of the seed and the epoch only, so a run can stop
//! after any step and continue from a [`Checkpoint`]: the variables, the
//! optimizer's moments, the data cursor and the curve so far. A resumed run
//! ends with exactly the bytes an uninterrupted one would.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Result, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::batch::{Sequence, collate};
use super::contrastive::{paired_order, span_infonce};
use super::lora::{HeadMask, Lora, LoraConfig};
use super::optim::{AdamW, AdamWParams, clip_grad_norm, learning_rate};
use super::prefix::Prefixes;
use super::tasks::Task;
use crate::model::llama::{ForwardOptions, Llama, Projection, ProjectionHook};
use crate::model::load::LoadedModel;

/// Which weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every weight of the model.
    Full,
    /// LoRA on every head of the target projections (q and v by default).
    Lora,
    /// LoRA on the heads of a probe's mask (q, k, v and o by default).
    Selective,
    /// No weight: only the prefixes train (needs `prefix: true`).
    None,
}

/// Everything that shapes a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Projection>,
    pub prefix: bool,
    pub prefix_len: usize,
    pub prefix_mlp: usize,
    pub contrastive_lambda: f64,
    pub temperature: f64,
    /// Hidden-state layer whose span means are embedded.
    pub contrastive_layer: usize,
    pub steps: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub adamw: AdamWParams,
    pub clip: f64,
    pub seed: u64,
}

/// One optimizer step's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// 1-based.
    pub step: usize,
    pub lr: f64,
    /// The objective: `ce + lambda * contrastive`.
    pub loss: f64,
    pub ce: f64,
    /// Mean InfoNCE over the micro-batches that had an anchor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrastive: Option<f64>,
    pub anchors: usize,
    pub grad_norm: f64,
    /// Real tokens in the step's batches.
    pub tokens: usize,
}

/// Where the data order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: usize,
}

/// What a checkpoint's `state.json` holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: usize,
    pub cursor: Cursor,
    pub curve: Vec<CurvePoint>,
    /// The config it was written under; a checkpoint of another config is ignored.
    pub config: TrainConfig,
}

/// A model being trained and everything it trains with.
pub struct Trainer<'a> {
    config: TrainConfig,
    model: Llama,
    base: &'a LoadedModel,
    lora: Option<Lora>,
    prefixes: Option<Prefixes>,
    /// For full fine-tuning: every weight, under Hugging Face names.
    weights: Vec<(String, Var)>,
    optimizer: AdamW,
    sequences: Vec<Sequence>,
    tasks: Vec<Task>,
    order: Vec<usize>,
    cursor: Cursor,
    pad: u32,
    dtype: DType,
    curve: Vec<CurvePoint>,
}

impl<'a> Trainer<'a> {
    /// Sets up a run on `base` (whose weights stay untouched). `mask` is
    /// required for [`Method::Selective`]; `instructions` are the tokenized
    /// instructions of `tasks`, for initialising prefixes.
    pub fn new(
        base: &'a LoadedModel,
        config: TrainConfig,
        mask: Option<HeadMask>,
        sequences: Vec<Sequence>,
        tasks: Vec<Task>,
        instructions: &[Vec<u32>],
    ) -> Result<Self> {
        if sequences.is_empty() {
            candle_core::bail!("no training example fits");
        }
        let model_config = base.config().clone();
        let device = base.model.device().clone();
        let dtype = base.model.dtype();
        let mut weights = Vec::new();
        let model = if config.method == Method::Full {
            if dtype != DType::F32 {
                candle_core::bail!("full fine-tuning trains f32 weights; load the model in f32");
            }
            let mut names: Vec<&String> = base.tensors().keys().collect();
            names.sort();
            let mut map = HashMap::new();
            for name in names {
                let var = Var::from_tensor(&base.tensors()[name].to_dtype(DType::F32)?)?;
                map.insert(name.clone(), var.as_tensor().clone());
                weights.push((name.clone(), var));
            }
            Llama::from_tensors(&model_config, map, DType::F32, &device)?
        } else {
            base.model.clone()
        };
        let lora = match config.method {
            Method::Full | Method::None => None,
            Method::Lora | Method::Selective => {
                let mask = match (config.method, mask) {
                    (Method::Selective, Some(mask)) => mask,
                    (Method::Selective, None) => {
                        candle_core::bail!("selective LoRA needs a head mask")
                    }
                    _ => HeadMask::all(
                        model_config.num_hidden_layers,
                        model_config.num_attention_heads,
                    ),
                };
                let lora_config = LoraConfig {
                    rank: config.rank,
                    alpha: config.alpha,
                    targets: config.targets.clone(),
                };
                Some(Lora::new(&model_config, lora_config, mask, config.seed, DType::F32, &device)?)
            }
        };
        let prefixes = if config.prefix {
            Some(Prefixes::new(
                &model,
                &tasks,
                instructions,
                config.prefix_len,
                config.prefix_mlp,
                config.seed ^ 0x5052_4546,
            )?)
        } else {
            None
        };
        let mut vars = weights.clone();
        if let Some(lora) = &lora {
            vars.extend(lora.vars());
        }
        if let Some(prefixes) = &prefixes {
            vars.extend(prefixes.vars());
        }
        if vars.is_empty() {
            candle_core::bail!("nothing to train: method `none` needs `prefix: true`");
        }
        let optimizer = AdamW::new(vars, config.adamw)?;
        let pad = base.eos_ids.first().copied().unwrap_or(0);
        let order = paired_order(&sequences, epoch_seed(config.seed, 0));
        Ok(Self {
            config,
            model,
            base,
            lora,
            prefixes,
            weights,
            optimizer,
            sequences,
            tasks,
            order,
            cursor: Cursor { epoch: 0, position: 0 },
            pad,
            dtype,
            curve: Vec::new(),
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn step_count(&self) -> usize {
        self.optimizer.step_count()
    }

    pub fn curve(&self) -> &[CurvePoint] {
        &self.curve
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    pub fn prefixes(&self) -> Option<&Prefixes> {
        self.prefixes.as_ref()
    }

    /// Parameters the optimizer updates.
    pub fn trainable_parameters(&self) -> usize {
        self.optimizer.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Bytes of the optimizer's moments.
    pub fn optimizer_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    /// The model with its trained weights (full fine-tuning) as a loadable
    /// model with the base's tokenizer; `None` for adapter methods.
    pub fn trained_model(&self) -> Result<Option<LoadedModel>> {
        if self.weights.is_empty() {
            return Ok(None);
        }
        let tensors: HashMap<String, Tensor> =
            self.weights.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        LoadedModel::from_parts(
            self.base.config(),
            tensors,
            self.base.tokenizer.clone(),
            self.base.chat_template.clone(),
            DType::F32,
            self.base.model.device(),
        )
        .map(Some)
        .map_err(candle_core::Error::wrap)
    }

    fn next_rows(&mut self, n: usize) -> Vec<usize> {
        let mut rows = Vec::with_capacity(n);
        while rows.len() < n {
            if self.cursor.position == self.order.len() {
                self.cursor = Cursor { epoch: self.cursor.epoch + 1, position: 0 };
                self.order =
                    paired_order(&self.sequences, epoch_seed(self.config.seed, self.cursor.epoch));
            }
            rows.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
        }
        rows
    }

    /// One optimizer step; returns its figures (also kept in the curve).
    pub fn step(&mut self) -> Result<CurvePoint> {
        let config = self.config.clone();
        let vars: Vec<Var> = self.optimizer.vars().iter().map(|(_, v)| v.clone()).collect();
        let mut summed: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut ce_sum, mut con_sum, mut con_batches, mut anchors, mut tokens) =
            (0.0, 0.0, 0usize, 0usize, 0usize);
        let hidden_layers = if config.contrastive_lambda > 0.0 {
            vec![config.contrastive_layer]
        } else {
            Vec::new()
        };
        for _ in 0..config.grad_accum {
            let rows = self.next_rows(config.batch);
            let seqs: Vec<&Sequence> = rows.iter().map(|&i| &self.sequences[i]).collect();
            let tasks = &self.tasks;
            let batch = collate(
                &seqs,
                self.pad,
                |t| tasks.iter().position(|&x| x == t).unwrap_or(0) as u32,
                self.model.device(),
            )?;
            tokens += batch.tokens;
            let prefix = match &self.prefixes {
                Some(p) => Some(p.for_batch(&batch.task_of_row, self.dtype)?),
                None => None,
            };
            let opts = ForwardOptions {
                attention_mask: Some(&batch.attention),
                hook: self.lora.as_ref().map(|l| l as &dyn ProjectionHook),
                prefix: prefix.as_ref(),
                hidden_layers: &hidden_layers,
                ..ForwardOptions::default()
            };
            // The summed loss straight from the last hidden states: with a
            // frozen vocabulary projection no `[rows, vocab]` logits are kept.
            let (nll, hidden) = self.model.nll(&batch.ids, &opts, &batch.labels, &batch.scored)?;
            let ce = (nll / batch.scored_count.max(1) as f64)?;
            ce_sum += f64::from(ce.to_scalar::<f32>()?);
            let mut loss = ce;
            if let Some(hidden) = hidden.get(&config.contrastive_layer)
                && let Some((con, n)) = span_infonce(hidden, &batch, config.temperature)?
            {
                con_sum += f64::from(con.to_scalar::<f32>()?);
                con_batches += 1;
                anchors += n;
                loss = (loss + (con * config.contrastive_lambda)?)?;
            }
            let loss = (loss / config.grad_accum as f64)?;
            let grads = loss.backward()?;
            for (slot, var) in summed.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = g.to_dtype(DType::F32)?;
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g,
                    });
                }
            }
        }
        let mut grads = summed
            .into_iter()
            .zip(&vars)
            .map(|(g, var)| match g {
                Some(g) => Ok(g),
                None => var.zeros_like()?.to_dtype(DType::F32),
            })
            .collect::<Result<Vec<_>>>()?;
        let grad_norm = clip_grad_norm(&mut grads, config.clip)?;
        let step = self.optimizer.step_count();
        let lr = learning_rate(step, config.steps, config.warmup, config.lr, config.min_lr_ratio);
        self.optimizer.step(&grads, lr)?;
        let ce = ce_sum / config.grad_accum as f64;
        let contrastive = (con_batches > 0).then(|| con_sum / con_batches as f64);
        let point = CurvePoint {
            step: step + 1,
            lr,
            loss: ce + config.contrastive_lambda * contrastive.unwrap_or(0.0),
            ce,
            contrastive,
            anchors,
            grad_norm,
            tokens,
        };
        self.curve.push(point.clone());
        Ok(point)
    }

    /// Writes a checkpoint into `dir` (replacing the previous one atomically:
    /// the tensors and the state are written beside it and renamed over).
    pub fn save_checkpoint(&self, dir: &Path) -> std::io::Result<()> {
        fs_err::create_dir_all(dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in self.optimizer.vars() {
            tensors.insert(format!("var.{name}"), var.as_tensor().detach());
        }
        tensors.extend(self.optimizer.state());
        let tmp = dir.join("tensors.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp).map_err(std::io::Error::other)?;
        let state = Checkpoint {
            step: self.step_count(),
            cursor: self.cursor,
            curve: self.curve.clone(),
            config: self.config.clone(),
        };
        let json = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
        // The state names the step its tensors belong to: write the tensors
        // first, then the state, each by rename, and check both on resume.
        fs_err::rename(&tmp, dir.join(format!("tensors-{}.safetensors", state.step)))?;
        crate::cache::write_atomic(&dir.join("state.json"), &json)?;
        for entry in fs_err::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("tensors-") && name != format!("tensors-{}.safetensors", state.step)
            {
                let _ = fs_err::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Restores the newest checkpoint in `dir` if there is one written under
    /// the same config; returns the step it resumes from.
    pub fn resume(&mut self, dir: &Path) -> Result<Option<usize>> {
        let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
            return Ok(None);
        };
        let Ok(state) = serde_json::from_slice::<Checkpoint>(&bytes) else {
            return Ok(None);
        };
        let file = dir.join(format!("tensors-{}.safetensors", state.step));
        if state.config != self.config || !file.exists() {
            return Ok(None);
        }
        let device = self.model.device().clone();
        let tensors: BTreeMap<String, Tensor> =
            candle_core::safetensors::load(&file, &device)?.into_iter().collect();
        for (name, var) in self.optimizer.vars() {
            let saved = tensors
                .get(&format!("var.{name}"))
                .ok_or_else(|| candle_core::Error::msg(format!("checkpoint lacks `{name}`")))?;
            var.set(saved)?;
        }
        self.optimizer.load_state(&tensors, state.step)?;
        self.cursor = state.cursor;
        self.order =
            paired_order(&self.sequences, epoch_seed(self.config.seed, state.cursor.epoch));
        self.curve = state.curve;
        Ok(Some(state.step))
    }
}

fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::batch::encode;
    use crate::adapt::tasks::{Example, PromptSpan};
    use crate::adapt::testkit::tiny_loaded;
    use crate::schema::EntityRole;

    fn examples() -> Vec<Example> {
        let places = ["Elm St", "Oak Ave", "Pine Rd"];
        let mut out = Vec::new();
        for i in 0..12 {
            let place = places[i % 3];
            let text = format!("Fire at {place}.");
            let prompt = format!("Where?\n\nReport:\n{text}");
            let start = prompt.find(place).unwrap();
            let task = if i % 2 == 0 { Task::Entities } else { Task::Alert };
            out.push(Example {
                id: format!("r{i}:{}", task.name()),
                task,
                source_id: format!("r{i}"),
                template_id: None,
                prompt,
                target: format!("location: {place}"),
                key_facts: vec![],
                spans: vec![PromptSpan {
                    kind: "location".into(),
                    role: EntityRole::Key,
                    value: place.into(),
                    start,
                    end: start + place.chars().count(),
                }],
            });
        }
        out
    }

    fn config(method: Method) -> TrainConfig {
        TrainConfig {
            method,
            rank: 2,
            alpha: 4.0,
            targets: Projection::ALL.to_vec(),
            prefix: true,
            prefix_len: 2,
            prefix_mlp: 0,
            contrastive_lambda: 0.5,
            temperature: 0.1,
            contrastive_layer: 1,
            steps: 6,
            batch: 4,
            grad_accum: 2,
            lr: 1e-2,
            warmup: 2,
            min_lr_ratio: 0.1,
            adamw: AdamWParams::default(),
            clip: 1.0,
            seed: 11,
        }
    }

    fn trainer(base: &LoadedModel, method: Method) -> Trainer<'_> {
        let seqs: Vec<Sequence> =
            examples().iter().filter_map(|e| encode(&base.tokenizer, e, 256).unwrap()).collect();
        let instructions = vec![b"Where?".iter().map(|&b| u32::from(b)).collect(); 2];
        let mask = HeadMask::from_heads(2, 4, &[(0, 1), (1, 3)]);
        Trainer::new(
            base,
            config(method),
            Some(mask),
            seqs,
            vec![Task::Entities, Task::Alert],
            &instructions,
        )
        .unwrap()
    }

    fn snapshot(t: &Trainer) -> Vec<Vec<f32>> {
        t.optimizer
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    #[test]
    fn training_lowers_the_loss_for_every_method() {
        let base = tiny_loaded(5, DType::F32);
        for method in [Method::Full, Method::Lora, Method::Selective, Method::None] {
            let mut t = trainer(&base, method);
            let mut cfg = t.config.clone();
            cfg.steps = 30;
            // Prefixes alone move the loss less per step than weights do.
            if method == Method::None {
                cfg.lr = 0.1;
            }
            t.config = cfg;
            let first = t.step().unwrap().ce;
            let mut last = first;
            for _ in 1..30 {
                last = t.step().unwrap().ce;
            }
            assert!(last < first * 0.8, "{method:?}: {first} -> {last}");
            assert!(t.curve().iter().any(|p| p.contrastive.is_some()), "{method:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_resuming_changes_nothing() {
        let base = tiny_loaded(5, DType::F32);
        let mut straight = trainer(&base, Method::Selective);
        for _ in 0..6 {
            straight.step().unwrap();
        }
        let mut again = trainer(&base, Method::Selective);
        for _ in 0..6 {
            again.step().unwrap();
        }
        assert_eq!(snapshot(&straight), snapshot(&again));

        let dir = tempfile::tempdir().unwrap();
        let mut first = trainer(&base, Method::Selective);
        for _ in 0..4 {
            first.step().unwrap();
        }
        first.save_checkpoint(dir.path()).unwrap();
        drop(first);
        let mut resumed = trainer(&base, Method::Selective);
        assert_eq!(resumed.resume(dir.path()).unwrap(), Some(4));
        for _ in 4..6 {
            resumed.step().unwrap();
        }
        assert_eq!(snapshot(&straight), snapshot(&resumed));
        assert_eq!(straight.curve(), resumed.curve());
    }

    #[test]
    fn selective_trains_fewer_parameters_than_standard_lora() {
        let base = tiny_loaded(5, DType::F32);
        let selective = trainer(&base, Method::Selective);
        let standard = trainer(&base, Method::Lora);
        let full = trainer(&base, Method::Full);
        assert!(selective.trainable_parameters() < standard.trainable_parameters());
        assert!(standard.trainable_parameters() < full.trainable_parameters());
        assert!(selective.optimizer_bytes() < standard.optimizer_bytes());
    }
}
