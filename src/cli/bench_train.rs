//! `watchfire bench train`: training throughput and memory of each method
//! on the same model, batch and sequence length, in the same run.
//!
//! Each method runs in a child process of its own (this binary, re-invoked
//! with `--method`), so its peak resident memory is its own. A child loads
//! the model, builds `batch` rows of `seq` tokens (every position scored, as
//! a language-model loss), runs one untimed warm-up step and `steps` timed
//! AdamW steps, and prints one JSON line; the parent prints the table and
//! the ratios against standard LoRA.

use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use miette::{IntoDiagnostic, miette};
use serde::{Deserialize, Serialize};
use watchfire::adapt::batch::Sequence;
use watchfire::adapt::lora::HeadMask;
use watchfire::adapt::optim::AdamWParams;
use watchfire::adapt::probe::MaskRule;
use watchfire::adapt::tasks::Task;
use watchfire::adapt::train::{Method, TrainConfig, Trainer};
use watchfire::model::llama::Projection;
use watchfire::model::load::{load, resolve};

use super::bench_model::{SMOLLM2, peak_rss_mib};
use super::{Global, cache_dir};

#[derive(Args, Clone)]
pub struct BenchTrainArgs {
    /// The model (a source string or a path), as for `watchfire generate`.
    #[arg(long, default_value = SMOLLM2)]
    pub model: String,
    /// Rows per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Timed steps per method (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Share of heads selective LoRA adapts (the best-scoring heads of a
    /// probe; here the first heads of each layer, which costs the same).
    #[arg(long, default_value_t = 0.2)]
    pub head_share: f64,
    /// Measure one method in this process and print its JSON line.
    #[arg(long, value_enum, hide = true)]
    pub method: Option<BenchMethod>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMethod {
    /// LoRA on q, k, v and o of the selected heads.
    Selective,
    /// LoRA on q and v of every head (PEFT's common default).
    Lora,
    /// Every weight.
    Full,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TrainFigures {
    pub method: BenchMethod,
    pub trainable: usize,
    pub base_parameters: usize,
    pub optimizer_bytes: usize,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub peak_rss_mib: f64,
}

pub fn bench_train(global: &Global, args: BenchTrainArgs) -> miette::Result<ExitCode> {
    let models = cache_dir(global, None).join("models");
    let path = resolve(&args.model, &models).map_err(|err| miette!("--model: {err}"))?;
    if let Some(method) = args.method {
        let figures = measure(&path, &args, method)?;
        println!("{}", serde_json::to_string(&figures).into_diagnostic()?);
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().into_diagnostic()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model {}; batch {} x {} tokens, AdamW, f32; rank {}; {} timed steps; {threads} threads",
        args.model, args.batch, args.seq, args.rank, args.steps
    );
    let mut rows = Vec::new();
    for method in [BenchMethod::Selective, BenchMethod::Lora, BenchMethod::Full] {
        let output = Command::new(&exe)
            .args(["bench", "train", "--model"])
            .arg(&path)
            .args(["--batch", &args.batch.to_string(), "--seq", &args.seq.to_string()])
            .args(["--steps", &args.steps.to_string(), "--rank", &args.rank.to_string()])
            .args(["--head-share", &args.head_share.to_string()])
            .args(["--method", method.to_possible_value().expect("not skipped").get_name()])
            .output()
            .into_diagnostic()?;
        if !output.status.success() {
            println!("{method:?}: failed\n{}", String::from_utf8_lossy(&output.stderr).trim_end());
            continue;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let figures: TrainFigures = serde_json::from_str(line)
            .map_err(|err| miette!("{method:?} printed {line:?}: {err}"))?;
        rows.push(figures);
    }
    println!(
        "{:<10} {:>12} {:>9} {:>14} {:>10} {:>8} {:>10}",
        "method", "trainable", "share %", "optimizer MiB", "tokens/s", "step s", "peak MiB"
    );
    for r in &rows {
        println!(
            "{:<10} {:>12} {:>9.3} {:>14.1} {:>10.1} {:>8.2} {:>10.0}",
            format!("{:?}", r.method).to_lowercase(),
            r.trainable,
            100.0 * r.trainable as f64 / r.base_parameters as f64,
            r.optimizer_bytes as f64 / (1 << 20) as f64,
            r.tokens_per_s,
            r.step_s,
            r.peak_rss_mib
        );
    }
    let find = |m: BenchMethod| rows.iter().find(|r| r.method == m);
    if let (Some(sel), Some(lora)) = (find(BenchMethod::Selective), find(BenchMethod::Lora)) {
        println!(
            "selective / standard LoRA: tokens/s {:.2}x, peak memory {:.2}x, trainable {:.2}x, \
             optimizer state {:.2}x",
            sel.tokens_per_s / lora.tokens_per_s,
            sel.peak_rss_mib / lora.peak_rss_mib,
            sel.trainable as f64 / lora.trainable as f64,
            sel.optimizer_bytes as f64 / lora.optimizer_bytes as f64
        );
    }
    if let (Some(sel), Some(full)) = (find(BenchMethod::Selective), find(BenchMethod::Full)) {
        println!(
            "selective / full: tokens/s {:.2}x, peak memory {:.2}x, optimizer state {:.4}x",
            sel.tokens_per_s / full.tokens_per_s,
            sel.peak_rss_mib / full.peak_rss_mib,
            sel.optimizer_bytes as f64 / full.optimizer_bytes as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(
    path: &std::path::Path,
    args: &BenchTrainArgs,
    method: BenchMethod,
) -> miette::Result<TrainFigures> {
    let base = load(path, DType::F32, &Device::Cpu).map_err(|err| miette!("{err}"))?;
    let config = base.config().clone();
    let vocab = config.vocab_size;
    let sequences: Vec<Sequence> = (0..args.batch * (args.steps + 1))
        .map(|row| Sequence {
            ids: (0..args.seq)
                .map(|i| (1000 + (i * 31 + row * 17) % (vocab - 2000)) as u32)
                .collect(),
            target_start: 1,
            task: Task::Entities,
            spans: Vec::new(),
            source_id: format!("row{row}"),
        })
        .collect();
    // Selective: the first heads of each layer, as many as the share asks.
    let per_layer = ((config.num_attention_heads as f64 * args.head_share).round() as usize).max(1);
    let mask = MaskRule::TopKPerLayer { k: per_layer }.select(
        &(0..config.num_hidden_layers)
            .map(|_| (0..config.num_attention_heads).map(|h| -(h as f64)).collect())
            .collect::<Vec<Vec<f64>>>(),
    );
    let (train_method, targets, mask): (Method, Vec<Projection>, Option<HeadMask>) = match method {
        BenchMethod::Selective => (Method::Selective, Projection::ALL.to_vec(), Some(mask)),
        BenchMethod::Lora => (Method::Lora, vec![Projection::Q, Projection::V], None),
        BenchMethod::Full => (Method::Full, Vec::new(), None),
    };
    let train_config = TrainConfig {
        method: train_method,
        rank: args.rank,
        alpha: 2.0 * args.rank as f64,
        targets,
        prefix: false,
        prefix_len: 0,
        prefix_mlp: 0,
        contrastive_lambda: 0.0,
        temperature: 0.1,
        contrastive_layer: 0,
        steps: args.steps + 1,
        batch: args.batch,
        grad_accum: 1,
        lr: 1e-4,
        warmup: 0,
        min_lr_ratio: 1.0,
        adamw: AdamWParams::default(),
        clip: 1.0,
        seed: 1,
    };
    let mut trainer = Trainer::new(&base, train_config, mask, sequences, vec![Task::Entities], &[])
        .map_err(|err| miette!("{err}"))?;
    trainer.step().map_err(|err| miette!("{err}"))?;
    let start = Instant::now();
    let mut tokens = 0;
    for _ in 0..args.steps {
        tokens += trainer.step().map_err(|err| miette!("{err}"))?.tokens;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainFigures {
        method,
        trainable: trainer.trainable_parameters(),
        base_parameters: base.tensors().values().map(|t| t.elem_count()).sum(),
        optimizer_bytes: trainer.optimizer_bytes(),
        tokens_per_s: tokens as f64 / seconds,
        step_s: seconds / args.steps as f64,
        peak_rss_mib: peak_rss_mib(),
    })
}
