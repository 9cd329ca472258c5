//! Recipes: the YAML files users write, parsed into typed structs.
//!
//! Parsing happens in two passes over the same text: [`SpanIndex`] records
//! where every node is, and serde_yaml builds the typed [`RecipeFile`]. Any
//! error from the second pass is placed in the source with the first.
//! [`resolve`] then checks everything that needs more than one node at a
//! time (kinds, inputs, params, cycles, variants) and yields the stage
//! instances the scheduler runs.

mod error;
mod interpolate;
mod json_schema;
mod resolve;
mod spans;

use std::sync::Arc;

use indexmap::IndexMap;
use miette::NamedSource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use error::{RecipeError, RecipeErrorKind, did_you_mean};
pub use json_schema::json_schema;
pub use resolve::{
    DEFAULT_VARIANT, InputBinding, LoadOptions, Recipe, StageInstance, gathered_slot,
    gathered_variant, load, project_root, resolve,
};
pub use spans::{NodePath, NodeSpan, SpanIndex};

use crate::schema::EntitySchema;

/// A watchfire recipe: a DAG of stages, shared params and variants.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "watchfire recipe")]
pub struct RecipeFile {
    /// Name shown in plans, summaries and lock files.
    pub name: String,
    /// Global RNG seed. Every stage derives its own seed from it, so one
    /// number pins the randomness of the whole recipe.
    #[serde(default)]
    pub seed: u64,
    /// Shared values that stage params use as `${params.NAME}`; variants
    /// override them.
    #[serde(default)]
    pub params: IndexMap<String, serde_json::Value>,
    /// Entity types, each marked `key` or `peripheral`.
    #[serde(default)]
    pub schema: EntitySchema,
    /// Stage id -> stage. Ids are what inputs, `plan` and `show` use.
    pub stages: IndexMap<String, StageDecl>,
    /// Named overrides of `params`; each expands the recipe into another set
    /// of stages, sharing every stage whose resolved inputs and params are
    /// equal to another variant's.
    #[serde(default)]
    pub variants: IndexMap<String, VariantDecl>,
}

/// One stage of a recipe.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageDecl {
    /// The stage kind, such as `seed`, `scene`, `detail` or `filter`.
    pub kind: String,
    /// Parameters of the kind; strings may use `${params.NAME}`.
    #[serde(default)]
    pub params: IndexMap<String, serde_json::Value>,
    /// Input slot -> source. A source is another stage (`scene`), one output
    /// of it (`scene.templates`), or a project path, which contains a `/` or
    /// starts with `.` (`data/seed.jsonl`, `./seed.jsonl`); paths are relative
    /// to the recipe's folder.
    #[serde(default)]
    pub inputs: IndexMap<String, String>,
    /// What the stage occupies while it runs.
    #[serde(default)]
    pub resources: Resources,
    /// `false` for transient stages: they run every time and are never stored.
    #[serde(default = "yes")]
    pub cache: bool,
}

fn yes() -> bool {
    true
}

/// Scheduler slots a stage takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU slots (out of `-j`).
    #[serde(default = "one")]
    pub cpu: u32,
    /// GPUs.
    #[serde(default)]
    pub gpu: u32,
}

fn one() -> u32 {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Self { cpu: 1, gpu: 0 }
    }
}

/// A variant: fixed overrides, a matrix of them, or both.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VariantDecl {
    /// Param name -> value for this variant.
    #[serde(default)]
    pub params: IndexMap<String, serde_json::Value>,
    /// Param name -> list of values; expands into one variant per
    /// combination, named `VARIANT[a=1,b=2]`.
    #[serde(default)]
    pub matrix: IndexMap<String, Vec<serde_json::Value>>,
}

/// A recipe's text, name and typed form, with the span index that places
/// errors in it.
pub struct ParsedRecipe {
    pub file: RecipeFile,
    pub spans: SpanIndex,
    pub source: NamedSource<Arc<str>>,
}

/// Parses recipe text. `name` is how errors refer to the file.
pub fn parse(text: &str, name: &str) -> Result<ParsedRecipe, RecipeError> {
    // serde_yaml misreads a byte-order mark (as some editors write) as an
    // extra document.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let source = NamedSource::new(name, Arc::<str>::from(text)).with_language("yaml");
    let spans = SpanIndex::build(text);
    if let Some((offset, message)) = spans.syntax_error.clone() {
        let at = offset.min(text.len());
        return Err(RecipeError::new(
            RecipeErrorKind::Syntax,
            &source,
            "the recipe is not valid YAML",
        )
        .label(at..at, message)
        .help("check indentation and quoting around this point"));
    }
    if let Some(dup) = spans.duplicates.first() {
        let name = dup.path.last().cloned().unwrap_or_default();
        let what = if dup.path.len() == 2 && dup.path[0] == "stages" { "stage id" } else { "key" };
        return Err(RecipeError::new(
            RecipeErrorKind::DuplicateId,
            &source,
            format!("duplicate {what} `{name}`"),
        )
        .label(dup.second.clone(), "defined again here")
        .label(dup.first.clone(), "first defined here")
        .help(format!("rename one of them; each {what} must be unique")));
    }
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let file: RecipeFile = serde_path_to_error::deserialize(deserializer)
        .map_err(|err| serde_error(&source, &spans, err))?;
    Ok(ParsedRecipe { file, spans, source })
}

fn serde_error(
    source: &NamedSource<Arc<str>>,
    spans: &SpanIndex,
    err: serde_path_to_error::Error<serde_yaml::Error>,
) -> RecipeError {
    let path: Vec<String> = err.path().iter().map(|seg| seg.to_string()).collect();
    let path: Vec<String> = path.into_iter().filter(|seg| seg != "?").collect();
    let message = err.inner().to_string();
    let message = strip_location(&message);
    placed_serde_error(source, spans, &path, message)
}

/// Turns a serde message about the node at `path` into a recipe error.
pub(crate) fn placed_serde_error(
    source: &NamedSource<Arc<str>>,
    spans: &SpanIndex,
    path: &[String],
    message: &str,
) -> RecipeError {
    if let Some((field, expected)) = unknown_field(message) {
        // serde_path_to_error's path already ends at the unknown key.
        let parent = match path.split_last() {
            Some((last, parent)) if *last == field => parent,
            _ => path,
        };
        let dotted = parent.join(".");
        let mut key_path = parent.to_vec();
        key_path.push(field.clone());
        let where_ =
            if dotted.is_empty() { "the recipe".to_string() } else { format!("`{dotted}`") };
        let err = RecipeError::new(
            RecipeErrorKind::UnknownKey,
            source,
            format!("unknown key `{field}` in {where_}"),
        )
        .label(spans.key_or_value(&key_path), "not a known key");
        let hint = did_you_mean(&field, expected.iter().map(String::as_str));
        return match hint {
            Some(best) => err.help(format!("did you mean `{best}`?")),
            None if expected.is_empty() => err,
            None => err.help(format!("known keys: {}", expected.join(", "))),
        };
    }
    let dotted = path.join(".");
    if let Some(field) = between(message, "missing field `", "`") {
        let at = if path.is_empty() { 0..0 } else { spans.key_or_value(path) };
        return RecipeError::new(
            RecipeErrorKind::Invalid,
            source,
            format!(
                "missing key `{field}`{}",
                if dotted.is_empty() { String::new() } else { format!(" in `{dotted}`") }
            ),
        )
        .label(at, format!("`{field}` is required here"))
        .help(format!("add `{field}:`"));
    }
    RecipeError::new(RecipeErrorKind::Invalid, source, format!("`{dotted}`: {message}"))
        .label(spans.value_or_ancestor(path), message.to_string())
}

/// serde_yaml appends " at line L column C"; the span already says where.
fn strip_location(message: &str) -> &str {
    match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`".
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let field = between(message, "unknown field `", "`")?.to_string();
    let expected = message
        .split_once("expected")
        .map(|(_, rest)| rest.split('`').skip(1).step_by(2).map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default();
    Some((field, expected))
}
