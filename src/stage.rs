//! The stage interface: what a stage kind declares and what it gets when it runs.
//!
//! A stage kind is a Rust type implementing [`Stage`]. It names its typed
//! parameters, the inputs it reads and the files it writes. The runner turns
//! every kind into a [`StageKind`] trait object (see [`registry`]) so a
//! recipe can name it by its `kind` string.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::progress::{Progress, Reporter};
use crate::schema::EntitySchema;

/// One input slot of a stage kind.
#[derive(Debug, Clone, Copy)]
pub struct InputSpec {
    pub name: &'static str,
    pub required: bool,
    pub doc: &'static str,
}

/// A parameter that is out of its allowed range, found after it was parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// Dotted path below the stage's `params`, such as `count` or `weights.fire`.
    pub param: String,
    pub message: String,
    pub help: Option<String>,
}

impl ParamError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { param: param.into(), message: message.into(), help: None }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Range and consistency checks on parameters that their types cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), ParamError> {
        Ok(())
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Bad data in an input file; `line` is 1-based.
    #[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data { file: PathBuf, line: Option<usize>, message: String },
    #[error("input `{0}` was not given")]
    MissingInput(String),
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    pub fn data(file: impl Into<PathBuf>, line: Option<usize>, message: impl Into<String>) -> Self {
        Self::Data { file: file.into(), line, message: message.into() }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
}

impl From<serde_json::Error> for StageError {
    fn from(err: serde_json::Error) -> Self {
        Self::Failed(format!("JSON: {err}"))
    }
}

/// A stage kind, written once per `kind:` a recipe can name.
pub trait Stage: Send + Sync + 'static {
    type Params: DeserializeOwned + Serialize + JsonSchema + Validate + Send + Sync;

    /// The name recipes use in `kind:`.
    const KIND: &'static str;
    /// Bump whenever the stage's output for the same inputs and params changes;
    /// it is part of every cache key, so old artifacts stop being reused.
    const VERSION: u32;
    /// One paragraph for `watchfire` help and the recipe reference.
    const DOC: &'static str;
    const INPUTS: &'static [InputSpec];
    /// File names the stage writes into its output directory. A recipe can
    /// refer to one of them by its stem: `scene.templates` for `templates.jsonl`.
    const OUTPUTS: &'static [&'static str];
    /// Whether the recipe's entity `schema` can change the result (then it is
    /// part of the cache key).
    const USES_SCHEMA: bool = false;
    /// `false` for stages whose bytes may differ between runs on purpose
    /// (GPU training); lock files then compare the `metrics.json` they write
    /// instead of their bytes.
    const DETERMINISTIC: bool = true;
    /// Whether the stage runs a model: its tensor work already spreads over
    /// every core, so the scheduler gives it every CPU slot rather than
    /// running it beside other stages that would only slow it down.
    const USES_ALL_CORES: bool = false;

    fn run(params: &Self::Params, ctx: &StageContext<'_>) -> Result<(), StageError>;

    /// Project paths named inside params (such as a `path:` model source),
    /// as (input slot, path) pairs. The runner binds them like inputs the
    /// recipe wrote, so their content is hashed into the cache key and they
    /// must stay inside the project.
    fn implicit_inputs(_params: &Self::Params) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Checks which input slots the recipe bound against the params, for
    /// optional slots that only some params read (`model` with
    /// `backend: llm`). `bound` names every slot given; the error's `param`
    /// names the slot at fault.
    fn check_inputs(_params: &Self::Params, _bound: &[&str]) -> Result<(), ParamError> {
        Ok(())
    }
}

/// What a running stage can see: its inputs, its output directory, its seed.
pub struct StageContext<'a> {
    /// Stage id in the recipe, for messages.
    pub stage_id: &'a str,
    /// The cache key of this run, as hex; provenance records carry it.
    pub key: &'a str,
    /// Seed for this stage's RNG, derived from the recipe seed and the kind.
    pub seed: u64,
    pub schema: &'a EntitySchema,
    /// Input slot -> resolved path: an artifact directory, one file of an
    /// artifact, or a project file or folder.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// Empty directory the stage writes its outputs into.
    pub out_dir: &'a Path,
    /// Where a long stage keeps checkpoints: it survives a failed or killed
    /// run of the same cache key and is removed once the key is committed.
    /// Created by the stage if it uses it.
    pub checkpoints: &'a Path,
    pub reporter: &'a dyn Reporter,
}

impl StageContext<'_> {
    /// The path bound to an input slot.
    pub fn input(&self, name: &str) -> Result<&Path, StageError> {
        self.inputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| StageError::MissingInput(name.to_string()))
    }

    /// The instances a `STAGE@*` input gathered, one per variant, as
    /// (variant, path) in the order of the variant names.
    pub fn gathered(&self, slot: &str) -> Vec<(&str, &Path)> {
        self.inputs
            .iter()
            .filter_map(|(name, path)| {
                crate::recipe::gathered_variant(name, slot).map(|v| (v, path.as_path()))
            })
            .collect()
    }

    /// The input slot if it was given.
    pub fn optional_input(&self, name: &str) -> Option<&Path> {
        self.inputs.get(name).map(PathBuf::as_path)
    }

    /// A file of an input: the path itself when the input names a file,
    /// otherwise `file` inside the input directory.
    pub fn input_file(&self, name: &str, file: &str) -> Result<PathBuf, StageError> {
        let path = self.input(name)?;
        Ok(if path.is_dir() { path.join(file) } else { path.to_path_buf() })
    }

    /// Where to write one of the kind's declared outputs.
    pub fn output(&self, file: &str) -> PathBuf {
        self.out_dir.join(file)
    }

    /// Tells the user something worth acting on (not an error).
    pub fn notice(&self, message: &str) {
        self.reporter.notice(self.stage_id, message);
    }

    /// A progress handle for a loop over `total` items.
    pub fn progress(&self, total: Option<u64>, unit: &'static str) -> Progress {
        self.reporter.progress(self.stage_id, total, unit)
    }
}

/// A [`Stage`] with its types erased, so kinds can live in one table.
pub trait StageKind: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn doc(&self) -> &'static str;
    fn inputs(&self) -> &'static [InputSpec];
    fn outputs(&self) -> &'static [&'static str];
    fn uses_schema(&self) -> bool;
    fn deterministic(&self) -> bool;
    fn uses_all_cores(&self) -> bool;
    fn params_schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema;
    /// Parses params, checks their ranges and returns them with every
    /// default filled in: the form that goes into the cache key.
    fn resolve_params(&self, params: serde_json::Value) -> Result<serde_json::Value, ParamIssue>;
    fn run(&self, params: &serde_json::Value, ctx: &StageContext<'_>) -> Result<(), StageError>;
    /// See [`Stage::implicit_inputs`]; `params` are resolved params.
    fn implicit_inputs(&self, params: &serde_json::Value) -> Vec<(String, String)>;
    /// See [`Stage::check_inputs`]; `params` are resolved params.
    fn check_inputs(&self, params: &serde_json::Value, bound: &[&str]) -> Result<(), ParamError>;
}

/// A parameter problem, before it is placed in the recipe's source.
#[derive(Debug, Clone)]
pub enum ParamIssue {
    /// Did not deserialize: the path below `params` and serde's message.
    Parse {
        path: Vec<String>,
        message: String,
    },
    Range(ParamError),
}

/// The type-erased form of a [`Stage`]; `stages::ALL` lists one per kind.
pub struct Erased<S>(std::marker::PhantomData<S>);

impl<S> Erased<S> {
    pub const NEW: Self = Self(std::marker::PhantomData);
}

impl<S: Stage> StageKind for Erased<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }

    fn version(&self) -> u32 {
        S::VERSION
    }

    fn doc(&self) -> &'static str {
        S::DOC
    }

    fn inputs(&self) -> &'static [InputSpec] {
        S::INPUTS
    }

    fn outputs(&self) -> &'static [&'static str] {
        S::OUTPUTS
    }

    fn uses_schema(&self) -> bool {
        S::USES_SCHEMA
    }

    fn deterministic(&self) -> bool {
        S::DETERMINISTIC
    }

    fn uses_all_cores(&self) -> bool {
        S::USES_ALL_CORES
    }

    fn params_schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<S::Params>()
    }

    fn resolve_params(&self, params: serde_json::Value) -> Result<serde_json::Value, ParamIssue> {
        let typed: S::Params = serde_path_to_error::deserialize(params).map_err(|err| {
            let path = err.path().iter().map(|seg| seg.to_string()).collect();
            ParamIssue::Parse { path, message: err.inner().to_string() }
        })?;
        typed.validate().map_err(ParamIssue::Range)?;
        serde_json::to_value(&typed)
            .map(crate::cache::canonical)
            .map_err(|err| ParamIssue::Parse { path: Vec::new(), message: err.to_string() })
    }

    fn run(&self, params: &serde_json::Value, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let typed: S::Params = serde_json::from_value(params.clone())?;
        S::run(&typed, ctx)
    }

    fn implicit_inputs(&self, params: &serde_json::Value) -> Vec<(String, String)> {
        serde_json::from_value::<S::Params>(params.clone())
            .map(|typed| S::implicit_inputs(&typed))
            .unwrap_or_default()
    }

    fn check_inputs(&self, params: &serde_json::Value, bound: &[&str]) -> Result<(), ParamError> {
        match serde_json::from_value::<S::Params>(params.clone()) {
            Ok(typed) => S::check_inputs(&typed, bound),
            Err(_) => Ok(()),
        }
    }
}

/// Every stage kind watchfire knows, in the order the reference lists them.
pub fn registry() -> &'static [&'static dyn StageKind] {
    crate::stages::ALL
}

/// Looks a kind up by the name recipes use.
pub fn find_kind(name: &str) -> Option<&'static dyn StageKind> {
    registry().iter().copied().find(|kind| kind.kind() == name)
}
