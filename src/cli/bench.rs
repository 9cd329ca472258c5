//! `watchfire bench`: figures for the runner's own speed, printed, never
//! asserted. Each figure runs the real binary or the real library code.
//!
//! - no-op re-run: `watchfire run` of a fully cached recipe, wall time of the
//!   whole process, integrity checks included (every output file is
//!   checked by size and time, every input file by its memoised hash).
//! - plan of a generated 1,000-stage recipe, cold and fully cached.
//! - template generation: records per second on one core.
//!
//! `watchfire bench model` measures the model instead; see [`super::bench_model`].
//! `watchfire bench kernels` checks and times the CUDA kernels; see
//! [`super::bench_kernels`].

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Args;
use watchfire::cache::{Lookup, Store};
use watchfire::corpus::read_records;
use watchfire::synth::detail::{DetailConfig, Generator};
use watchfire::synth::scene::build_templates;
use watchfire::synth::template::Mode;

use super::render::duration;
use super::{Global, load, open_store};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// The recipe whose no-op re-run is timed.
    #[arg(long, default_value = "recipes/synthetic.yaml")]
    pub recipe: PathBuf,
    /// Timed repetitions of each command.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Stages in the generated recipe for the plan figure.
    #[arg(long, default_value_t = 1000)]
    pub stages: usize,
    /// Records for the generation figure.
    #[arg(long, default_value_t = 200_000)]
    pub records: usize,
}

#[derive(clap::Subcommand)]
pub enum BenchWhat {
    /// Our model against mistralrs on the same weights: load time, forward
    /// and decode tokens/s, peak memory.
    Model(super::bench_model::BenchModelArgs),
    /// Training tokens/s, trainable parameters, optimizer state and peak
    /// memory of selective LoRA, standard LoRA and full fine-tuning.
    Train(super::bench_train::BenchTrainArgs),
    /// The fused per-head LoRA kernels (`--device cuda`): correctness against
    /// the CPU reference, then time, GB/s and GFLOP/s against the unfused
    /// candle composition.
    Kernels(super::bench_kernels::BenchKernelsArgs),
}

pub fn bench(global: &Global, args: BenchArgs) -> miette::Result<ExitCode> {
    match args.what {
        Some(BenchWhat::Model(model)) => return super::bench_model::bench_model(global, model),
        Some(BenchWhat::Train(train)) => return super::bench_train::bench_train(global, train),
        Some(BenchWhat::Kernels(kernels)) => return super::bench_kernels::bench_kernels(kernels),
        None => {}
    }
    let exe = std::env::current_exe().map_err(|err| miette::miette!("{err}"))?;
    let scratch = tempfile::tempdir().map_err(|err| miette::miette!("{err}"))?;
    println!("watchfire {} bench ({} runs each)", env!("CARGO_PKG_VERSION"), args.runs);

    let cache = scratch.path().join("cache");
    let recipe = args.recipe.to_string_lossy().to_string();
    let cache_arg = cache.to_string_lossy().to_string();
    let run_args = ["run", recipe.as_str(), "--cache", cache_arg.as_str(), "--no-lock", "-q"];
    let cold = time(&exe, &run_args, Path::new("."), 1)?;
    println!("{:<44} {}", format!("cold run of {recipe}"), duration(cold.median));
    let noop = time(&exe, &run_args, Path::new("."), args.runs)?;
    println!("{:<44} {}", format!("no-op re-run of {recipe}"), noop.show());

    let project = scratch.path().join("many");
    let seed = load(global, &args.recipe, &[])?.project_root.join("recipes/data/seed.jsonl");
    write_many_stages(&project, &seed, args.stages)?;
    let many = project.join("recipes/many.yaml").to_string_lossy().to_string();
    let plan = time(&exe, &["plan", many.as_str()], &project, args.runs)?;
    println!("{:<44} {}", format!("plan, {} stages, nothing cached", args.stages), plan.show());
    let start = Instant::now();
    let built = Command::new(&exe)
        .args(["run", many.as_str(), "-q", "--no-lock"])
        .current_dir(&project)
        .status()
        .map_err(|err| miette::miette!("{err}"))?;
    if !built.success() {
        return Err(miette::miette!("the generated {}-stage recipe failed", args.stages));
    }
    println!("{:<44} {}", format!("cold run, {} stages", args.stages), duration(start.elapsed()));
    let plan = time(&exe, &["plan", many.as_str()], &project, args.runs)?;
    println!("{:<44} {}", format!("plan, {} stages, all cached", args.stages), plan.show());

    let rate = generation_rate(global, &args.recipe, &cache, args.records)?;
    println!("{:<44} {rate:.0} records/s", "template generation, one core");
    Ok(ExitCode::SUCCESS)
}

struct Timing {
    median: Duration,
    min: Duration,
    max: Duration,
}

impl Timing {
    fn show(&self) -> String {
        format!(
            "median {}, min {}, max {}",
            precise(self.median),
            precise(self.min),
            precise(self.max)
        )
    }
}

fn precise(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Wall time of `exe args` in `dir`, over `runs` runs.
fn time(exe: &Path, args: &[&str], dir: &Path, runs: usize) -> miette::Result<Timing> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = Command::new(exe)
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|err| miette::miette!("{err}"))?;
        samples.push(start.elapsed());
        if !out.status.success() {
            return Err(miette::miette!(
                "`watchfire {}` failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    samples.sort();
    Ok(Timing {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    })
}

/// A project with a recipe of `stages` stages: chains of seed -> scene ->
/// detail -> filter, each chain with its own params so every key differs.
fn write_many_stages(project: &Path, seed: &Path, stages: usize) -> miette::Result<()> {
    let io = |err: std::io::Error| miette::miette!("{err}");
    std::fs::create_dir_all(project.join("recipes/data")).map_err(io)?;
    std::fs::write(project.join("watchfire.toml"), "").map_err(io)?;
    std::fs::copy(seed, project.join("recipes/data/seed.jsonl"))
        .map_err(|err| miette::miette!("{}: {err}", seed.display()))?;
    let mut text = String::from("name: many\nseed: 1\nstages:\n");
    let total = stages;
    for chain in 0..total.div_ceil(4) {
        let limit = 20 + chain % 100;
        let chains = [
            format!(
                "  seed{chain}:\n    kind: seed\n    params: {{limit: {limit}}}\n    inputs: {{data: data/seed.jsonl}}\n"
            ),
            format!(
                "  scene{chain}:\n    kind: scene\n    params: {{templates_per_scene: {}}}\n    inputs: {{seed: seed{chain}}}\n",
                2 + chain / 100
            ),
            format!(
                "  detail{chain}:\n    kind: detail\n    params: {{count: 20}}\n    inputs: {{templates: scene{chain}, seed: seed{chain}.records}}\n"
            ),
            format!(
                "  filter{chain}:\n    kind: filter\n    inputs: {{records: detail{chain}, seed: seed{chain}.records}}\n"
            ),
        ];
        let left = total - chain * 4;
        for stage in chains.iter().take(left) {
            text.push_str(stage);
        }
    }
    std::fs::write(project.join("recipes/many.yaml"), text).map_err(io)
}

/// Records per second of the `detail` generator on the recipe's own seed
/// and scene artifacts (built by the cold run above).
fn generation_rate(
    global: &Global,
    recipe: &Path,
    cache: &Path,
    records: usize,
) -> miette::Result<f64> {
    let recipe = load(global, recipe, &[])?;
    let store = open_store(cache)?;
    let entries = watchfire::plan::plan(&recipe, &store).map_err(|err| miette::miette!("{err}"))?;
    let seed_entry = entries
        .iter()
        .find(|e| e.kind == "seed")
        .and_then(|e| e.key)
        .ok_or_else(|| miette::miette!("the recipe has no cached `seed` stage"))?;
    let Lookup::Hit(artifact) =
        store.lookup(&seed_entry).map_err(|err| miette::miette!("{err}"))?
    else {
        return Err(miette::miette!("the `seed` artifact is missing"));
    };
    let seed = read_records(&artifact.dir.join("records.jsonl"))
        .map_err(|err| miette::miette!("{err}"))?;
    let (templates, _) = build_templates(&seed, Mode::Hierarchical, 40, 1);
    let generator = Generator::new(templates, &seed, DetailConfig::default(), 1)
        .map_err(|err| miette::miette!("{err}"))?;
    let start = Instant::now();
    let made = generator.generate(7, records);
    Ok(made.len() as f64 / start.elapsed().as_secs_f64())
}
