//! The scheduler: runs a recipe's stage instances in dependency order, in
//! parallel up to a CPU budget, reusing every artifact whose key is cached.
//!
//! A stage's key depends on the output hashes of its inputs, so it is known
//! only once its dependencies are done. When a re-run dependency produces
//! the same bytes as before, the dependent's key is unchanged and it is a
//! cache hit (early cutoff). A failed stage stops only its dependents.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cache::{
    Artifact, CacheKey, FileHashes, InputKey, KeyFields, LockEvents, Lookup, Manifest, RefEntry,
    Staging, Store, StoreError, WATCHFIRE_VERSION, hash_entries, scan_dir,
};
use crate::executor::{Executor, Job};
use crate::progress::Reporter;
use crate::recipe::{InputBinding, Recipe, StageInstance};

/// How a stage instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Found in the cache.
    Cached,
    /// Ran and was stored (or, for `cache: false`, ran).
    Ran,
    /// Another process built it while this one waited for the lock.
    BuiltElsewhere,
    Failed(String),
    /// Not run because a dependency failed.
    Skipped {
        failed: String,
    },
    /// Not run because `--frozen` forbids keys missing from the lock.
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub status: Status,
    pub key: Option<CacheKey>,
    pub output_hash: Option<String>,
    pub duration: Duration,
}

/// The result of a run, one outcome per instance in recipe order.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub outcomes: Vec<Outcome>,
    /// Key fields of every instance whose key was computed.
    pub fields: BTreeMap<String, KeyFields>,
}

impl RunReport {
    pub fn failed(&self) -> bool {
        self.outcomes.iter().any(|o| {
            matches!(
                o.status,
                Status::Failed(_) | Status::Skipped { .. } | Status::Refused(_)
            )
        })
    }

    pub fn ran(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status == Status::Ran)
            .count()
    }
}

/// What the command line hears about while a recipe runs.
pub trait RunObserver: Send + Sync {
    fn key_computed(&self, _name: &str, _fields: &KeyFields, _key: &CacheKey) {}
    fn stage_started(&self, _name: &str) {}
    fn stage_finished(&self, _outcome: &Outcome) {}
    /// Something the user should know: a corrupt artifact, a stale lock.
    fn notice(&self, _message: &str) {}
}

/// Decides, before a stage runs, whether its key may run at all.
pub trait KeyPolicy: Send + Sync {
    /// `Err(reason)` refuses the stage.
    fn allow(&self, name: &str, key: &CacheKey) -> Result<(), String>;
}

pub struct RunOptions<'a> {
    /// CPU slots; stages take `resources.cpu` of them.
    pub jobs: usize,
    /// GPUs this machine offers.
    pub gpus: u32,
    pub policy: Option<&'a dyn KeyPolicy>,
}

/// The resolved form of one input: its path and what the key records.
struct Bound {
    path: PathBuf,
    key: InputKey,
}

/// The key fields of an instance whose dependencies are all in `done`,
/// with the paths its inputs are bound to.
pub(crate) fn key_fields(
    recipe: &Recipe,
    instance: &StageInstance,
    done: &[Option<Artifact>],
    files: &FileHashes,
) -> Result<(KeyFields, BTreeMap<String, PathBuf>), String> {
    let mut inputs = BTreeMap::new();
    let mut paths = BTreeMap::new();
    for (slot, binding) in &instance.inputs {
        let bound = bind(binding, done, files)?;
        paths.insert(slot.clone(), bound.path);
        inputs.insert(slot.clone(), bound.key);
    }
    let fields = KeyFields {
        kind: instance.kind.kind().to_string(),
        kind_version: instance.kind.version(),
        params: instance.params.clone(),
        inputs,
        schema: instance.kind.uses_schema().then(|| recipe.schema.clone()),
        seed: recipe.seed,
        watchfire_version: WATCHFIRE_VERSION.to_string(),
    };
    Ok((fields, paths))
}

fn bind(
    binding: &InputBinding,
    done: &[Option<Artifact>],
    files: &FileHashes,
) -> Result<Bound, String> {
    match binding {
        InputBinding::Stage { instance, output } => {
            let artifact = done[*instance].as_ref().ok_or("dependency not done")?;
            let (path, hash) = match output {
                Some(file) => {
                    let entry = artifact.manifest.file(file).ok_or_else(|| {
                        format!("`{}` did not write `{file}`", artifact.manifest.stage)
                    })?;
                    (artifact.dir.join(file), entry.hash.clone())
                }
                None => (artifact.dir.clone(), artifact.manifest.output_hash.clone()),
            };
            Ok(Bound {
                path,
                key: InputKey::Stage {
                    output: output.clone(),
                    hash,
                },
            })
        }
        InputBinding::Path { display, abs } => {
            let hash = files.hash(abs).map_err(|err| format!("{display}: {err}"))?;
            Ok(Bound {
                path: abs.clone(),
                key: InputKey::File {
                    path: display.clone(),
                    hash,
                },
            })
        }
    }
}

/// Messages from worker threads.
struct Finished {
    index: usize,
    result: Result<(Artifact, bool, Option<Staging>), String>,
    duration: Duration,
}

/// Runs every instance of `recipe`.
pub fn run(
    recipe: &Recipe,
    store: &dyn Store,
    executor: &dyn Executor,
    reporter: &dyn Reporter,
    observer: &dyn RunObserver,
    options: &RunOptions<'_>,
) -> Result<RunReport, StoreError> {
    let files = FileHashes::load(PathBuf::from(store.location()).join("files.json"));
    let mut done: Vec<Option<Artifact>> = vec![None; recipe.instances.len()];
    // Outputs of `cache: false` stages live in staging until the run ends.
    let mut transient: Vec<Staging> = Vec::new();
    let count = recipe.instances.len();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
    // Handed to a worker and not finished yet.
    let mut started = vec![false; count];
    let mut report = RunReport::default();
    let mut running = 0usize;
    let mut cpu_free = options.jobs.max(1);
    let mut gpu_free = options.gpus;

    std::thread::scope(|scope| -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel::<Finished>();
        loop {
            let mut progressed = false;
            for index in 0..count {
                if outcomes[index].is_some() || done[index].is_some() {
                    continue;
                }
                let instance = &recipe.instances[index];
                if let Some(failed) = instance
                    .deps
                    .iter()
                    .find_map(|&d| failed_name(&outcomes, d))
                {
                    outcomes[index] = Some(skipped(instance, failed));
                    observer
                        .stage_finished(outcomes[index].as_ref().unwrap_or_else(|| unreachable!()));
                    progressed = true;
                    continue;
                }
                let ready = instance.deps.iter().all(|&d| done[d].is_some());
                if !ready || started[index] {
                    continue;
                }
                let (fields, paths) = match key_fields(recipe, instance, &done, &files) {
                    Ok(found) => found,
                    Err(message) => {
                        outcomes[index] = Some(finished(
                            instance,
                            Status::Failed(message),
                            None,
                            None,
                            Duration::ZERO,
                        ));
                        observer.stage_finished(
                            outcomes[index].as_ref().unwrap_or_else(|| unreachable!()),
                        );
                        progressed = true;
                        continue;
                    }
                };
                let key = fields.key();
                observer.key_computed(&instance.name, &fields, &key);
                report.fields.insert(instance.name.clone(), fields.clone());

                if instance.cache {
                    match store.lookup(&key)? {
                        Lookup::Hit(artifact) => {
                            let hash = artifact.manifest.output_hash.clone();
                            done[index] = Some(*artifact);
                            outcomes[index] = Some(finished(instance, Status::Cached, Some(key), Some(hash), Duration::ZERO));
                            observer.stage_finished(outcomes[index].as_ref().unwrap_or_else(|| unreachable!()));
                            progressed = true;
                            continue;
                        }
                        Lookup::Corrupt { file, .. } => observer.notice(&format!(
                            "artifact of `{}` was corrupt (`{file}` no longer matches its hash); rebuilding it",
                            instance.name
                        )),
                        Lookup::Miss => {}
                    }
                }
                if let Some(policy) = options.policy
                    && let Err(reason) = policy.allow(&instance.name, &key)
                {
                    {
                        outcomes[index] = Some(finished(
                            instance,
                            Status::Refused(reason),
                            Some(key),
                            None,
                            Duration::ZERO,
                        ));
                        observer.stage_finished(
                            outcomes[index].as_ref().unwrap_or_else(|| unreachable!()),
                        );
                        progressed = true;
                        continue;
                    }
                }
                let need_cpu = (instance.resources.cpu as usize).clamp(1, options.jobs.max(1));
                if instance.resources.gpu > options.gpus {
                    let message = format!(
                        "needs {} GPU(s); this machine offers {}",
                        instance.resources.gpu, options.gpus
                    );
                    outcomes[index] = Some(finished(
                        instance,
                        Status::Failed(message),
                        Some(key),
                        None,
                        Duration::ZERO,
                    ));
                    observer
                        .stage_finished(outcomes[index].as_ref().unwrap_or_else(|| unreachable!()));
                    progressed = true;
                    continue;
                }
                if need_cpu > cpu_free || instance.resources.gpu > gpu_free {
                    report.fields.remove(&instance.name);
                    continue;
                }
                cpu_free -= need_cpu;
                gpu_free -= instance.resources.gpu;
                running += 1;
                progressed = true;
                started[index] = true;
                observer.stage_started(&instance.name);
                let tx = tx.clone();
                let job_inputs = paths;
                let recipe_ref = recipe;
                scope.spawn(move || {
                    let start = Instant::now();
                    let result = build(
                        recipe_ref, index, key, fields, job_inputs, store, executor, reporter,
                        observer,
                    );
                    let _ = tx.send(Finished {
                        index,
                        result,
                        duration: start.elapsed(),
                    });
                });
            }
            if running == 0 && !progressed {
                break;
            }
            if running == 0 {
                continue;
            }
            let Ok(msg) = rx.recv() else { break };
            running -= 1;
            let instance = &recipe.instances[msg.index];
            cpu_free += (instance.resources.cpu as usize).clamp(1, options.jobs.max(1));
            gpu_free += instance.resources.gpu;
            let key = report.fields.get(&instance.name).map(KeyFields::key);
            let outcome = match msg.result {
                Ok((artifact, elsewhere, staging)) => {
                    let hash = artifact.manifest.output_hash.clone();
                    done[msg.index] = Some(artifact);
                    transient.extend(staging);
                    let status = if elsewhere {
                        Status::BuiltElsewhere
                    } else {
                        Status::Ran
                    };
                    finished(instance, status, key, Some(hash), msg.duration)
                }
                Err(message) => {
                    finished(instance, Status::Failed(message), key, None, msg.duration)
                }
            };
            observer.stage_finished(&outcome);
            outcomes[msg.index] = Some(outcome);
        }
        Ok(())
    })?;

    if let Err(err) = files.save() {
        observer.notice(&format!("could not save the file-hash memo: {err}"));
    }
    save_refs(recipe, store, &report, &outcomes)?;
    report.outcomes = outcomes.into_iter().flatten().collect();
    Ok(report)
}

fn failed_name(outcomes: &[Option<Outcome>], dep: usize) -> Option<String> {
    match outcomes[dep].as_ref()?.status {
        Status::Failed(_) | Status::Skipped { .. } | Status::Refused(_) => {
            outcomes[dep].as_ref().map(|o| o.name.clone())
        }
        _ => None,
    }
}

fn skipped(instance: &StageInstance, failed: String) -> Outcome {
    finished(
        instance,
        Status::Skipped { failed },
        None,
        None,
        Duration::ZERO,
    )
}

fn finished(
    instance: &StageInstance,
    status: Status,
    key: Option<CacheKey>,
    output_hash: Option<String>,
    duration: Duration,
) -> Outcome {
    Outcome {
        name: instance.name.clone(),
        status,
        key,
        output_hash,
        duration,
    }
}

/// Worker side: lock the key, build unless someone else just did, commit.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
fn build(
    recipe: &Recipe,
    index: usize,
    key: CacheKey,
    fields: KeyFields,
    inputs: BTreeMap<String, PathBuf>,
    store: &dyn Store,
    executor: &dyn Executor,
    reporter: &dyn Reporter,
    observer: &dyn RunObserver,
) -> Result<(Artifact, bool, Option<Staging>), String> {
    let instance = &recipe.instances[index];
    let events = ObserverLockEvents {
        observer,
        name: &instance.name,
    };
    let _lock = if instance.cache {
        let lock = store.lock(&key, &events).map_err(|err| err.to_string())?;
        if let Lookup::Hit(artifact) = store.lookup(&key).map_err(|err| err.to_string())? {
            return Ok((*artifact, true, None));
        }
        Some(lock)
    } else {
        None
    };
    let staging = store.begin(&key).map_err(|err| err.to_string())?;
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let start = Instant::now();
    let job = Job {
        stage_id: &instance.name,
        kind: instance.kind,
        params: &instance.params,
        key: key.to_hex(),
        seed: fields.stage_seed(),
        schema: &recipe.schema,
        inputs,
        out_dir: staging.out_dir.clone(),
    };
    executor
        .execute(&job, reporter)
        .map_err(|err| err.to_string())?;
    let manifest = Manifest {
        key: key.to_hex(),
        stage: instance.name.clone(),
        fields,
        output_hash: String::new(),
        files: Vec::new(),
        started_at,
        duration_ms: start.elapsed().as_millis() as u64,
        watchfire_version: WATCHFIRE_VERSION.to_string(),
    };
    if instance.cache {
        let artifact = store
            .commit(staging, manifest)
            .map_err(|err| err.to_string())?;
        return Ok((artifact, false, None));
    }
    let files = scan_dir(&staging.out_dir).map_err(|err| err.to_string())?;
    let manifest = Manifest {
        output_hash: hash_entries(&files),
        files,
        ..manifest
    };
    let artifact = Artifact {
        key,
        dir: staging.out_dir.clone(),
        manifest,
    };
    Ok((artifact, false, Some(staging)))
}

struct ObserverLockEvents<'a> {
    observer: &'a dyn RunObserver,
    name: &'a str,
}

impl LockEvents for ObserverLockEvents<'_> {
    fn waiting(&self, key: &CacheKey) {
        self.observer.notice(&format!(
            "`{}`: another watchfire process is building {}; waiting for it",
            self.name,
            key.short()
        ));
    }

    fn broke_stale(&self, key: &CacheKey, pid: u32) {
        self.observer.notice(&format!(
            "`{}`: broke a stale lock on {} left by process {pid}, which is no longer running",
            self.name,
            key.short()
        ));
    }
}

/// Records the keys this run computed, for `plan` and `cache gc`.
fn save_refs(
    recipe: &Recipe,
    store: &dyn Store,
    report: &RunReport,
    outcomes: &[Option<Outcome>],
) -> Result<(), StoreError> {
    let mut refs = store.refs(&recipe.path)?;
    refs.recipe = recipe.path.display().to_string();
    for outcome in outcomes.iter().flatten() {
        let ok = matches!(
            outcome.status,
            Status::Cached | Status::Ran | Status::BuiltElsewhere
        );
        if let (true, Some(fields)) = (ok, report.fields.get(&outcome.name)) {
            let entry = RefEntry {
                key: fields.key().to_hex(),
                fields: fields.clone(),
            };
            refs.instances.insert(outcome.name.clone(), entry);
        }
    }
    store.save_refs(&recipe.path, &refs)
}
