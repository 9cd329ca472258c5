//! `watchfire show STAGE`: where a stage's artifact is, what its manifest
//! says, and the lineage that produced it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use watchfire::cache::LocalStore;
use watchfire::plan::{Decision, PlanEntry, plan};
use watchfire::recipe::{InputBinding, Recipe};

use super::render::{Table, bytes};
use super::{Global, cache_dir, load, open_store};

#[derive(Args)]
pub struct ShowArgs {
    /// Stage instance name, as `plan` prints it (`detail`, `detail@small`).
    pub stage: String,
    /// The recipe [default: the last one run with this cache].
    #[arg(long, short)]
    pub recipe: Option<PathBuf>,
}

const LAST_RECIPE: &str = "last-recipe";

/// Notes the recipe so `show` can default to it.
pub fn remember_recipe(store: &LocalStore, recipe: &Recipe) {
    let path = store.root().join(LAST_RECIPE);
    let _ = watchfire::cache::write_atomic(&path, recipe.path.to_string_lossy().as_bytes());
}

pub fn show(global: &Global, args: ShowArgs) -> miette::Result<ExitCode> {
    let (recipe, store, entries, index) = find_stage(global, args.recipe, &args.stage)?;
    let entry = &entries[index];
    println!("stage     {} (kind {})", entry.name, entry.kind);
    match (&entry.decision, entry.key) {
        (Decision::Cached, Some(key)) => print_artifact(&store, &key)?,
        (Decision::Run(reasons), _) => {
            println!("artifact  none: would run ({})", reasons.join("; "))
        }
        (Decision::Waits(dep), _) => println!("artifact  none: waits on `{dep}`"),
        (Decision::Cached, None) => {}
    }
    println!("lineage");
    print_lineage(&recipe, &entries, index, 1, &mut vec![false; recipe.instances.len()]);
    Ok(ExitCode::SUCCESS)
}

/// The recipe (`--recipe`, else the last one run with the cache), its store,
/// its plan, and the index of instance `stage` in it.
fn find_stage(
    global: &Global,
    recipe: Option<PathBuf>,
    stage: &str,
) -> miette::Result<(Recipe, LocalStore, Vec<PlanEntry>, usize)> {
    let recipe_path = match recipe {
        Some(path) => path,
        None => {
            let store = open_store(&cache_dir(global, None))?;
            let last = std::fs::read_to_string(store.root().join(LAST_RECIPE)).map_err(|_| {
                miette::miette!(
                    help = "pass the recipe with `--recipe FILE`",
                    "no recipe has been run with this cache yet"
                )
            })?;
            PathBuf::from(last)
        }
    };
    let recipe = load(global, &recipe_path, &[])?;
    let store = open_store(&cache_dir(global, Some(&recipe)))?;
    let entries = plan(&recipe, &store).map_err(|err| miette::miette!("cache: {err}"))?;
    let Some(index) = recipe.instances.iter().position(|i| i.name == stage) else {
        let names: Vec<&str> = recipe.instances.iter().map(|i| i.name.as_str()).collect();
        let hint = watchfire::recipe::did_you_mean(stage, names.iter().copied())
            .map(|best| format!("did you mean `{best}`?"))
            .unwrap_or_else(|| format!("stages: {}", names.join(", ")));
        return Err(miette::miette!(help = hint, "`{}` has no stage `{stage}`", recipe.name));
    };
    Ok((recipe, store, entries, index))
}

/// The output folder of instance `stage`'s cached artifact.
pub fn stage_output(
    global: &Global,
    recipe: Option<PathBuf>,
    stage: &str,
) -> miette::Result<PathBuf> {
    use watchfire::cache::{Lookup, Store};
    let (recipe, store, entries, index) = find_stage(global, recipe, stage)?;
    let not_built = || {
        miette::miette!(
            help = format!("run `watchfire run {}` first", recipe.path.display()),
            "`{stage}` has no artifact in the cache"
        )
    };
    let (Decision::Cached, Some(key)) = (&entries[index].decision, entries[index].key) else {
        return Err(not_built());
    };
    match store.peek(&key).map_err(|err| miette::miette!("{err}"))? {
        Lookup::Hit(artifact) => Ok(artifact.dir),
        _ => Err(not_built()),
    }
}

fn print_artifact(store: &LocalStore, key: &watchfire::cache::CacheKey) -> miette::Result<()> {
    use watchfire::cache::{Lookup, Store};
    let Lookup::Hit(artifact) = store.peek(key).map_err(|err| miette::miette!("{err}"))? else {
        println!("artifact  missing");
        return Ok(());
    };
    let manifest = &artifact.manifest;
    println!("key       {}", manifest.key);
    println!("artifact  {}", artifact.dir.display());
    println!("output    {}", manifest.output_hash);
    println!("built in  {} ms by watchfire {}", manifest.duration_ms, manifest.watchfire_version);
    let mut table = Table::new(&["file", "size", "blake3"]);
    for file in &manifest.files {
        table.row(vec![file.path.clone(), bytes(file.size), file.hash.chars().take(16).collect()]);
    }
    for line in table.render().lines() {
        println!("  {line}");
    }
    let params = serde_json::to_string(&manifest.fields.params).unwrap_or_default();
    println!("params    {params}");
    Ok(())
}

/// Prints an instance and, the first time it appears, its inputs.
fn print_lineage(
    recipe: &Recipe,
    entries: &[PlanEntry],
    index: usize,
    depth: usize,
    shown: &mut Vec<bool>,
) {
    let instance = &recipe.instances[index];
    let key = entries[index].key.map(|k| k.short()).unwrap_or_else(|| "(not built)".to_string());
    let indent = "  ".repeat(depth);
    if shown[index] {
        println!("{indent}{} [{}] {key} (inputs above)", instance.name, instance.kind.kind());
        return;
    }
    shown[index] = true;
    println!("{indent}{} [{}] {key}", instance.name, instance.kind.kind());
    for (slot, binding) in &instance.inputs {
        match binding {
            InputBinding::Stage { instance: dep, .. } => {
                println!("{}<- {slot}:", "  ".repeat(depth + 1));
                print_lineage(recipe, entries, *dep, depth + 2, shown);
            }
            InputBinding::Path { display, .. } => {
                println!("{}<- {slot}: file {display}", "  ".repeat(depth + 1));
            }
        }
    }
}
