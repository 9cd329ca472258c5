//! `watchfire run` and `watchfire plan`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use watchfire::executor::LocalExecutor;
use watchfire::lock::LockFile;
use watchfire::plan::{Decision, plan as plan_recipe};
use watchfire::recipe::Recipe;
use watchfire::scheduler::{KeyPolicy, RunOptions, RunReport, Status};

use super::render::{CliObserver, CliReporter, Table, duration, status_word};
use super::{Global, cache_dir, load, open_store};

#[derive(Args)]
pub struct RunArgs {
    pub recipe: PathBuf,
    /// Stages to run at once [default: number of cores].
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Show the plan and stop; nothing is executed.
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
    /// Only these variants (repeatable).
    #[arg(long = "variant")]
    pub variants: Vec<String>,
    /// Do not write `RECIPE.lock`.
    #[arg(long)]
    pub no_lock: bool,
    /// Refuse to run any stage whose key is not in `RECIPE.lock` (and leave
    /// the lock as it is).
    #[arg(long)]
    pub frozen: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    pub recipe: PathBuf,
    /// Only these variants (repeatable).
    #[arg(long = "variant")]
    pub variants: Vec<String>,
    /// Fail when the recipe or its inputs no longer match `RECIPE.lock`.
    #[arg(long)]
    pub locked: bool,
}

pub fn run(global: &Global, args: RunArgs) -> miette::Result<ExitCode> {
    let start = Instant::now();
    let recipe = load(global, &args.recipe, &args.variants)?;
    if args.dry_run {
        return print_plan(global, &recipe);
    }
    let store = open_store(&cache_dir(global, Some(&recipe)))?;
    super::show::remember_recipe(&store, &recipe);
    let reporter = CliReporter::new(global);
    let observer = CliObserver { reporter: &reporter, verbose: global.verbose };
    let jobs = super::jobs(args.jobs);
    let lock_path = LockFile::path_for(&recipe.path);
    let frozen = if args.frozen { Some(Frozen(super::lock::read_lock(&lock_path)?)) } else { None };
    let policy = frozen.as_ref().map(|f| f as &dyn KeyPolicy);
    let options = RunOptions { jobs, gpus: 0, policy };
    let report =
        watchfire::scheduler::run(&recipe, &store, &LocalExecutor, &reporter, &observer, &options)
            .map_err(|err| miette::miette!("cache: {err}"))?;
    print_failures(&report);
    if !global.quiet {
        print_summary(&recipe, &report, start.elapsed());
    }
    if report.failed() {
        return Ok(ExitCode::FAILURE);
    }
    if !args.no_lock && !args.frozen {
        super::lock::update_lock(&recipe, &report, &lock_path, !args.variants.is_empty())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_failures(report: &RunReport) {
    for outcome in &report.outcomes {
        match &outcome.status {
            Status::Failed(message) => {
                eprintln!("error: stage `{}` failed: {message}", outcome.name)
            }
            Status::Refused(message) => {
                eprintln!("error: stage `{}` refused: {message}", outcome.name)
            }
            _ => {}
        }
    }
}

fn print_summary(recipe: &Recipe, report: &RunReport, elapsed: std::time::Duration) {
    let total = report.outcomes.len();
    if report.ran() == 0 && !report.failed() {
        println!(
            "{}: nothing to do, all {total} stages cached ({})",
            recipe.name,
            duration(elapsed)
        );
        return;
    }
    let mut table = Table::new(&["stage", "kind", "status", "time", "key"]);
    for outcome in &report.outcomes {
        let instance = &recipe.instances[outcome.index];
        let status = match &outcome.status {
            Status::Skipped { failed } => format!("skipped ({failed} failed)"),
            other => status_word(other).to_string(),
        };
        let key = outcome.key.map(|k| k.short()).unwrap_or_default();
        let kind = instance.kind.kind().to_string();
        table.row(vec![outcome.name.clone(), kind, status, duration(outcome.duration), key]);
    }
    print!("{}", table.render());
    let count = |f: fn(&Status) -> bool| report.outcomes.iter().filter(|o| f(&o.status)).count();
    let cached = count(|s| matches!(s, Status::Cached | Status::BuiltElsewhere));
    let failed = count(|s| matches!(s, Status::Failed(_) | Status::Refused(_)));
    let skipped = count(|s| matches!(s, Status::Skipped { .. }));
    println!(
        "{}: {} ran, {cached} cached, {failed} failed, {skipped} skipped ({})",
        recipe.name,
        report.ran(),
        duration(elapsed)
    );
}

/// `--frozen`: only keys the lock lists may run.
struct Frozen(LockFile);

impl KeyPolicy for Frozen {
    fn allow(&self, name: &str, key: &watchfire::cache::CacheKey) -> Result<(), String> {
        if self.0.has_key(name, key) {
            Ok(())
        } else {
            Err(format!("its key {} is not in the lock (--frozen)", key.short()))
        }
    }
}

pub fn plan(global: &Global, args: PlanArgs) -> miette::Result<ExitCode> {
    let recipe = load(global, &args.recipe, &args.variants)?;
    if args.locked {
        let lock = super::lock::read_lock(&LockFile::path_for(&recipe.path))?;
        return super::lock::check_locked(global, &recipe, &lock);
    }
    print_plan(global, &recipe)
}

fn print_plan(global: &Global, recipe: &Recipe) -> miette::Result<ExitCode> {
    let store = open_store(&cache_dir(global, Some(recipe)))?;
    let entries = plan_recipe(recipe, &store).map_err(|err| miette::miette!("cache: {err}"))?;
    let mut table = Table::new(&["stage", "kind", "plan", "why"]);
    let (mut cached, mut to_run, mut waiting) = (0, 0, 0);
    for entry in &entries {
        let (word, why) = match &entry.decision {
            Decision::Cached => {
                cached += 1;
                ("cached", entry.key.map(|k| k.short()).unwrap_or_default())
            }
            Decision::Run(reasons) => {
                to_run += 1;
                ("run", reasons.join("; "))
            }
            Decision::Waits(dep) => {
                waiting += 1;
                ("run", format!("waits on `{dep}` (cached if its output is unchanged)"))
            }
        };
        table.row(vec![entry.name.clone(), entry.kind.clone(), word.to_string(), why]);
        if global.verbose >= 2
            && let Some(fields) = &entry.fields
        {
            let json = serde_json::to_string_pretty(fields).unwrap_or_default();
            eprintln!("key of `{}`\n{json}", entry.name);
        }
    }
    print!("{}", table.render());
    println!("{}: {cached} cached, {to_run} to run, {waiting} waiting on them", recipe.name);
    Ok(ExitCode::SUCCESS)
}
