//! The scheduler: runs a recipe's stage instances in dependency order, in
//! parallel up to a CPU budget, reusing every artifact whose key is cached.
//!
//! A stage's key depends on the output hashes of its inputs, so it is known
//! only once its dependencies are done. When a re-run dependency produces
//! the same bytes as before, the dependent's key is unchanged and it is a
//! cache hit (early cutoff). A failed stage stops only its dependents.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
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

impl Status {
    /// Whether the instance has no artifact because something went wrong.
    pub fn is_failure(&self) -> bool {
        matches!(self, Self::Failed(_) | Self::Skipped { .. } | Self::Refused(_))
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    /// The instance's index in [`Recipe::instances`].
    pub index: usize,
    pub name: String,
    pub status: Status,
    pub key: Option<CacheKey>,
    pub output_hash: Option<String>,
    pub duration: Duration,
}

/// The result of a run, one outcome per instance in run order
/// (dependencies before dependents).
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub outcomes: Vec<Outcome>,
    /// Key fields of every instance whose key was computed.
    pub fields: BTreeMap<String, KeyFields>,
    /// The artifact of every instance that finished, by instance index.
    pub artifacts: Vec<Option<Artifact>>,
}

impl RunReport {
    pub fn failed(&self) -> bool {
        self.outcomes.iter().any(|o| o.status.is_failure())
    }

    pub fn ran(&self) -> usize {
        self.outcomes.iter().filter(|o| o.status == Status::Ran).count()
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

/// The input-file hash memo of `store`, leaving the cache folder and the
/// recipe's own lock out of folder hashes.
pub(crate) fn file_hashes(recipe: &Recipe, store: &dyn Store) -> FileHashes {
    let memo = store.file_memo();
    let mut exclude = vec![crate::lock::LockFile::path_for(&recipe.path)];
    exclude.extend(memo.parent().and_then(Path::parent).map(Path::to_path_buf));
    FileHashes::with_exclusions(memo, exclude)
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
            Ok(Bound { path, key: InputKey::Stage { output: output.clone(), hash } })
        }
        InputBinding::Path { display, abs } => {
            let hash = files.hash(abs).map_err(|err| format!("{display}: {err}"))?;
            Ok(Bound { path: abs.clone(), key: InputKey::File { path: display.clone(), hash } })
        }
    }
}

/// Messages from worker threads.
struct Finished {
    index: usize,
    result: Result<Built, String>,
    duration: Duration,
}

/// What a worker produced.
struct Built {
    artifact: Artifact,
    /// Another process committed the key while this one waited for its lock.
    elsewhere: bool,
    /// For `cache: false` stages: the staging folder holding the outputs.
    staging: Option<Staging>,
}

/// A stage that is ready to run, with what its worker needs.
struct Ready {
    index: usize,
    key: CacheKey,
    fields: KeyFields,
    inputs: BTreeMap<String, PathBuf>,
}

/// What looking at one instance decided.
enum Step {
    /// Nothing to do now (waiting on dependencies or on free slots).
    Idle,
    /// Finished without running: cached, refused, skipped or failed early.
    Settled,
    Start(Box<Ready>),
}

/// What preparing an instance found.
enum Prepared {
    /// Its dependencies are not all done.
    Waiting,
    Settled,
    Ready(Box<Ready>),
}

/// The scheduler's bookkeeping for one run.
struct State<'a> {
    recipe: &'a Recipe,
    store: &'a dyn Store,
    observer: &'a dyn RunObserver,
    options: &'a RunOptions<'a>,
    files: FileHashes,
    outcomes: Vec<Option<Outcome>>,
    done: Vec<Option<Artifact>>,
    started: Vec<bool>,
    /// Prepared instances waiting for slots.
    ready: Vec<Option<Box<Ready>>>,
    /// Keys being built by this run's workers.
    in_flight: HashSet<CacheKey>,
    /// Outputs of `cache: false` stages live in staging until the run ends.
    transient: Vec<Staging>,
    fields: BTreeMap<String, KeyFields>,
    cpu_free: usize,
    gpu_free: u32,
}

impl State<'_> {
    /// The slots `resources.cpu` asks for, or every slot for a stage that
    /// runs a model (see `Stage::USES_ALL_CORES`).
    fn cpu_slots(&self, instance: &StageInstance) -> usize {
        let jobs = self.options.jobs.max(1);
        if instance.kind.uses_all_cores() {
            return jobs;
        }
        (instance.resources.cpu as usize).clamp(1, jobs)
    }

    fn settle(&mut self, index: usize, status: Status, key: Option<CacheKey>, duration: Duration) {
        let instance = &self.recipe.instances[index];
        let output_hash = self.done[index].as_ref().map(|a| a.manifest.output_hash.clone());
        let outcome =
            Outcome { index, name: instance.name.clone(), status, key, output_hash, duration };
        self.observer.stage_finished(&outcome);
        self.outcomes[index] = Some(outcome);
    }

    /// Decides what to do with instance `index` now.
    fn step(&mut self, index: usize) -> Result<Step, StoreError> {
        if self.outcomes[index].is_some() || self.started[index] {
            return Ok(Step::Idle);
        }
        if self.ready[index].is_none() {
            match self.prepare(index)? {
                Prepared::Waiting => return Ok(Step::Idle),
                Prepared::Settled => return Ok(Step::Settled),
                Prepared::Ready(ready) => self.ready[index] = Some(ready),
            }
        }
        Ok(self.start(index))
    }

    /// Computes the key of an instance whose dependencies are done, once,
    /// and settles it if it needs no run.
    fn prepare(&mut self, index: usize) -> Result<Prepared, StoreError> {
        let instance = &self.recipe.instances[index];
        if let Some(failed) = instance.deps.iter().find_map(|&d| failed_name(&self.outcomes, d)) {
            self.settle(index, Status::Skipped { failed }, None, Duration::ZERO);
            return Ok(Prepared::Settled);
        }
        if !instance.deps.iter().all(|&d| self.done[d].is_some()) {
            return Ok(Prepared::Waiting);
        }
        let (fields, inputs) = match key_fields(self.recipe, instance, &self.done, &self.files) {
            Ok(found) => found,
            Err(message) => {
                self.settle(index, Status::Failed(message), None, Duration::ZERO);
                return Ok(Prepared::Settled);
            }
        };
        let key = fields.key();
        self.observer.key_computed(&instance.name, &fields, &key);
        self.fields.insert(instance.name.clone(), fields.clone());
        if let Some(policy) = self.options.policy
            && let Err(reason) = policy.allow(&instance.name, &key)
        {
            self.settle(index, Status::Refused(reason), Some(key), Duration::ZERO);
            return Ok(Prepared::Settled);
        }
        if instance.cache {
            match self.store.lookup(&key)? {
                Lookup::Hit(artifact) => {
                    self.done[index] = Some(*artifact);
                    self.settle(index, Status::Cached, Some(key), Duration::ZERO);
                    return Ok(Prepared::Settled);
                }
                Lookup::Corrupt { file, .. } => self.observer.notice(&format!(
                    "artifact of `{}` was corrupt (`{file}` no longer matches its hash); \
                     rebuilding it",
                    instance.name
                )),
                Lookup::Miss => {}
            }
        }
        if instance.resources.gpu > self.options.gpus {
            let message = format!(
                "needs {} GPU(s); this machine offers {}",
                instance.resources.gpu, self.options.gpus
            );
            self.settle(index, Status::Failed(message), Some(key), Duration::ZERO);
            return Ok(Prepared::Settled);
        }
        Ok(Prepared::Ready(Box::new(Ready { index, key, fields, inputs })))
    }

    /// Starts a prepared instance when its slots are free and no other
    /// instance of this run is building the same key (then it waits, and
    /// finds that key in the cache).
    fn start(&mut self, index: usize) -> Step {
        let instance = &self.recipe.instances[index];
        let cpu = self.cpu_slots(instance);
        let Some(key) = self.ready[index].as_ref().map(|ready| ready.key) else {
            return Step::Idle;
        };
        let busy = self.in_flight.contains(&key);
        if busy || cpu > self.cpu_free || instance.resources.gpu > self.gpu_free {
            return Step::Idle;
        }
        if self.done.iter().flatten().any(|artifact| artifact.key == key) && instance.cache {
            // A twin instance built this key during this run.
            if let Ok(Lookup::Hit(artifact)) = self.store.lookup(&key) {
                self.ready[index] = None;
                self.done[index] = Some(*artifact);
                self.settle(index, Status::Cached, Some(key), Duration::ZERO);
                return Step::Settled;
            }
        }
        self.cpu_free -= cpu;
        self.gpu_free -= instance.resources.gpu;
        self.started[index] = true;
        self.in_flight.insert(key);
        self.observer.stage_started(&instance.name);
        match self.ready[index].take() {
            Some(ready) => Step::Start(ready),
            None => Step::Idle,
        }
    }

    /// Records a worker's result and frees its slots.
    fn finish(&mut self, msg: Finished) {
        let instance = &self.recipe.instances[msg.index];
        if let Some(fields) = self.fields.get(&instance.name) {
            self.in_flight.remove(&fields.key());
        }
        self.cpu_free += self.cpu_slots(instance);
        self.gpu_free += instance.resources.gpu;
        self.started[msg.index] = false;
        let key = self.fields.get(&instance.name).map(KeyFields::key);
        match msg.result {
            Ok(built) => {
                self.done[msg.index] = Some(built.artifact);
                self.transient.extend(built.staging);
                let status = if built.elsewhere { Status::BuiltElsewhere } else { Status::Ran };
                self.settle(msg.index, status, key, msg.duration);
            }
            Err(message) => self.settle(msg.index, Status::Failed(message), key, msg.duration),
        }
    }
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
    let count = recipe.instances.len();
    let mut state = State {
        recipe,
        store,
        observer,
        options,
        files: file_hashes(recipe, store),
        outcomes: vec![None; count],
        done: vec![None; count],
        started: vec![false; count],
        ready: (0..count).map(|_| None).collect(),
        in_flight: HashSet::new(),
        transient: Vec::new(),
        fields: BTreeMap::new(),
        cpu_free: options.jobs.max(1),
        gpu_free: options.gpus,
    };
    std::thread::scope(|scope| -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel::<Finished>();
        let mut running = 0usize;
        loop {
            let mut progressed = false;
            for index in 0..count {
                match state.step(index)? {
                    Step::Idle => {}
                    Step::Settled => progressed = true,
                    Step::Start(ready) => {
                        progressed = true;
                        running += 1;
                        let tx = tx.clone();
                        scope.spawn(move || {
                            let start = Instant::now();
                            let index = ready.index;
                            // A panicking stage fails like any other; the run goes on.
                            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                build(recipe, *ready, store, executor, reporter, observer)
                            }))
                            .unwrap_or_else(|panic| Err(panic_message(panic.as_ref())));
                            let duration = start.elapsed();
                            let _ = tx.send(Finished { index, result, duration });
                        });
                    }
                }
            }
            if running == 0 && !progressed {
                return Ok(());
            }
            if running > 0 && !progressed {
                let Ok(msg) = rx.recv() else { return Ok(()) };
                running -= 1;
                state.finish(msg);
            }
        }
    })?;

    if let Err(err) = state.files.save() {
        observer.notice(&format!("could not save the file-hash memo: {err}"));
    }
    let mut report =
        RunReport { outcomes: Vec::new(), fields: state.fields, artifacts: Vec::new() };
    save_refs(recipe, store, &report, &state.outcomes)?;
    report.outcomes = state.outcomes.into_iter().flatten().collect();
    report.artifacts = state.done;
    drop(state.transient);
    Ok(report)
}

/// What a panicking stage said, as a failure message.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string());
    format!("the stage panicked: {text}")
}

fn failed_name(outcomes: &[Option<Outcome>], dep: usize) -> Option<String> {
    let outcome = outcomes[dep].as_ref()?;
    outcome.status.is_failure().then(|| outcome.name.clone())
}

/// Worker side: lock the key, build unless another process just did, commit.
fn build(
    recipe: &Recipe,
    ready: Ready,
    store: &dyn Store,
    executor: &dyn Executor,
    reporter: &dyn Reporter,
    observer: &dyn RunObserver,
) -> Result<Built, String> {
    let Ready { index, key, fields, inputs } = ready;
    let instance = &recipe.instances[index];
    let events = ObserverLockEvents { observer, name: &instance.name };
    let _lock = if instance.cache {
        let lock = store.lock(&key, &events).map_err(|err| err.to_string())?;
        if let Lookup::Hit(artifact) = store.lookup(&key).map_err(|err| err.to_string())? {
            return Ok(Built { artifact: *artifact, elsewhere: true, staging: None });
        }
        Some(lock)
    } else {
        None
    };
    let staging = store.begin(&key, !instance.cache).map_err(|err| err.to_string())?;
    let started_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
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
        checkpoints: store.checkpoints(&key),
    };
    executor.execute(&job, reporter).map_err(|err| err.to_string())?;
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
        let artifact = store.commit(staging, manifest).map_err(|err| err.to_string())?;
        return Ok(Built { artifact, elsewhere: false, staging: None });
    }
    let files = scan_dir(&staging.out_dir).map_err(|err| err.to_string())?;
    let manifest = Manifest { output_hash: hash_entries(&files), files, ..manifest };
    let artifact = Artifact { key, dir: staging.out_dir.clone(), manifest };
    Ok(Built { artifact, elsewhere: false, staging: Some(staging) })
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
    if !recipe.partial {
        // Stages renamed or removed since: their artifacts may be collected.
        refs.instances.retain(|name, _| recipe.instances.iter().any(|i| &i.name == name));
    }
    for outcome in outcomes.iter().flatten() {
        let ok = matches!(outcome.status, Status::Cached | Status::Ran | Status::BuiltElsewhere);
        if let (true, Some(fields)) = (ok, report.fields.get(&outcome.name)) {
            let entry = RefEntry { key: fields.key().to_hex(), fields: fields.clone() };
            refs.instances.insert(outcome.name.clone(), entry);
        }
    }
    store.save_refs(&recipe.path, &refs)
}
