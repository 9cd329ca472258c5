//! Lock files on the command line: writing them after a run, `plan
//! --locked` and `watchfire verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use watchfire::cache::LocalStore;
use watchfire::executor::LocalExecutor;
use watchfire::lock::{LockEntry, LockFile, Verdict, compare};
use watchfire::plan::{LockState, plan_locked};
use watchfire::progress::NullReporter;
use watchfire::recipe::Recipe;
use watchfire::scheduler::{RunObserver, RunOptions, RunReport, Status};

use super::render::Table;
use super::{Global, cache_dir, load, open_store};

#[derive(Args)]
pub struct VerifyArgs {
    pub recipe: PathBuf,
    /// Only these stages (and what they depend on); all when none.
    pub stages: Vec<String>,
    /// Stages to run at once [default: number of cores].
    #[arg(short, long)]
    pub jobs: Option<usize>,
}

/// Writes the lock after a successful run. With a variant filter the run
/// saw only part of the recipe, so entries of other instances are kept.
pub fn update_lock(
    recipe: &Recipe,
    report: &RunReport,
    path: &Path,
    partial: bool,
) -> miette::Result<()> {
    let old = LockFile::read(path).map_err(|err| miette::miette!("{err}"))?;
    let mut lock = LockFile::new(recipe);
    for (index, instance) in recipe.instances.iter().enumerate() {
        let (Some(fields), Some(Some(artifact))) =
            (report.fields.get(&instance.name), report.artifacts.get(index))
        else {
            continue;
        };
        let entry = LockEntry::new(fields, artifact, instance.kind.deterministic());
        lock.stages.insert(instance.name.clone(), entry);
        if let Some((source, pin)) = model_pin(artifact) {
            lock.models.insert(source, pin);
        }
    }
    if partial && let Some(old) = &old {
        for (name, entry) in &old.stages {
            lock.stages.entry(name.clone()).or_insert_with(|| entry.clone());
        }
    }
    if old.as_ref() != Some(&lock) {
        lock.write(path).map_err(|err| miette::miette!("{}: {err}", path.display()))?;
    }
    Ok(())
}

/// The source and sha256 a `model` stage recorded in its `source.json`.
fn model_pin(artifact: &watchfire::cache::Artifact) -> Option<(String, String)> {
    if artifact.manifest.fields.kind != "model" {
        return None;
    }
    let bytes = std::fs::read(artifact.dir.join("source.json")).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let source = json.get("source")?.as_str()?.to_string();
    let sha256 = json.get("sha256")?.as_str()?;
    Some((source, format!("sha256:{sha256}")))
}

/// The lock beside a recipe, or an error saying how to make one.
pub fn read_lock(path: &Path) -> miette::Result<LockFile> {
    LockFile::read(path).map_err(|err| miette::miette!("{err}"))?.ok_or_else(|| {
        miette::miette!(
            help = "run the recipe once without `--frozen` or `--locked` and commit the lock",
            "there is no lock file at {}",
            path.display()
        )
    })
}

/// `plan --locked`: every key must be the locked one.
pub fn check_locked(global: &Global, recipe: &Recipe, lock: &LockFile) -> miette::Result<ExitCode> {
    let store = open_store(&cache_dir(global, Some(recipe)))?;
    let entries =
        plan_locked(recipe, &store, Some(lock)).map_err(|err| miette::miette!("{err}"))?;
    let mut table = Table::new(&["stage", "lock", "why"]);
    let mut stale = 0;
    for entry in &entries {
        let (word, why) = match entry.lock.clone().unwrap_or(LockState::Unknown) {
            LockState::Matches => ("ok", String::new()),
            LockState::Stale(reasons) => ("stale", reasons.join("; ")),
            LockState::NotInLock => ("stale", "not in the lock".to_string()),
            LockState::Unknown => ("stale", "depends on a stale stage".to_string()),
        };
        stale += usize::from(word == "stale");
        table.row(vec![entry.name.clone(), word.to_string(), why]);
    }
    let extra: Vec<&String> =
        lock.stages.keys().filter(|name| !entries.iter().any(|e| &e.name == *name)).collect();
    for name in &extra {
        table.row(vec![
            name.to_string(),
            "stale".to_string(),
            "no longer in the recipe".to_string(),
        ]);
    }
    stale += extra.len();
    print!("{}", table.render());
    if stale == 0 {
        println!("{}: the lock matches the recipe", recipe.name);
        return Ok(ExitCode::SUCCESS);
    }
    let lock_path = LockFile::path_for(&recipe.path);
    eprintln!(
        "error: the lock is stale ({stale} stages): run `watchfire run {}` and commit {}",
        recipe.path.display(),
        lock_path.display()
    );
    Ok(ExitCode::FAILURE)
}

struct Quiet;

impl RunObserver for Quiet {}

/// `watchfire verify`: rebuild from scratch in a temporary cache and
/// compare every output with the lock.
pub fn verify(global: &Global, args: VerifyArgs) -> miette::Result<ExitCode> {
    let mut recipe = load(global, &args.recipe, &[])?;
    let lock_path = LockFile::path_for(&recipe.path);
    let lock = read_lock(&lock_path)?;
    let targets: Vec<String> = if args.stages.is_empty() {
        recipe.instances.iter().map(|i| i.name.clone()).collect()
    } else {
        for name in &args.stages {
            if !recipe.instances.iter().any(|i| &i.name == name) {
                return Err(miette::miette!("`{}` has no stage `{name}`", recipe.name));
            }
        }
        recipe.retain_with_ancestors(&args.stages);
        args.stages.clone()
    };
    let scratch = tempfile::tempdir().map_err(|err| miette::miette!("temporary cache: {err}"))?;
    let store = LocalStore::open(scratch.path()).map_err(|err| miette::miette!("{err}"))?;
    let jobs = super::jobs(args.jobs);
    let options = RunOptions { jobs, gpus: 0, policy: None };
    let report =
        watchfire::scheduler::run(&recipe, &store, &LocalExecutor, &NullReporter, &Quiet, &options)
            .map_err(|err| miette::miette!("{err}"))?;

    let mut table = Table::new(&["stage", "result", "detail"]);
    let mut bad = 0;
    for outcome in &report.outcomes {
        if !targets.contains(&outcome.name) {
            continue;
        }
        let entry = lock.stages.get(&outcome.name);
        let stale = match (entry, report.fields.get(&outcome.name)) {
            (Some(entry), Some(fields)) if entry.key != fields.key().to_hex() => {
                Some(fields.changes_since(&entry.fields(&lock)).join("; "))
            }
            _ => None,
        };
        let (word, detail) = match (&outcome.status, &report.artifacts[outcome.index]) {
            (Status::Failed(message), _) => ("failed", message.clone()),
            (Status::Skipped { failed }, _) => ("failed", format!("`{failed}` failed")),
            _ if stale.is_some() => {
                ("stale", format!("the lock is stale: {}", stale.unwrap_or_default()))
            }
            (_, Some(artifact)) => match compare(entry, artifact) {
                Verdict::Match => ("match", String::new()),
                Verdict::Missing => ("missing", "not in the lock".to_string()),
                Verdict::Differs { file } => ("differs", format!("first differing file: {file}")),
                Verdict::MetricsDiffer { metric, locked, found } => {
                    ("differs", format!("metric {metric}: {locked} locked, {found} now"))
                }
            },
            (_, None) => ("failed", "no artifact".to_string()),
        };
        bad += usize::from(word != "match");
        table.row(vec![outcome.name.clone(), word.to_string(), detail]);
    }
    if !global.quiet {
        print!("{}", table.render());
    }
    let plural = if targets.len() == 1 { "" } else { "s" };
    println!(
        "{}: {} stage{plural} verified, {bad} not matching the lock",
        recipe.name,
        targets.len()
    );
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
