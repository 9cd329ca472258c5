//! Argument parsing and one function per subcommand.

mod bench;
mod bench_kernels;
mod bench_model;
mod bench_train;
mod cache;
mod eval;
mod lock;
mod model;
mod render;
mod run;
mod show;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use watchfire::recipe::{LoadOptions, Recipe};

/// Declarative, content-hashed recipes for adapting open LLMs to
/// public-safety text.
#[derive(Parser)]
#[command(name = "watchfire", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Args, Clone)]
pub struct Global {
    /// Cache folder [default: `cache/` in the recipe's project].
    #[arg(long, global = true, env = "WATCHFIRE_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// A folder outside the project that recipes may read (repeatable).
    #[arg(long = "data-root", global = true, value_name = "DIR")]
    pub data_roots: Vec<PathBuf>,
    /// More logs: -v for stage start and end, -vv for cache decisions and keys.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bars and no summary table.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a recipe: build every stage whose key is not cached.
    Run(run::RunArgs),
    /// Say what `run` would do and why, without running anything.
    Plan(run::PlanArgs),
    /// Print the recipe's DAG as DOT or Mermaid.
    Graph(GraphArgs),
    /// Rebuild stages from scratch and compare their outputs with the lock.
    Verify(lock::VerifyArgs),
    /// Show a stage's artifact, manifest and lineage.
    Show(show::ShowArgs),
    /// Inspect and clean the cache.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// List the stage kinds, their inputs, outputs and params.
    Kinds,
    /// Print the JSON schema of recipes.
    Schema,
    /// Measure watchfire's own speed and print the figures.
    Bench(bench::BenchArgs),
    /// Perplexity of text files under a model.
    Score(model::ScoreArgs),
    /// Generate text from a prompt, streaming it to the terminal.
    Generate(model::GenerateArgs),
    /// Write a model as a Hugging Face folder (config, safetensors, tokenizer).
    Export(model::ExportArgs),
    /// Evaluate a model (and adapter) on a data file and print the metrics.
    Eval(eval::EvalArgs),
    /// Metric deltas between two evaluations (stage instances or artifacts).
    Compare(eval::CompareArgs),
}

#[derive(Args)]
pub struct GraphArgs {
    pub recipe: PathBuf,
    #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
    pub format: GraphFormat,
    /// Only these variants.
    #[arg(long = "variant")]
    pub variants: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

pub fn main() -> ExitCode {
    reset_sigpipe();
    let cli = Cli::parse();
    init_tracing(&cli.global);
    miette::set_hook(Box::new(|_| {
        Box::new(miette::MietteHandlerOpts::new().terminal_links(false).width(100).build())
    }))
    .ok();
    let result = match cli.command {
        Command::Run(args) => run::run(&cli.global, args),
        Command::Plan(args) => run::plan(&cli.global, args),
        Command::Graph(args) => graph(&cli.global, args),
        Command::Verify(args) => lock::verify(&cli.global, args),
        Command::Show(args) => show::show(&cli.global, args),
        Command::Cache(command) => cache::cache(&cli.global, command),
        Command::Kinds => kinds(),
        Command::Schema => schema(),
        Command::Bench(args) => bench::bench(&cli.global, args),
        Command::Score(args) => model::score(&cli.global, args),
        Command::Generate(args) => model::generate(&cli.global, args),
        Command::Export(args) => model::export(&cli.global, args),
        Command::Eval(args) => eval::eval(&cli.global, args),
        Command::Compare(args) => eval::compare(&cli.global, args),
    };
    match result {
        Ok(code) => code,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::FAILURE
        }
    }
}

/// Lets `watchfire show | head` end quietly instead of panicking on a
/// closed pipe, as command-line tools on Unix do.
fn reset_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; it only
    // restores the default action of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn init_tracing(global: &Global) {
    let level = match global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WATCHFIRE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("watchfire={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
}

/// Loads a recipe with the global options applied.
pub fn load(global: &Global, path: &Path, variants: &[String]) -> miette::Result<Recipe> {
    let options =
        LoadOptions { data_roots: global.data_roots.clone(), variants: variants.to_vec() };
    watchfire::recipe::load(path, &options)
}

/// The cache folder: `--cache`, else `cache/` in the project of `recipe`
/// (or of the current folder).
pub fn cache_dir(global: &Global, recipe: Option<&Recipe>) -> PathBuf {
    if let Some(dir) = &global.cache {
        return dir.clone();
    }
    match recipe {
        Some(recipe) => recipe.project_root.join("cache"),
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            watchfire::recipe::project_root(&cwd).join("cache")
        }
    }
}

/// `-j N`, or the number of cores.
pub fn jobs(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub fn open_store(dir: &Path) -> miette::Result<watchfire::cache::LocalStore> {
    watchfire::cache::LocalStore::open(dir)
        .map_err(|err| miette::miette!("cannot open the cache at {}: {err}", dir.display()))
}

fn graph(global: &Global, args: GraphArgs) -> miette::Result<ExitCode> {
    let recipe = load(global, &args.recipe, &args.variants)?;
    let text = match args.format {
        GraphFormat::Dot => watchfire::graph::to_dot(&recipe),
        GraphFormat::Mermaid => watchfire::graph::to_mermaid(&recipe),
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn kinds() -> miette::Result<ExitCode> {
    for kind in watchfire::stage::registry() {
        println!("{} (v{})", kind.kind(), kind.version());
        println!("  {}", kind.doc());
        for input in kind.inputs() {
            let required = if input.required { "" } else { " (optional)" };
            println!("  input  {}{required}: {}", input.name, input.doc);
        }
        println!("  writes {}", kind.outputs().join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn schema() -> miette::Result<ExitCode> {
    let schema = watchfire::recipe::json_schema();
    let text = serde_json::to_string_pretty(&schema).map_err(|err| miette::miette!("{err}"))?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}
