//! One learnable key/value prefix per subtask (prefix tuning).
//!
//! Each subtask owns `P` virtual tokens: at every layer, `P` keys and `P`
//! values per key/value head that every real token can attend to (see
//! [`KvPrefix`]; the tokens' positions start after them). An example uses the
//! prefix of its own subtask, so one batch can mix subtasks.
//!
//! **Initialisation.** Random keys attend nowhere useful, so each prefix
//! starts as the keys and values the frozen model itself computes for the
//! first `P` tokens of the subtask's instruction (repeated if it is
//! shorter), the "real words" initialisation of Li and Liang.
//!
//! **Reparameterisation.** With `mlp_hidden > 0` the prefix is trained as
//! `kv = init + W2 tanh(W1 e)`: a small embedding `e` per virtual token and
//! a two-layer MLP, with `W2` starting at zero so training starts from the
//! initial prefix. This smooths early training; after training only the
//! resulting `kv` is kept ([`Prefixes::materialise`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::tasks::Task;
use crate::model::llama::{ForwardOptions, KvCache, KvPrefix, Llama};

/// Width of the reparameterisation embedding.
const EMBED: usize = 64;

enum Form {
    /// `[tasks, layers, 2, kv_heads, P, head_dim]`, trained as is.
    Direct(Var),
    Mlp {
        init: Tensor,
        embed: Var,
        w1: Var,
        w2: Var,
    },
}

/// The prefixes of a set of subtasks.
pub struct Prefixes {
    tasks: Vec<Task>,
    len: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    form: Form,
}

impl Prefixes {
    /// Prefixes of `len` tokens for `tasks`, each initialised from the
    /// model's keys and values for the first tokens of `instructions[i]`.
    pub fn new(
        model: &Llama,
        tasks: &[Task],
        instructions: &[Vec<u32>],
        len: usize,
        mlp_hidden: usize,
        seed: u64,
    ) -> Result<Self> {
        let config = model.config();
        let (layers, kv_heads, head_dim) =
            (config.num_hidden_layers, config.num_kv_heads(), config.head_dim());
        let mut per_task = Vec::with_capacity(tasks.len());
        for ids in instructions {
            if ids.is_empty() {
                candle_core::bail!("an instruction without tokens cannot initialise a prefix");
            }
            let ids: Vec<u32> = ids.iter().copied().cycle().take(len).collect();
            let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
            let mut cache = KvCache::new();
            model.forward_cached(&input, &ForwardOptions::default(), &mut cache)?;
            let mut per_layer = Vec::with_capacity(layers);
            for layer in 0..layers {
                let (k, v) = cache.layer(layer).expect("every layer was run");
                per_layer.push(Tensor::stack(&[k.i(0)?, v.i(0)?], 0)?);
            }
            per_task.push(Tensor::stack(&per_layer, 0)?);
        }
        let init = Tensor::stack(&per_task, 0)?.to_dtype(DType::F32)?.detach();
        let form = if mlp_hidden == 0 {
            Form::Direct(Var::from_tensor(&init)?)
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let device = model.device();
            let mut uniform = |rows: usize, cols: usize, bound: f64| {
                let data: Vec<f32> =
                    (0..rows * cols).map(|_| rng.random_range(-bound..bound) as f32).collect();
                Tensor::from_vec(data, (rows, cols), device)
            };
            let out = layers * 2 * kv_heads * head_dim;
            let embed = uniform(tasks.len() * len, EMBED, 1.0)?;
            let w1 = uniform(mlp_hidden, EMBED, 1.0 / (EMBED as f64).sqrt())?;
            let w2 = Tensor::zeros((out, mlp_hidden), DType::F32, device)?;
            Form::Mlp {
                init,
                embed: Var::from_tensor(&embed)?,
                w1: Var::from_tensor(&w1)?,
                w2: Var::from_tensor(&w2)?,
            }
        };
        Ok(Self { tasks: tasks.to_vec(), len, layers, kv_heads, head_dim, form })
    }

    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The variables to optimise.
    pub fn vars(&self) -> Vec<(String, Var)> {
        match &self.form {
            Form::Direct(kv) => vec![("prefix.kv".into(), kv.clone())],
            Form::Mlp { embed, w1, w2, .. } => vec![
                ("prefix.embed".into(), embed.clone()),
                ("prefix.w1".into(), w1.clone()),
                ("prefix.w2".into(), w2.clone()),
            ],
        }
    }

    /// Parameters that can change while training.
    pub fn trainable_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Parameters a trained prefix keeps: `tasks x layers x 2 x kv_heads x P x head_dim`.
    pub fn stored_parameters(&self) -> usize {
        self.tasks.len() * self.layers * 2 * self.kv_heads * self.len * self.head_dim
    }

    /// `[tasks, layers, 2, kv_heads, P, head_dim]`, f32, differentiable.
    fn all(&self) -> Result<Tensor> {
        match &self.form {
            Form::Direct(kv) => Ok(kv.as_tensor().clone()),
            Form::Mlp { init, embed, w1, w2 } => {
                let hidden = embed.as_tensor().matmul(&w1.as_tensor().t()?)?.tanh()?;
                let delta = hidden.matmul(&w2.as_tensor().t()?)?;
                // [tasks * P, layers * 2 * kv * hd] -> [tasks, P, layers, 2, kv, hd]
                let delta = delta.reshape((
                    self.tasks.len(),
                    self.len,
                    self.layers,
                    2,
                    self.kv_heads,
                    self.head_dim,
                ))?;
                let delta = delta.permute((0, 2, 3, 4, 1, 5))?;
                init + delta
            }
        }
    }

    /// The prefix of each row's subtask (`task_of_row[b]` indexes
    /// [`Prefixes::tasks`]), cast to `dtype`.
    pub fn for_batch(&self, task_of_row: &[u32], dtype: DType) -> Result<KvPrefix> {
        let all = self.all()?;
        let index = Tensor::new(task_of_row, all.device())?;
        let rows = all.index_select(&index, 0)?.to_dtype(dtype)?;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for layer in 0..self.layers {
            keys.push(rows.i((.., layer, 0))?.contiguous()?);
            values.push(rows.i((.., layer, 1))?.contiguous()?);
        }
        KvPrefix::new(keys, values)
    }

    /// Per subtask, the trained keys and values `[layers, 2, kv_heads, P,
    /// head_dim]`, detached: the form an export writes.
    pub fn materialise(&self) -> Result<BTreeMap<Task, Tensor>> {
        let all = self.all()?.detach();
        let mut out = BTreeMap::new();
        for (i, task) in self.tasks.iter().enumerate() {
            out.insert(*task, all.i(i)?.contiguous()?);
        }
        Ok(out)
    }
}

/// A trained prefix read back from an export, for one subtask.
pub fn prefix_from_tensor(kv: &Tensor, dtype: DType, device: &Device) -> Result<KvPrefix> {
    let kv = kv.to_dtype(dtype)?.to_device(device)?;
    let layers = kv.dim(0)?;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for layer in 0..layers {
        keys.push(kv.i((layer, 0))?.unsqueeze(0)?.contiguous()?);
        values.push(kv.i((layer, 1))?.unsqueeze(0)?.contiguous()?);
    }
    KvPrefix::new(keys, values)
}
