//! Recipe errors as the user meets them: one test per `RecipeErrorKind`, each
//! asserting the kind, the source text under the primary label and the help
//! line; then mangled recipes, which must give errors and never panics.

use std::fs;
use std::path::{Path, PathBuf};

use miette::{GraphicalReportHandler, GraphicalTheme};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;
use watchfire::recipe::{
    InputBinding, LoadOptions, Recipe, RecipeError, RecipeErrorKind as K, parse, resolve,
};

/// A small valid recipe; most tests change one thing in it with [`edit`].
const BASE: &str = "\
name: base
params:
  records: 10
stages:
  seed:
    kind: seed
    inputs:
      data: data/seed.jsonl
  scene:
    kind: scene
    params:
      templates_per_scene: 5
    inputs:
      seed: seed
  detail:
    kind: detail
    params:
      count: ${params.records}
    inputs:
      templates: scene.templates
      seed: seed.records
";

/// A temporary project: `watchfire.toml`, `data/seed.jsonl`, and a recipe
/// at `recipe.yaml` (never written: resolution only needs its path).
struct Project {
    dir: TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let project = Self { dir };
        project.write("watchfire.toml", "");
        project.write("data/seed.jsonl", "{}\n");
        project
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, text).expect("write");
    }

    fn resolve(&self, yaml: &str) -> Result<Recipe, RecipeError> {
        self.resolve_with(yaml, &LoadOptions::default())
    }

    fn resolve_with(&self, yaml: &str, options: &LoadOptions) -> Result<Recipe, RecipeError> {
        resolve_at(yaml, &self.path("recipe.yaml"), options)
    }
}

fn resolve_at(yaml: &str, path: &Path, options: &LoadOptions) -> Result<Recipe, RecipeError> {
    let parsed = parse(yaml, "recipe.yaml")?;
    resolve(parsed, path, options)
}

/// `BASE` with the first `from` replaced by `to`.
fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "`{from}` is not in the base recipe");
    BASE.replacen(from, to, 1)
}

fn error(yaml: &str) -> RecipeError {
    match Project::new().resolve(yaml) {
        Ok(_) => panic!("recipe resolved, expected an error:\n{yaml}"),
        Err(err) => err,
    }
}

/// Checks the kind, the text under the primary label and the help line.
#[track_caller]
fn check(err: &RecipeError, kind: K, spanned: &str, help: Option<&str>) {
    assert_eq!(err.kind, kind, "wrong kind for: {err}");
    assert_eq!(err.spanned_text().as_deref(), Some(spanned), "primary span of: {err}");
    match help {
        Some(want) => {
            let got = err.help_text().unwrap_or_else(|| panic!("no help on: {err}"));
            assert!(got.contains(want), "help `{got}` lacks `{want}`");
        }
        None => assert!(err.help_text().is_some(), "no help on: {err}"),
    }
}

fn render(err: &RecipeError) -> String {
    let handler =
        GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(120);
    let mut out = String::new();
    handler.render_report(&mut out, err).expect("render");
    out
}

#[test]
fn base_recipe_resolves() {
    let recipe = Project::new().resolve(BASE).expect("base recipe");
    let names: Vec<&str> = recipe.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["seed", "scene", "detail"]);
}

#[test]
fn yaml_syntax_error() {
    let yaml = edit("    kind: scene\n", "    kind: [scene\n");
    let err = error(&yaml);
    assert_eq!(err.kind, K::Syntax);
    assert!(err.span().is_some_and(|span| span.start <= yaml.len()));
    assert!(err.help_text().is_some());
}

#[test]
fn unknown_top_level_key() {
    let err = error(&edit("params:", "parms:"));
    check(&err, K::UnknownKey, "parms", Some("did you mean `params`?"));
    assert_eq!(err.message, "unknown key `parms` in the recipe");
}

#[test]
fn byte_order_mark_is_ignored() {
    Project::new().resolve(&format!("\u{feff}{BASE}")).expect("recipe with a BOM");
    let err = error(&format!("\u{feff}{}", edit("    kind: scene", "    knid: scene")));
    check(&err, K::UnknownKey, "knid", Some("did you mean `kind`?"));
}

#[test]
fn unknown_stage_key() {
    let err = error(&edit("    kind: scene", "    knid: scene"));
    check(&err, K::UnknownKey, "knid", Some("did you mean `kind`?"));
    assert_eq!(err.message, "unknown key `knid` in `stages.scene`");
}

#[test]
fn missing_required_key() {
    let err = error(&edit("name: base\n", ""));
    assert_eq!(err.kind, K::Invalid);
    assert!(err.message.contains("`name`"), "{}", err.message);
    assert_eq!(err.help_text(), Some("add `name:`"));
}

#[test]
fn unknown_param_of_a_kind() {
    let err = error(&edit("templates_per_scene", "templates_per_scen"));
    check(&err, K::UnknownKey, "templates_per_scen", Some("did you mean `templates_per_scene`?"));
    assert_eq!(err.message, "unknown key `templates_per_scen` in `stages.scene.params`");
}

#[test]
fn unknown_stage_kind() {
    let err = error(&edit("kind: scene", "kind: scenes"));
    check(&err, K::UnknownKind, "scenes", Some("did you mean `scene`?"));
}

#[test]
fn unknown_stage_kind_far_from_any() {
    let err = error(&edit("kind: scene", "kind: tokenizer"));
    check(&err, K::UnknownKind, "tokenizer", Some("known kinds: seed, scene"));
}

#[test]
fn missing_required_input() {
    let err = error(&edit("      seed: seed.records\n", ""));
    check(&err, K::MissingInput, "detail", Some("add `inputs: { seed:"));
    assert!(err.message.contains("needs input `seed`"), "{}", err.message);
}

#[test]
fn unknown_input_slot() {
    let err = error(&edit("templates: scene.templates", "template: scene.templates"));
    check(&err, K::UnknownInputSlot, "template", Some("did you mean `templates`?"));
}

#[test]
fn input_names_a_missing_stage() {
    let err = error(&edit("seed: seed.records", "seed: sead.records"));
    check(&err, K::DanglingInput, "sead.records", Some("did you mean `seed`?"));
}

#[test]
fn input_names_a_missing_output() {
    let err = error(&edit("scene.templates", "scene.template"));
    check(&err, K::DanglingInput, "scene.template", Some("did you mean `scene.templates`?"));
    assert!(err.message.contains("no output `template`"), "{}", err.message);
}

#[test]
fn param_of_the_wrong_type() {
    let err = error(&edit("templates_per_scene: 5", "templates_per_scene: many"));
    assert_eq!(err.kind, K::ParamType);
    assert_eq!(err.spanned_text().as_deref(), Some("many"));
    assert!(err.message.contains("templates_per_scene"), "{}", err.message);
}

#[test]
fn interpolated_param_of_the_wrong_type() {
    let err = error(&edit("records: 10", "records: lots"));
    assert_eq!(err.kind, K::ParamType);
    assert_eq!(err.spanned_text().as_deref(), Some("${params.records}"));
}

#[test]
fn param_out_of_range() {
    let err = error(&edit("templates_per_scene: 5", "templates_per_scene: 0"));
    check(&err, K::ParamRange, "0", None);
    assert!(err.message.contains("between 1 and 100000"), "{}", err.message);
}

#[test]
fn param_out_of_range_with_its_own_help() {
    let yaml = edit("      count:", "      dp_epsilon: -1\n      count:");
    let err = error(&yaml);
    check(&err, K::ParamRange, "-1", Some("1.0 is a common choice"));
}

#[test]
fn interpolated_param_out_of_range() {
    let err = error(&edit("records: 10", "records: 0"));
    check(&err, K::ParamRange, "${params.records}", None);
}

#[test]
fn unknown_param_interpolation() {
    let err = error(&edit("${params.records}", "${params.nope}"));
    check(&err, K::UnknownInterpolation, "${params.nope}", Some("`${params.records}`"));
    assert!(err.message.contains("${params.nope}"), "{}", err.message);
}

#[test]
fn env_interpolation_is_unknown() {
    let err = error(&edit("${params.records}", "${env.X}"));
    check(&err, K::UnknownInterpolation, "${env.X}", Some("available:"));
}

#[test]
fn interpolation_in_an_input() {
    let err = error(&edit("seed: seed.records", "seed: ${params.src}"));
    check(&err, K::UnknownInterpolation, "${params.src}", None);
}

#[test]
fn duplicate_stage_id() {
    let yaml = format!("{BASE}  scene:\n    kind: scene\n");
    let err = error(&yaml);
    check(&err, K::DuplicateId, "scene", None);
    let labels = err.labels();
    assert_eq!(labels.len(), 2);
    let (second, first) = (&labels[0].0, &labels[1].0);
    assert_eq!(second.start, yaml.rfind("  scene:").unwrap() + 2);
    assert_eq!(first.start, yaml.find("  scene:").unwrap() + 2);
    assert!(err.message.contains("duplicate stage id `scene`"), "{}", err.message);
}

#[test]
fn three_stage_cycle() {
    let yaml = "\
name: loop
stages:
  a:
    kind: scene
    inputs: {seed: c}
  b:
    kind: scene
    inputs: {seed: a}
  c:
    kind: scene
    inputs: {seed: b}
";
    let err = error(yaml);
    assert_eq!(err.kind, K::Cycle);
    assert_eq!(err.message, "stages form a cycle: a -> b -> c -> a");
    let mut edges: Vec<(String, &str)> = err
        .labels()
        .iter()
        .map(|(span, label)| (yaml[span.clone()].to_string(), label.as_str()))
        .collect();
    edges.sort();
    assert_eq!(
        edges,
        [
            ("a".to_string(), "`b` reads `a`"),
            ("b".to_string(), "`c` reads `b`"),
            ("c".to_string(), "`a` reads `c`"),
        ]
    );
    assert!(err.help_text().is_some());
}

#[test]
fn stage_reading_itself() {
    let err = error("name: x\nstages:\n  a:\n    kind: scene\n    inputs: {seed: a}\n");
    assert_eq!(err.kind, K::Cycle);
    assert_eq!(err.labels().len(), 1);
    assert_eq!(err.spanned_text().as_deref(), Some("a"));
}

#[test]
fn variant_overrides_a_param_nobody_reads() {
    let yaml = BASE.replace("params:\n  records: 10", "params:\n  records: 10\n  unused: 1")
        + "variants:\n  big:\n    params: {unused: 2}\n";
    let err = error(&yaml);
    check(&err, K::UnusedVariantParam, "unused", Some("${params.unused}"));
}

#[test]
fn variant_overrides_an_undeclared_param() {
    let err = error(&format!("{BASE}variants:\n  big:\n    params: {{record: 20}}\n"));
    check(&err, K::UnknownVariantParam, "record", Some("did you mean `records`?"));
}

#[test]
fn matrix_variant_without_values() {
    let err = error(&format!("{BASE}variants:\n  sweep:\n    matrix: {{records: []}}\n"));
    check(&err, K::Invalid, "[]", Some("at least one value"));
}

#[test]
fn matrix_that_expands_too_far() {
    let values: Vec<String> = (0..70).map(|n| n.to_string()).collect();
    let list = values.join(", ");
    let err = error(&format!(
        "{BASE}  other:\n    kind: detail\n    params:\n      count: ${{params.other}}\n    inputs:\n      \
         templates: scene.templates\n      seed: seed.records\nvariants:\n  sweep:\n    matrix:\n      \
         records: [{list}]\n      other: [{list}]\n"
    ).replace("params:\n  records: 10\n", "params:\n  records: 10\n  other: 10\n"));
    check(&err, K::Invalid, "matrix", Some("split it into several variants"));
    assert!(err.message.contains("too large"), "{}", err.message);
}

#[test]
fn matrix_variants_share_identical_stages() {
    let yaml = format!("{BASE}variants:\n  sweep:\n    matrix:\n      records: [10, 20]\n");
    let recipe = Project::new().resolve(&yaml).expect("matrix recipe");
    assert_eq!(recipe.variants, ["default", "sweep[records=10]", "sweep[records=20]"]);

    // `seed` and `scene` read no param, and `sweep[records=10]` equals the
    // default: only `detail` under records=20 is a new instance.
    let all = ["default", "sweep[records=10]", "sweep[records=20]"];
    let summary: Vec<(&str, Vec<&str>)> = recipe
        .instances
        .iter()
        .map(|i| (i.name.as_str(), i.variants.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        summary,
        [
            ("seed", all.to_vec()),
            ("scene", all.to_vec()),
            ("detail", all[..2].to_vec()),
            ("detail@sweep[records=20]", vec![all[2]]),
        ]
    );
    let counts: Vec<&serde_json::Value> =
        recipe.instances[2..].iter().map(|i| &i.params["count"]).collect();
    assert_eq!(counts, [10, 20]);
}

#[test]
fn file_input_that_does_not_exist() {
    let err = error(&edit("data/seed.jsonl", "data/missing.jsonl"));
    check(&err, K::FileNotFound, "data/missing.jsonl", Some("relative to the recipe's folder"));
    assert!(err.message.contains("`data/missing.jsonl`"), "{}", err.message);
}

#[test]
fn file_input_escaping_with_dot_dot() {
    let outer = tempfile::tempdir().expect("tempdir");
    fs::write(outer.path().join("outside.jsonl"), "{}\n").expect("write");
    fs::create_dir(outer.path().join("project")).expect("mkdir");
    fs::write(outer.path().join("project/watchfire.toml"), "").expect("write");
    let yaml = edit("data/seed.jsonl", "../outside.jsonl");
    let recipe_path = outer.path().join("project/recipe.yaml");

    let err = resolve_at(&yaml, &recipe_path, &LoadOptions::default()).err().expect("escape");
    check(&err, K::PathEscapes, "../outside.jsonl", Some("--data-root"));

    // The same path is fine once its folder is an allowed data root.
    let options =
        LoadOptions { data_roots: vec![outer.path().to_path_buf()], ..LoadOptions::default() };
    let recipe = resolve_at(&yaml, &recipe_path, &options).expect("data root allows it");
    let want = outer.path().join("outside.jsonl").canonicalize().expect("canonical");
    assert!(matches!(
        &recipe.instances[0].inputs["data"],
        InputBinding::Path { abs, .. } if *abs == want
    ));
}

#[cfg(unix)]
#[test]
fn file_input_escaping_through_a_symlink() {
    let outside = tempfile::tempdir().expect("tempdir");
    fs::write(outside.path().join("seed.jsonl"), "{}\n").expect("write");
    let project = Project::new();
    std::os::unix::fs::symlink(outside.path(), project.path("linked")).expect("symlink");
    let yaml = edit("data/seed.jsonl", "linked/seed.jsonl");

    let err = project.resolve(&yaml).err().expect("escape");
    check(&err, K::PathEscapes, "linked/seed.jsonl", Some("--data-root"));

    let options =
        LoadOptions { data_roots: vec![outside.path().to_path_buf()], ..LoadOptions::default() };
    project.resolve_with(&yaml, &options).expect("data root allows it");
}

#[test]
fn diagnostic_renders_label_and_help() {
    let err = error(&edit("    kind: scene", "    knid: scene"));
    let text = render(&err);
    for want in [
        "watchfire::recipe::unknown_key",
        "unknown key `knid`",
        "recipe.yaml",
        "knid: scene",
        "not a known key",
        "did you mean `kind`?",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
}

// ---- no panic on any input ----

/// Recipes the mutation test starts from: the synthetic-data recipe, `BASE`, and ones
/// using flow style, anchors, variants and block scalars.
fn mutation_seeds() -> Vec<String> {
    let synthetic = include_str!("../recipes/synthetic.yaml");
    let variants = format!(
        "{BASE}variants:\n  big:\n    params: {{records: 20}}\n  sweep:\n    matrix:\n      \
         records: [1, 2, 3]\n"
    );
    let flow = "name: \"flow ☕\"\nseed: 7\nparams: {n: 3, label: 'a: b'}\nstages: {s: {kind: \
                seed, inputs: {data: ./data/seed.jsonl}}, t: {kind: scene, inputs: {seed: s}, \
                params: {templates_per_scene: ${params.n}}}}\n";
    let anchors = "name: &n anchors\nstages:\n  seed:\n    kind: seed\n    params: &p\n      \
                   share: 0.5\n    inputs:\n      data: data/seed.jsonl\n  other:\n    kind: \
                   seed\n    params: *p\n    inputs: {data: \"data/seed.jsonl\"}\n    \
                   resources: {cpu: 2, gpu: 0}\n    cache: false\nvariants: {}\n";
    let scalars = "# comment\nname: >\n  folded\nparams:\n  text: |\n    line one\n    line \
                   two\nstages:\n  s:\n    kind: seed\n    inputs:\n      data: \
                   'data/seed.jsonl'\n  d:\n    kind: detail\n    params:\n      attributes: \
                   {note: \"x-${params.text}\"}\n    inputs: [templates, seed]\n";
    vec![
        synthetic.to_string(),
        BASE.to_string(),
        variants,
        flow.to_string(),
        anchors.to_string(),
        scalars.to_string(),
    ]
}

const SIGNIFICANT: &[char] = &[
    ':', '{', '}', '[', ']', '-', '#', '&', '*', '!', '|', '>', '\'', '"', '\t', '\n', ' ', ',',
    '?', '%', '@', '`', '$', '.', '/', '\\', '\r', 'é', '☕', '\u{feff}', '\u{0}', '𝄞',
];

/// One random edit; always leaves valid UTF-8.
fn mutate(text: &mut String, rng: &mut ChaCha8Rng) {
    let at = |text: &String, rng: &mut ChaCha8Rng| {
        let mut i = rng.random_range(0..=text.len());
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match rng.random_range(0..6) {
        0 if !text.is_empty() => {
            let i = at(text, rng);
            if let Some(c) = text[i..].chars().next() {
                text.replace_range(i..i + c.len_utf8(), "");
            }
        }
        1 => {
            let i = at(text, rng);
            let c = SIGNIFICANT[rng.random_range(0..SIGNIFICANT.len())];
            text.insert(i, c);
        }
        2 => {
            let mut lines: Vec<&str> = text.split('\n').collect();
            let (a, b) = (rng.random_range(0..lines.len()), rng.random_range(0..lines.len()));
            lines.swap(a, b);
            *text = lines.join("\n");
        }
        3 => {
            let i = at(text, rng);
            text.truncate(i);
        }
        4 => {
            let i = at(text, rng);
            let c = char::from_u32(rng.random_range(0x80..0x3000)).unwrap_or('ß');
            text.insert(i, c);
        }
        _ => {
            // Duplicate a slice, which repeats keys and nests structures.
            let (a, b) = (at(text, rng), at(text, rng));
            let (a, b) = (a.min(b), a.max(b));
            let slice = text[a..b].to_string();
            text.insert_str(b, &slice);
        }
    }
}

/// Edge inputs for the span index: empty, a byte-order mark, multi-byte
/// chars next to flow brackets, unclosed and nested flow, containers as
/// keys, aliases, several documents, NUL.
const REGRESSIONS: &[&str] = &[
    "",
    "\u{feff}name: x\nstages: {}\n",
    "name: ☕\nstages: {é: [ü, {ß: 𝄞}]}\n",
    "name: [é\n",
    "name: x\nstages: {a: {kind: seed, inputs: {data: ./é}}}\n",
    "? [a, b]\n: c\n{x: y}: z\n",
    "name: &a x\nseed: *a\nstages: *a\n",
    "name: x\n---\nname: y\n",
    "name: \"\\\"\nstages:\u{0}",
    "stages:\n  a: {kind: scene, inputs: {seed: a.templates}}\nname: x, y\n",
];

#[test]
fn mangled_recipes_never_panic() {
    let project = Project::new();
    let path = project.path("recipe.yaml");
    let options = LoadOptions::default();
    for text in REGRESSIONS {
        let _ = resolve_at(text, &path, &options);
    }

    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let mut outcomes = [0usize; 2];
    for seed in mutation_seeds() {
        for _ in 0..600 {
            let mut text = seed.clone();
            for _ in 0..rng.random_range(1..=4) {
                mutate(&mut text, &mut rng);
            }
            let result = std::panic::catch_unwind(|| resolve_at(&text, &path, &options).is_ok());
            match result {
                Ok(ok) => outcomes[usize::from(ok)] += 1,
                Err(_) => panic!("parse + resolve panicked on:\n{text:?}"),
            }
        }
    }
    // Both outcomes occur, so the mutations neither break everything nor nothing.
    assert!(outcomes.iter().all(|&n| n > 100), "errors/ok: {outcomes:?}");
}

/// `BASE` with a variant and a stage that gathers `detail` across variants.
fn gathering(extra_stage: &str) -> String {
    let mut yaml = BASE.to_string();
    yaml.push_str(
        "  probe:\n    kind: filter\n    inputs:\n      records: detail@*\n      seed: seed.records\n",
    );
    yaml.push_str(extra_stage);
    yaml.push_str(
        "variants:\n  small:\n    params: { records: 5 }\n  big:\n    params: { records: 20 }\n",
    );
    yaml
}

#[test]
fn a_gathering_stage_reads_every_variant_once() {
    let recipe = Project::new().resolve(&gathering("")).expect("gathering recipe");
    let names: Vec<&str> = recipe.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["seed", "scene", "detail", "detail@small", "detail@big", "probe"]);
    let probe = recipe.instances.last().unwrap();
    assert!(probe.gathers);
    assert_eq!(probe.variants, ["default", "small", "big"]);
    let slots: Vec<&str> = probe.inputs.keys().map(String::as_str).collect();
    assert_eq!(slots, ["records[big]", "records[default]", "records[small]", "seed"]);
    let gathered: Vec<usize> = ["default", "small", "big"]
        .iter()
        .map(|v| match &probe.inputs[&format!("records[{v}]")] {
            InputBinding::Stage { instance, .. } => *instance,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(gathered, [2, 3, 4]);

    // `--variant` gathers only the selected variants, under the same name.
    let options = LoadOptions { variants: vec!["small".into()], ..LoadOptions::default() };
    let recipe = Project::new().resolve_with(&gathering(""), &options).expect("one variant");
    let probe = recipe.instances.last().unwrap();
    assert_eq!(probe.name, "probe");
    let slots: Vec<&str> = probe.inputs.keys().map(String::as_str).collect();
    assert_eq!(slots, ["records[small]", "seed"]);
}

#[test]
fn a_stage_cannot_read_a_gathering_stage() {
    let err = error(&gathering(
        "  late:\n    kind: filter\n    inputs:\n      records: probe\n      seed: seed.records\n",
    ));
    check(&err, K::Invalid, "probe", Some("must be a final stage"));
    assert_eq!(err.message, "stage `late` reads `probe`, which gathers across variants");
}

#[test]
fn gathering_a_path_is_an_error() {
    let err = error(&edit("      data: data/seed.jsonl", "      data: data/seed.jsonl@*"));
    check(&err, K::Invalid, "data/seed.jsonl@*", Some("gathers a stage across variants"));
}

#[test]
fn a_gathering_stage_may_not_depend_on_variant_params() {
    let err = error(&gathering("").replace(
        "    kind: filter\n    inputs:\n      records: detail@*\n",
        "    kind: filter\n    params: { max_copied_ngram: \"${params.records}\" }\n    inputs:\n      records: detail@*\n",
    ));
    assert_eq!(err.kind, K::Invalid, "{err}");
    assert!(err.message.contains("the params of `probe` differ in variant `small`"), "{err}");
}
