//! From a parsed recipe to the stage instances that run: kinds looked up,
//! params interpolated and type-checked, inputs bound, cycles rejected,
//! variants expanded and shared.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use miette::NamedSource;
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::Value;

use super::error::{RecipeError, RecipeErrorKind, RecipeErrorKind as K, did_you_mean};
use super::interpolate::Interpolator;
use super::{ParsedRecipe, Resources, SpanIndex, StageDecl, parse, placed_serde_error};
use crate::schema::EntitySchema;
use crate::stage::{ParamError, ParamIssue, StageKind, find_kind, registry};

/// The most variants one matrix may expand into.
pub const MAX_MATRIX: usize = 4096;

/// The variant every recipe has: its own params, unchanged.
pub const DEFAULT_VARIANT: &str = "default";

/// Settings that come from the command line rather than the recipe.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Folders outside the project that recipes may read (real data sets).
    pub data_roots: Vec<PathBuf>,
    /// Only expand these variants (all when empty). A matrix variant is
    /// selected by its own name or by its base name.
    pub variants: Vec<String>,
}

/// A recipe ready to plan and run.
pub struct Recipe {
    pub name: String,
    /// Absolute path of the recipe file.
    pub path: PathBuf,
    /// The folder recipe paths must stay in: the nearest ancestor of the
    /// recipe holding `.git` or `watchfire.toml`, else the recipe's folder.
    pub project_root: PathBuf,
    pub seed: u64,
    pub schema: EntitySchema,
    /// Every stage instance, dependencies before dependents.
    pub instances: Vec<StageInstance>,
    /// Expanded variant names, `default` first (only the selected ones).
    pub variants: Vec<String>,
    /// Whether only some instances were kept (`--variant`, named stages):
    /// then what is missing is elsewhere, not gone.
    pub partial: bool,
    pub source: NamedSource<Arc<str>>,
    pub spans: SpanIndex,
}

/// One stage as it runs: a recipe stage under the params of one or more
/// variants that resolve it identically.
#[derive(Clone)]
pub struct StageInstance {
    /// `scene` when the default variant uses it, else `scene@VARIANT`.
    pub name: String,
    /// The stage id in the recipe.
    pub stage: String,
    /// Variants that share this instance.
    pub variants: Vec<String>,
    pub kind: &'static dyn StageKind,
    /// Params after interpolation, with every default filled in.
    pub params: Value,
    pub inputs: BTreeMap<String, InputBinding>,
    /// Instances this one reads, by index into [`Recipe::instances`].
    pub deps: Vec<usize>,
    pub resources: Resources,
    pub cache: bool,
    /// Whether the instance gathers another stage across variants
    /// (`STAGE@*`): it is shared by every variant and named by its stage id.
    pub gathers: bool,
}

/// The input-slot name under which a gathering stage sees the instance of
/// one variant: `evals[default]`, `evals[lora]`, `evals[sweep[a=1]]`.
pub fn gathered_slot(slot: &str, variant: &str) -> String {
    format!("{slot}[{variant}]")
}

/// The variant of a gathered slot name, when `name` is one for `slot`.
pub fn gathered_variant<'a>(name: &'a str, slot: &str) -> Option<&'a str> {
    name.strip_prefix(slot)?.strip_prefix('[')?.strip_suffix(']')
}

/// What an input slot is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputBinding {
    /// Another instance's artifact, or one file of it.
    Stage { instance: usize, output: Option<String> },
    /// A file or folder; `display` is how the recipe author sees it.
    Path { display: String, abs: PathBuf },
}

impl Recipe {
    /// Keeps only the instances of the named variants. Instance names do
    /// not change: they were given with every variant in view.
    fn select_variants(&mut self, wanted: &[String]) -> Result<(), RecipeError> {
        let matches = variant_matches;
        for want in wanted {
            if !self.variants.iter().any(|name| matches(name, want)) {
                let err = RecipeError::new(
                    RecipeErrorKind::UnknownVariant,
                    &self.source,
                    format!("`{}` has no variant `{want}`", self.name),
                );
                let names = self.variants.iter().map(String::as_str);
                return Err(err.suggest(
                    want,
                    names,
                    format!("variants: {}", self.variants.join(", ")),
                ));
            }
        }
        self.variants.retain(|name| wanted.iter().any(|want| matches(name, want)));
        let selected = self.variants.clone();
        self.retain_where(|instance| instance.variants.iter().any(|v| selected.contains(v)));
        Ok(())
    }

    /// Keeps only the named instances and everything they depend on.
    pub fn retain_with_ancestors(&mut self, names: &[String]) {
        self.retain_where(|instance| names.contains(&instance.name));
    }

    /// Keeps the instances `keep` accepts and everything they depend on;
    /// marks the recipe partial.
    fn retain_where(&mut self, wanted: impl Fn(&StageInstance) -> bool) {
        self.partial = true;
        let mut keep = vec![false; self.instances.len()];
        for (index, instance) in self.instances.iter().enumerate().rev() {
            if wanted(instance) {
                keep[index] = true;
            }
            if keep[index] {
                for &dep in &instance.deps {
                    keep[dep] = true;
                }
            }
        }
        let mut new_index = vec![usize::MAX; keep.len()];
        let mut kept = Vec::new();
        for (index, instance) in std::mem::take(&mut self.instances).into_iter().enumerate() {
            if keep[index] {
                new_index[index] = kept.len();
                kept.push(instance);
            }
        }
        for instance in &mut kept {
            instance.deps.iter_mut().for_each(|dep| *dep = new_index[*dep]);
            for binding in instance.inputs.values_mut() {
                if let InputBinding::Stage { instance: dep, .. } = binding {
                    *dep = new_index[*dep];
                }
            }
        }
        self.instances = kept;
    }
}

/// Reads, parses and resolves the recipe at `path`.
pub fn load(path: &Path, options: &LoadOptions) -> miette::Result<Recipe> {
    let text = fs_err::read_to_string(path).map_err(|err| miette::miette!("{err}"))?;
    // The real path: keys and refs must not depend on the way to the recipe.
    let abs = path.canonicalize().map_err(|err| miette::miette!("{}: {err}", path.display()))?;
    let parsed = parse(&text, &path.display().to_string())?;
    Ok(resolve(parsed, &abs, options)?)
}

/// Checks a parsed recipe against the stage kinds and the file system.
pub fn resolve(
    parsed: ParsedRecipe,
    path: &Path,
    options: &LoadOptions,
) -> Result<Recipe, RecipeError> {
    let recipe_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let project_root = project_root(&recipe_dir);
    let mut ctx = Resolver {
        parsed: &parsed,
        recipe_dir,
        project_root: project_root.clone(),
        roots: allowed_roots(&project_root, &options.data_roots),
        kinds: HashMap::new(),
        instances: Vec::new(),
        by_signature: HashMap::new(),
    };
    ctx.check_names()?;
    ctx.check_kinds()?;

    let variants = ctx.expand_variants()?;
    let gatherers = ctx.gathering_stages()?;
    let mut used_params = BTreeSet::new();
    let mut per_variant = Vec::new();
    for (name, params) in &variants {
        let (used, resolution) = ctx.add_variant(name, params, &gatherers)?;
        used_params.extend(used);
        per_variant.push(resolution);
    }
    ctx.check_variant_params(&used_params)?;
    let wanted = |name: &str| {
        options.variants.is_empty()
            || options.variants.iter().any(|want| variant_matches(name, want))
    };
    per_variant.retain(|resolution| wanted(&resolution.variant));
    ctx.add_gatherers(&gatherers, &per_variant)?;

    let Resolver { instances, .. } = ctx;
    let instances = instances.into_iter().map(named).collect();
    let file = &parsed.file;
    let mut recipe = Recipe {
        name: file.name.clone(),
        path: path.to_path_buf(),
        project_root,
        seed: file.seed,
        schema: file.schema.clone(),
        instances,
        variants: variants.into_iter().map(|(name, _)| name).collect(),
        partial: false,
        source: parsed.source.clone(),
        spans: parsed.spans,
    };
    if !options.variants.is_empty() {
        recipe.select_variants(&options.variants)?;
    }
    Ok(recipe)
}

/// Whether `--variant want` selects variant `name`: by its own name, or a
/// matrix variant by its base name.
fn variant_matches(name: &str, want: &str) -> bool {
    name == want || name.split('[').next() == Some(want)
}

/// Names an instance once every variant has been resolved: the stage id
/// when the default variant uses it, else `stage@first-variant`.
fn named(mut instance: StageInstance) -> StageInstance {
    instance.name = if instance.gathers || instance.variants.iter().any(|v| v == DEFAULT_VARIANT) {
        instance.stage.clone()
    } else {
        format!("{}@{}", instance.stage, instance.variants[0])
    };
    instance
}

struct Resolver<'a> {
    parsed: &'a ParsedRecipe,
    recipe_dir: PathBuf,
    project_root: PathBuf,
    roots: Vec<PathBuf>,
    kinds: HashMap<String, &'static dyn StageKind>,
    instances: Vec<StageInstance>,
    by_signature: HashMap<blake3::Hash, usize>,
}

/// A variant's name and its full params.
type VariantParams = (String, IndexMap<String, Value>);

/// A stage's resolved params and references under one variant.
type Resolved = (Value, IndexMap<String, Reference>);

/// One variant resolved: the instance of each stage, and the gathering
/// stages left for later with their params and references.
struct Resolution {
    variant: String,
    instance_of: HashMap<String, usize>,
    deferred: IndexMap<String, Resolved>,
}

/// An input reference before it is bound.
enum Reference {
    Stage {
        stage: String,
        output: Option<String>,
    },
    /// `STAGE@*` or `STAGE.output@*`: that stage's instance in every variant.
    Gather {
        stage: String,
        output: Option<String>,
    },
    Path(String),
    /// A path named inside params (see `Stage::implicit_inputs`).
    ParamPath(String),
}

impl<'a> Resolver<'a> {
    fn error(&self, kind: K, message: impl Into<String>) -> RecipeError {
        RecipeError::new(kind, &self.parsed.source, message)
    }

    fn spans(&self) -> &'a SpanIndex {
        &self.parsed.spans
    }

    fn stages(&self) -> &'a IndexMap<String, StageDecl> {
        &self.parsed.file.stages
    }

    /// Stage ids and variant names must not clash with the names watchfire
    /// derives from them (`stage.output`, `stage@variant`, `sweep[a=1]`).
    fn check_names(&self) -> Result<(), RecipeError> {
        for id in self.stages().keys() {
            let bad =
                id.is_empty() || id.starts_with('.') || id.contains(['.', '/', '@', '[', ']', ',']);
            if bad {
                let span = self.spans().key_or_value(&["stages", id]);
                return Err(self
                    .error(K::Invalid, format!("`{id}` cannot be a stage id"))
                    .label(span, "invalid stage id")
                    .help("stage ids may not be empty, start with `.`, or contain `. / @ [ ] ,`"));
            }
        }
        for name in self.parsed.file.variants.keys() {
            let bad =
                name == DEFAULT_VARIANT || name.is_empty() || name.contains(['@', '[', ']', ',']);
            if bad {
                let span = self.spans().key_or_value(&["variants", name]);
                return Err(self
                    .error(K::Invalid, format!("`{name}` cannot be a variant name"))
                    .label(span, "invalid variant name")
                    .help(
                        "`default` is the recipe's own params; names may not contain `@ [ ] ,`",
                    ));
            }
        }
        Ok(())
    }

    fn check_kinds(&mut self) -> Result<(), RecipeError> {
        for (id, decl) in self.stages() {
            let Some(kind) = find_kind(&decl.kind) else {
                let names: Vec<&str> = registry().iter().map(|k| k.kind()).collect();
                let err = self
                    .error(K::UnknownKind, format!("stage `{id}` has unknown kind `{}`", decl.kind))
                    .label(self.spans().value_or_ancestor(&["stages", id, "kind"]), "unknown kind");
                let known = format!("known kinds: {}", names.join(", "));
                return Err(err.suggest(&decl.kind, names.iter().copied(), known));
            };
            self.kinds.insert(id.clone(), kind);
        }
        Ok(())
    }

    /// Variant name -> its full params, `default` first.
    fn expand_variants(&self) -> Result<Vec<VariantParams>, RecipeError> {
        let base = &self.parsed.file.params;
        let mut out = vec![(DEFAULT_VARIANT.to_string(), base.clone())];
        for (name, decl) in &self.parsed.file.variants {
            for key in decl.params.keys().chain(decl.matrix.keys()) {
                let section = if decl.params.contains_key(key) { "params" } else { "matrix" };
                if !base.contains_key(key) {
                    let span = self.spans().key_or_value(&["variants", name, section, key]);
                    return Err(self
                        .error(K::UnknownVariantParam, format!("variant `{name}` overrides `{key}`, which the recipe does not declare"))
                        .label(span, "not in the recipe's `params`")
                        .suggest(
                            key,
                            base.keys().map(String::as_str),
                            format!("declare `{key}` under the top-level `params` first"),
                        ));
                }
            }
            let size = decl.matrix.values().try_fold(1usize, |n, v| n.checked_mul(v.len()));
            if size.is_none_or(|n| n > MAX_MATRIX) {
                let span = self.spans().key_or_value(&["variants", name, "matrix"]);
                return Err(self
                    .error(K::Invalid, format!("the matrix of variant `{name}` is too large"))
                    .label(span, format!("expands into more than {MAX_MATRIX} variants"))
                    .help("split it into several variants, or sweep fewer values at once"));
            }
            let mut combos: Vec<(Vec<String>, IndexMap<String, Value>)> =
                vec![(Vec::new(), decl.params.clone())];
            for (key, values) in &decl.matrix {
                if values.is_empty() {
                    let span = self.spans().value_or_ancestor(&["variants", name, "matrix", key]);
                    return Err(self
                        .error(
                            K::Invalid,
                            format!("matrix param `{key}` of variant `{name}` has no values"),
                        )
                        .label(span, "empty list")
                        .help("give at least one value"));
                }
                combos = combos
                    .into_iter()
                    .flat_map(|(label, params)| {
                        values.iter().map(move |value| {
                            let mut label = label.clone();
                            label.push(format!("{key}={}", short(value)));
                            let mut params = params.clone();
                            params.insert(key.clone(), value.clone());
                            (label, params)
                        })
                    })
                    .collect();
            }
            for (label, overrides) in combos {
                let full = if label.is_empty() {
                    name.clone()
                } else {
                    format!("{name}[{}]", label.join(","))
                };
                let mut params = base.clone();
                params.extend(overrides);
                out.push((full, params));
            }
        }
        Ok(out)
    }

    fn check_variant_params(&self, used: &BTreeSet<String>) -> Result<(), RecipeError> {
        for (name, decl) in &self.parsed.file.variants {
            let keys = decl
                .params
                .keys()
                .map(|k| ("params", k))
                .chain(decl.matrix.keys().map(|k| ("matrix", k)));
            for (section, key) in keys {
                if !used.contains(key) {
                    let span = self.spans().key_or_value(&["variants", name, section, key]);
                    return Err(self
                        .error(
                            K::UnusedVariantParam,
                            format!("variant `{name}` overrides `{key}`, but no stage reads it"),
                        )
                        .label(span, "this override changes nothing")
                        .help(format!(
                            "use `${{params.{key}}}` in a stage's params, or drop the override"
                        )));
                }
            }
        }
        Ok(())
    }

    /// Resolves every stage under one variant's params. Stages that gather
    /// across variants are only resolved here (their params and references
    /// under this variant); [`Resolver::add_gatherers`] makes their instances
    /// once every variant is known.
    fn add_variant(
        &mut self,
        variant: &str,
        params: &IndexMap<String, Value>,
        gatherers: &BTreeSet<String>,
    ) -> Result<(BTreeSet<String>, Resolution), RecipeError> {
        let mut interp = Interpolator::new(params);
        let mut resolved: IndexMap<String, Resolved> = IndexMap::new();
        let mut deferred: IndexMap<String, Resolved> = IndexMap::new();
        for (id, decl) in self.stages() {
            let stage_params = self.stage_params(&mut interp, id, decl)?;
            let mut refs = self.stage_refs(&mut interp, id, decl)?;
            for (slot, path) in self.kinds[id].implicit_inputs(&stage_params) {
                refs.entry(slot).or_insert(Reference::ParamPath(path));
            }
            let bound: Vec<&str> = refs.keys().map(String::as_str).collect();
            if let Err(err) = self.kinds[id].check_inputs(&stage_params, &bound) {
                return Err(self.input_error(id, &bound, err));
            }
            let side = if gatherers.contains(id) { &mut deferred } else { &mut resolved };
            side.insert(id.clone(), (stage_params, refs));
        }
        let order = self.topological_order(&resolved)?;

        let mut instance_of: HashMap<String, usize> = HashMap::new();
        for id in order {
            let (params, refs) = &resolved[&id];
            let mut inputs = BTreeMap::new();
            for (slot, reference) in refs {
                let binding = self.bind(&id, slot, reference, &instance_of)?;
                inputs.insert(slot.clone(), binding);
            }
            let index = self.intern(&id, variant, params.clone(), inputs);
            instance_of.insert(id, index);
        }
        let resolution = Resolution { variant: variant.to_string(), instance_of, deferred };
        Ok((interp.used, resolution))
    }

    /// The binding of one non-gathering reference, given the instances of
    /// the stages it may name.
    fn bind(
        &self,
        id: &str,
        slot: &str,
        reference: &Reference,
        instance_of: &HashMap<String, usize>,
    ) -> Result<InputBinding, RecipeError> {
        match reference {
            Reference::Stage { stage, output } | Reference::Gather { stage, output } => {
                let file = output.as_ref().map(|stem| self.output_file(stage, stem));
                Ok(InputBinding::Stage { instance: instance_of[stage], output: file })
            }
            Reference::Path(path) => self.bind_path(id, slot, path, "inputs"),
            Reference::ParamPath(path) => self.bind_path(id, slot, path, "params"),
        }
    }

    /// Stages with an input `STAGE@*`. No stage may read one of them: a
    /// gathering stage is shared by every variant, so it sits at the end of
    /// the graph.
    fn gathering_stages(&self) -> Result<BTreeSet<String>, RecipeError> {
        let gathers = |text: &str| {
            let stem = text.trim_end().strip_suffix("@*");
            stem.is_some_and(|stem| !stem.contains('/') && !stem.starts_with('.'))
        };
        let gatherers: BTreeSet<String> = self
            .stages()
            .iter()
            .filter(|(_, decl)| decl.inputs.values().any(|text| gathers(text)))
            .map(|(id, _)| id.clone())
            .collect();
        for (id, decl) in self.stages() {
            for (slot, text) in &decl.inputs {
                let target = text.trim_end().trim_end_matches("@*");
                let target = target.split('.').next().unwrap_or(target);
                if gatherers.contains(target) {
                    let span = self.spans().value_or_ancestor(&["stages", id, "inputs", slot]);
                    return Err(self
                        .error(
                            K::Invalid,
                            format!("stage `{id}` reads `{target}`, which gathers across variants"),
                        )
                        .label(span, "reads a gathering stage")
                        .help(format!(
                            "`{target}` is shared by every variant and must be a final stage; \
                             read what it gathers instead"
                        )));
                }
            }
        }
        Ok(gatherers)
    }

    /// Makes the one instance of each gathering stage: its `STAGE@*` slots
    /// bound once per variant (as `slot[variant]`), its other inputs as in
    /// the first variant. Its params must not depend on the variant.
    fn add_gatherers(
        &mut self,
        gatherers: &BTreeSet<String>,
        per_variant: &[Resolution],
    ) -> Result<(), RecipeError> {
        let Some(first) = per_variant.first() else {
            return Ok(());
        };
        let ids: Vec<&String> = self.stages().keys().filter(|id| gatherers.contains(*id)).collect();
        for id in ids {
            let (params, refs) = &first.deferred[id];
            if let Some(Resolution { variant, .. }) =
                per_variant.iter().find(|r| r.deferred[id].0 != *params)
            {
                let span = self.spans().key_or_value(&["stages", id, "params"]);
                return Err(self
                    .error(
                        K::Invalid,
                        format!("the params of `{id}` differ in variant `{variant}`"),
                    )
                    .label(span, "read under every variant")
                    .help(
                        "a stage that gathers across variants runs once; keep variant params \
                           out of its params",
                    ));
            }
            let mut inputs = BTreeMap::new();
            for (slot, reference) in refs {
                let Reference::Gather { .. } = reference else {
                    inputs
                        .insert(slot.clone(), self.bind(id, slot, reference, &first.instance_of)?);
                    continue;
                };
                for resolution in per_variant {
                    let binding = self.bind(id, slot, reference, &resolution.instance_of)?;
                    inputs.insert(gathered_slot(slot, &resolution.variant), binding);
                }
            }
            let index = self.intern(id, &first.variant, params.clone(), inputs);
            let instance = &mut self.instances[index];
            instance.gathers = true;
            instance.variants = per_variant.iter().map(|r| r.variant.clone()).collect();
        }
        Ok(())
    }

    fn stage_params(
        &self,
        interp: &mut Interpolator,
        id: &str,
        decl: &StageDecl,
    ) -> Result<Value, RecipeError> {
        let mut map = serde_json::Map::new();
        for (key, value) in &decl.params {
            let value = interp.value(value).map_err(|(below, err)| {
                let mut path =
                    vec!["stages".to_string(), id.to_string(), "params".to_string(), key.clone()];
                path.extend(below);
                self.error(
                    K::UnknownInterpolation,
                    format!("unknown interpolation `{}` in stage `{id}`", err.reference),
                )
                .label(self.spans().value_or_ancestor(&path), "names nothing")
                .help(interpolation_help(interp))
            })?;
            map.insert(key.clone(), value);
        }
        let kind = self.kinds[id];
        kind.resolve_params(Value::Object(map)).map_err(|issue| self.param_error(id, issue))
    }

    fn param_error(&self, id: &str, issue: ParamIssue) -> RecipeError {
        let base = ["stages", id, "params"].map(String::from).to_vec();
        match issue {
            ParamIssue::Parse { path, message } => {
                let mut full = base.clone();
                full.extend(path.iter().filter(|seg| *seg != "?").cloned());
                let mut err =
                    placed_serde_error(&self.parsed.source, self.spans(), &full, &message);
                if err.kind == K::Invalid && !path.is_empty() {
                    err.kind = K::ParamType;
                    err.message = format!("param `{}` of stage `{id}`: {message}", path.join("."));
                }
                err
            }
            ParamIssue::Range(range) => {
                let mut full = base;
                full.extend(range.param.split('.').map(String::from));
                let err = self
                    .error(
                        K::ParamRange,
                        format!("param `{}` of stage `{id}` {}", range.param, range.message),
                    )
                    .label(self.spans().value_or_ancestor(&full), range.message.clone());
                match range.help {
                    Some(help) => err.help(help),
                    None => err.help("see `watchfire kinds` for each param's allowed values"),
                }
            }
        }
    }

    /// An input slot that the params need but the recipe did not bind, or
    /// that the recipe bound but the params do not read.
    fn input_error(&self, id: &str, bound: &[&str], err: ParamError) -> RecipeError {
        let slot = err.param.as_str();
        if bound.contains(&slot) {
            let span = self.spans().key_or_value(&["stages", id, "inputs", slot]);
            self.error(K::Invalid, format!("stage `{id}` does not read input `{slot}`"))
                .label(span, err.message.clone())
                .help(err.help.clone().unwrap_or_else(|| format!("drop the `{slot}` input")))
        } else {
            let span = self.spans().key_or_value(&["stages", id]);
            self.error(K::MissingInput, format!("stage `{id}` needs input `{slot}`"))
                .label(span, format!("{}; no `{slot}` under `inputs`", err.message))
                .help(
                    err.help
                        .clone()
                        .unwrap_or_else(|| format!("add `inputs: {{ {slot}: STAGE_OR_PATH }}`")),
                )
        }
    }

    fn stage_refs(
        &self,
        interp: &mut Interpolator,
        id: &str,
        decl: &StageDecl,
    ) -> Result<IndexMap<String, Reference>, RecipeError> {
        let kind = self.kinds[id];
        let slots: Vec<&str> = kind.inputs().iter().map(|spec| spec.name).collect();
        let mut out = IndexMap::new();
        for (slot, text) in &decl.inputs {
            let path = ["stages", id, "inputs", slot.as_str()];
            if !slots.contains(&slot.as_str()) {
                let err = self
                    .error(
                        K::UnknownInputSlot,
                        format!("stage `{id}` (kind `{}`) has no input `{slot}`", kind.kind()),
                    )
                    .label(self.spans().key_or_value(&path), "unknown input");
                let known = format!("inputs of `{}`: {}", kind.kind(), slots.join(", "));
                return Err(err.suggest(slot, slots.iter().copied(), known));
            }
            let text = match interp.string(text) {
                Ok(Value::String(s)) => s,
                Ok(other) => other.to_string(),
                Err(err) => {
                    return Err(self
                        .error(
                            K::UnknownInterpolation,
                            format!("unknown interpolation `{}` in stage `{id}`", err.reference),
                        )
                        .label(self.spans().value_or_ancestor(&path), "names nothing")
                        .help(interpolation_help(interp)));
                }
            };
            out.insert(slot.clone(), self.parse_reference(id, slot, &text)?);
        }
        for spec in kind.inputs().iter().filter(|spec| spec.required) {
            if !out.contains_key(spec.name) {
                let span = self.spans().key_or_value(&["stages", id]);
                return Err(self
                    .error(K::MissingInput, format!("stage `{id}` needs input `{}`", spec.name))
                    .label(span, format!("no `{}` under `inputs`", spec.name))
                    .help(format!(
                        "add `inputs: {{ {}: STAGE_OR_PATH }}` ({})",
                        spec.name, spec.doc
                    )));
            }
        }
        Ok(out)
    }

    fn parse_reference(&self, id: &str, slot: &str, text: &str) -> Result<Reference, RecipeError> {
        if let Some(stage) = text.trim_end().strip_suffix("@*") {
            return match self.parse_reference(id, slot, stage)? {
                Reference::Stage { stage, output } => Ok(Reference::Gather { stage, output }),
                _ => Err(self
                    .error(
                        K::Invalid,
                        format!("input `{slot}` of stage `{id}`: `@*` follows a path"),
                    )
                    .label(
                        self.spans().value_or_ancestor(&["stages", id, "inputs", slot]),
                        "not a stage",
                    )
                    .help("`STAGE@*` gathers a stage across variants; a path has no variants")),
            };
        }
        if text.contains('/') || text.starts_with('.') {
            return Ok(Reference::Path(text.to_string()));
        }
        let (stage, output) = match text.split_once('.') {
            Some((stage, output)) => (stage, Some(output)),
            None => (text, None),
        };
        let span = self.spans().value_or_ancestor(&["stages", id, "inputs", slot]);
        let Some(kind) = self.kinds.get(stage) else {
            let err = self
                .error(
                    K::DanglingInput,
                    format!("input `{slot}` of stage `{id}` names `{stage}`, which is not a stage"),
                )
                .label(span, "no such stage");
            let ids = self.stages().keys().map(String::as_str);
            return Err(err.suggest(
                stage,
                ids,
                "a project path must contain `/` or start with `.`",
            ));
        };
        if let Some(output) = output {
            let stems: Vec<&str> = kind.outputs().iter().map(|file| stem(file)).collect();
            if !stems.contains(&output) {
                let err = self
                    .error(
                        K::DanglingInput,
                        format!(
                            "stage `{stage}` (kind `{}`) has no output `{output}`",
                            kind.kind()
                        ),
                    )
                    .label(span, "no such output");
                return Err(match did_you_mean(output, stems.iter().copied()) {
                    Some(best) => err.help(format!("did you mean `{stage}.{best}`?")),
                    None => err.help(format!("outputs of `{}`: {}", kind.kind(), stems.join(", "))),
                });
            }
        }
        Ok(Reference::Stage { stage: stage.to_string(), output: output.map(str::to_string) })
    }

    fn output_file(&self, stage: &str, output_stem: &str) -> String {
        let kind = self.kinds[stage];
        let file = kind.outputs().iter().find(|file| stem(file) == output_stem);
        file.map(|f| f.to_string()).unwrap_or_else(|| output_stem.to_string())
    }

    /// Binds a project path; `section` (`inputs` or `params`) is where the
    /// recipe wrote it, for the error span.
    fn bind_path(
        &self,
        id: &str,
        slot: &str,
        text: &str,
        section: &str,
    ) -> Result<InputBinding, RecipeError> {
        let span = self.spans().value_or_ancestor(&["stages", id, section, slot]);
        let joined = normalize(&self.recipe_dir.join(text));
        let Ok(real) = joined.canonicalize() else {
            return Err(self
                .error(
                    K::FileNotFound,
                    format!("input `{slot}` of stage `{id}`: `{text}` does not exist"),
                )
                .label(span, "no such file or folder")
                .help(format!(
                    "paths are relative to the recipe's folder `{}`",
                    self.recipe_dir.display()
                )));
        };
        if !self.roots.iter().any(|root| real.starts_with(root)) {
            return Err(self
                .error(
                    K::PathEscapes,
                    format!("input `{slot}` of stage `{id}`: `{text}` is outside the project"),
                )
                .label(span, "leaves the project folder")
                .help(format!(
                    "recipes may only read inside `{}`; allow a data folder with `--data-root DIR`",
                    self.project_root.display()
                )));
        }
        if let Some(link) = self.link_out_of_roots(&real) {
            return Err(self
                .error(
                    K::PathEscapes,
                    format!("input `{slot}` of stage `{id}`: `{text}` links outside the project"),
                )
                .label(span, format!("`{}` points outside", link.display()))
                .help(
                    "copy the file into the project, or allow its folder with `--data-root DIR`",
                ));
        }
        // Shown and hashed relative to the project, so keys do not depend
        // on where the project is checked out.
        let display = match real.strip_prefix(&self.project_root) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".to_string(),
            Ok(rel) => rel.to_string_lossy().replace('\\', "/"),
            Err(_) => text.to_string(),
        };
        Ok(InputBinding::Path { display, abs: real })
    }

    /// A symbolic link inside folder `dir` whose target leaves every root.
    fn link_out_of_roots(&self, dir: &Path) -> Option<PathBuf> {
        if !dir.is_dir() {
            return None;
        }
        walkdir::WalkDir::new(dir).into_iter().flatten().find_map(|entry| {
            if !entry.path_is_symlink() {
                return None;
            }
            let target = entry.path().canonicalize().ok()?;
            let inside = self.roots.iter().any(|root| target.starts_with(root));
            (!inside).then(|| entry.path().to_path_buf())
        })
    }

    fn topological_order(
        &self,
        resolved: &IndexMap<String, Resolved>,
    ) -> Result<Vec<String>, RecipeError> {
        let mut graph: DiGraph<&str, &str> = DiGraph::new();
        let nodes: IndexMap<&str, NodeIndex> =
            resolved.keys().map(|id| (id.as_str(), graph.add_node(id.as_str()))).collect();
        for (id, (_, refs)) in resolved {
            for (slot, reference) in refs {
                if let Reference::Stage { stage, .. } = reference {
                    graph.add_edge(nodes[stage.as_str()], nodes[id.as_str()], slot.as_str());
                }
            }
        }
        match petgraph::algo::toposort(&graph, None) {
            Ok(order) => Ok(order.into_iter().map(|n| graph[n].to_string()).collect()),
            Err(cycle) => Err(self.cycle_error(&graph, cycle.node_id())),
        }
    }

    fn cycle_error(&self, graph: &DiGraph<&str, &str>, start: NodeIndex) -> RecipeError {
        let path = find_cycle(graph, start);
        let names: Vec<&str> = path.iter().map(|&n| graph[n]).collect();
        let mut shown = names.clone();
        shown.push(names[0]);
        let mut err = self.error(K::Cycle, format!("stages form a cycle: {}", shown.join(" -> ")));
        for (i, &node) in path.iter().enumerate() {
            let from = graph[node];
            let to_node = path[(i + 1) % path.len()];
            let edge = graph.find_edge(node, to_node).map(|e| graph[e]).unwrap_or("?");
            let span = self.spans().value_or_ancestor(&["stages", graph[to_node], "inputs", edge]);
            err = err.label(span, format!("`{}` reads `{from}`", graph[to_node]));
        }
        err.help("a stage cannot depend on its own output; break the loop by removing one of these inputs")
    }

    /// Shares instances across variants: same stage, params and inputs.
    fn intern(
        &mut self,
        id: &str,
        variant: &str,
        params: Value,
        inputs: BTreeMap<String, InputBinding>,
    ) -> usize {
        let signature = signature(id, &params, &inputs);
        if let Some(&index) = self.by_signature.get(&signature) {
            self.instances[index].variants.push(variant.to_string());
            return index;
        }
        let decl = &self.stages()[id];
        let mut deps: Vec<usize> = inputs
            .values()
            .filter_map(|b| match b {
                InputBinding::Stage { instance, .. } => Some(*instance),
                InputBinding::Path { .. } => None,
            })
            .collect();
        deps.sort_unstable();
        deps.dedup();
        let instance = StageInstance {
            name: id.to_string(),
            stage: id.to_string(),
            variants: vec![variant.to_string()],
            kind: self.kinds[id],
            params,
            inputs,
            deps,
            resources: decl.resources,
            cache: decl.cache,
            gathers: false,
        };
        self.instances.push(instance);
        let index = self.instances.len() - 1;
        self.by_signature.insert(signature, index);
        index
    }
}

fn signature(id: &str, params: &Value, inputs: &BTreeMap<String, InputBinding>) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(id.as_bytes()).update(&[0]);
    hasher.update(params.to_string().as_bytes()).update(&[0]);
    for (slot, binding) in inputs {
        hasher.update(slot.as_bytes()).update(&[0]);
        match binding {
            InputBinding::Stage { instance, output } => {
                hasher.update(format!("stage:{instance}:{output:?}").as_bytes());
            }
            InputBinding::Path { abs, .. } => {
                hasher.update(format!("path:{}", abs.display()).as_bytes());
            }
        }
        hasher.update(&[0]);
    }
    hasher.finalize()
}

/// A cycle through `start`, as found by a depth-first walk.
fn find_cycle(graph: &DiGraph<&str, &str>, start: NodeIndex) -> Vec<NodeIndex> {
    fn walk(
        graph: &DiGraph<&str, &str>,
        node: NodeIndex,
        start: NodeIndex,
        path: &mut Vec<NodeIndex>,
        seen: &mut BTreeSet<NodeIndex>,
    ) -> bool {
        path.push(node);
        for next in graph.neighbors(node) {
            if next == start {
                return true;
            }
            if seen.insert(next) && walk(graph, next, start, path, seen) {
                return true;
            }
        }
        path.pop();
        false
    }
    // toposort names a node on a cycle or one downstream of it; look from
    // each strongly connected component that really loops.
    for component in petgraph::algo::tarjan_scc(graph) {
        let loops = component.len() > 1 || graph.find_edge(component[0], component[0]).is_some();
        if loops {
            let first = *component.iter().min().unwrap_or(&start);
            let mut path = Vec::new();
            if walk(graph, first, first, &mut path, &mut BTreeSet::from([first])) {
                let mut ordered = path;
                let names_first = ordered.iter().position(|&n| n == first).unwrap_or(0);
                ordered.rotate_left(names_first);
                return ordered;
            }
        }
    }
    vec![start]
}

fn interpolation_help(interp: &Interpolator) -> String {
    if interp.params.is_empty() {
        "the recipe declares no `params`; only `${params.NAME}` is supported".to_string()
    } else {
        let names: Vec<String> =
            interp.params.keys().map(|k| format!("`${{params.{k}}}`")).collect();
        format!("available: {}", names.join(", "))
    }
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn stem(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// The project a recipe belongs to: the nearest folder up from it holding
/// `.git` or `watchfire.toml`, else the recipe's own folder.
pub fn project_root(recipe_dir: &Path) -> PathBuf {
    let start = recipe_dir.canonicalize().unwrap_or_else(|_| recipe_dir.to_path_buf());
    start
        .ancestors()
        .find(|dir| dir.join(".git").exists() || dir.join("watchfire.toml").exists())
        .unwrap_or(&start)
        .to_path_buf()
}

fn allowed_roots(project_root: &Path, data_roots: &[PathBuf]) -> Vec<PathBuf> {
    std::iter::once(project_root.to_path_buf())
        .chain(data_roots.iter().map(|root| root.canonicalize().unwrap_or_else(|_| root.clone())))
        .collect()
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
