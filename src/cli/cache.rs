//! `watchfire cache ls | gc | verify`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use watchfire::cache::{CacheKey, Store};

use super::render::{Table, bytes};
use super::{Global, cache_dir, load, open_store};

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List stored artifacts.
    Ls,
    /// Remove every artifact the named recipes do not reference.
    Gc {
        /// Recipes whose artifacts to keep.
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
    },
    /// Rehash every stored file and report artifacts whose content changed.
    Verify {
        /// Also remove the corrupt artifacts, so the next run rebuilds them.
        #[arg(long)]
        fix: bool,
    },
}

pub fn cache(global: &Global, command: CacheCommand) -> miette::Result<ExitCode> {
    match command {
        CacheCommand::Ls => ls(global),
        CacheCommand::Gc { recipes } => gc(global, &recipes),
        CacheCommand::Verify { fix } => verify(global, fix),
    }
}

fn ls(global: &Global) -> miette::Result<ExitCode> {
    let store = open_store(&cache_dir(global, None))?;
    let manifests = store.list().map_err(|err| miette::miette!("{err}"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut table = Table::new(&["key", "stage", "kind", "files", "size", "age"]);
    let mut total = 0;
    for manifest in &manifests {
        total += manifest.total_size();
        table.row(vec![
            short(&manifest.key),
            manifest.stage.clone(),
            manifest.fields.kind.clone(),
            manifest.files.len().to_string(),
            bytes(manifest.total_size()),
            age(now.saturating_sub(manifest.started_at)),
        ]);
    }
    print!("{}", table.render());
    println!("{} artifacts, {} in {}", manifests.len(), bytes(total), store.location());
    Ok(ExitCode::SUCCESS)
}

/// The first 12 characters of a hex key, whatever the manifest held.
fn short(key: &str) -> String {
    key.chars().take(12).collect()
}

fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

fn gc(global: &Global, recipes: &[PathBuf]) -> miette::Result<ExitCode> {
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut store_dir = None;
    for path in recipes {
        let recipe = load(global, path, &[])?;
        let dir = cache_dir(global, Some(&recipe));
        let store = open_store(&dir)?;
        let entries =
            watchfire::plan::plan(&recipe, &store).map_err(|err| miette::miette!("{err}"))?;
        keep.extend(entries.iter().filter_map(|e| e.key.map(|k| k.to_hex())));
        let refs = store.refs(&recipe.path).map_err(|err| miette::miette!("{err}"))?;
        keep.extend(refs.instances.values().map(|entry| entry.key.clone()));
        store_dir.get_or_insert(dir);
    }
    let dir = store_dir.unwrap_or_else(|| cache_dir(global, None));
    let store = open_store(&dir)?;
    let (mut removed, mut freed) = (0usize, 0u64);
    for manifest in store.list().map_err(|err| miette::miette!("{err}"))? {
        if keep.contains(&manifest.key) {
            continue;
        }
        if let Some(key) = CacheKey::parse(&manifest.key) {
            freed += store.remove(&key).map_err(|err| miette::miette!("{err}"))?;
            removed += 1;
            println!("removed {} ({})", short(&manifest.key), manifest.stage);
        }
    }
    freed += store.clean_staging().map_err(|err| miette::miette!("{err}"))?;
    println!("removed {removed} artifacts, freed {}; kept {}", bytes(freed), keep.len());
    Ok(ExitCode::SUCCESS)
}

fn verify(global: &Global, fix: bool) -> miette::Result<ExitCode> {
    let store = open_store(&cache_dir(global, None))?;
    let mut bad = 0;
    let stages: std::collections::BTreeMap<String, String> = store
        .list()
        .map_err(|err| miette::miette!("{err}"))?
        .into_iter()
        .map(|m| (m.key, m.stage))
        .collect();
    let keys = store.keys().map_err(|err| miette::miette!("{err}"))?;
    for key in &keys {
        if let Some(file) = store.verify(key).map_err(|err| miette::miette!("{err}"))? {
            bad += 1;
            let stage = stages.get(&key.to_hex()).map_or("unreadable", String::as_str);
            println!("corrupt {} ({stage}): `{file}` does not match its hash", key.short());
            if fix {
                store.remove(key).map_err(|err| miette::miette!("{err}"))?;
            }
        }
    }
    println!("{} artifacts checked, {bad} corrupt", keys.len());
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
