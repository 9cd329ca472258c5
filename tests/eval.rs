//! Evaluation, the report and `compare`, through the binary, on a tiny
//! random model built in code: variants gathered into one report, every
//! answer kept, malformed answers counted rather than fatal, and the same
//! recipe giving the same bytes.

mod common;

use candle_core::DType;
use common::Project;
use watchfire::adapt::testkit::tiny_loaded;

const RECIPE: &str = "recipes/grid.yaml";

const GRID: &str = r#"
name: grid
seed: 11
params:
  lambda: 0.1
  method: selective
schema:
  time: key
  location: key
  vehicle: key
  plate: key
  injured: key
  fatalities: key
  weapon: key
  suspect_description: key
  hazard: key
  weather: peripheral
  witness_remark: peripheral
  bystander_detail: peripheral
stages:
  base:
    kind: model
    params: { source: "path:models/tiny" }
  seed:
    kind: seed
    inputs: { data: data/seed.jsonl }
  seed_tasks:
    kind: tasks
    inputs: { records: seed }
  scene:
    kind: scene
    inputs: { seed: seed }
  detail:
    kind: detail
    params: { count: 80 }
    inputs: { templates: scene.templates, seed: seed.records }
  filter:
    kind: filter
    inputs: { records: detail.records, seed: seed.records }
  tasks:
    kind: tasks
    params: { validation_share: 0.3 }
    inputs: { records: filter.corpus }
  probe:
    kind: probe
    params: { steps: 1, batch: 2, max_len: 1024, select: { rule: top_k, k: 3 } }
    inputs: { model: base, examples: seed_tasks }
  train:
    kind: train
    params:
      method: ${params.method}
      contrastive_lambda: ${params.lambda}
      steps: 2
      batch: 2
      warmup: 1
      max_len: 1024
      max_examples: 12
      prefix_len: 2
      lr: 0.01
    inputs: { model: base, examples: tasks, mask: probe }
  eval:
    kind: eval
    params:
      max_reports: 3
      max_tokens: { entities: 12, summary: 12, alert: 12 }
      resamples: 50
      embedding_reports: 4
      general_documents: 2
      kl_samples: 1
      kl_new_tokens: 4
    inputs: { model: base, adapter: train, examples: tasks, general: data/general.txt }
  eval_base:
    kind: eval
    params:
      max_reports: 3
      max_tokens: { entities: 12, summary: 12, alert: 12 }
      resamples: 50
      embedding_reports: 0
    inputs: { model: base, examples: tasks }
  report:
    kind: report
    params:
      title: Grid
      tables:
        - { title: "Table 1", rows: [default, lora] }
        - { title: "Table 2", rows: [default, no_contrastive], reference: default }
      labels: { default: full method }
      tsne_epochs: 200
    inputs:
      evals: eval@*
      baseline: eval_base
      trains: train@*
      probe: probe
variants:
  lora: { params: { method: lora } }
  no_contrastive: { params: { lambda: 0 } }
"#;

fn project() -> Project {
    let project = Project::new();
    tiny_loaded(3, DType::F32).export(&project.path().join("recipes/models/tiny")).unwrap();
    project.write(RECIPE, GRID);
    project.write(
        "recipes/data/general.txt",
        "The library opens at nine.\n\nBread needs flour, water, salt and time.\n",
    );
    project
}

#[test]
fn a_grid_of_variants_lands_in_one_report_and_reruns_nothing() {
    let project = project();
    project.ok(&["run", RECIPE, "-q"]);

    // One report, shared by every variant, reading each variant's eval.
    let plan = project.ok(&["plan", RECIPE]);
    assert!(plan.contains("grid: 16 cached, 0 to run, 0 waiting on them"), "{plan}");
    let report = project.read_artifact(RECIPE, "report", "report.md");
    for needle in [
        "## Table 1",
        "## Table 2",
        "| base model, no adapter |",
        "| full method |",
        "| lora |",
        "| no_contrastive |",
        "eval@lora ",
        "Findings:",
        "full method ",
        "## Loss curves",
        "## Head probe",
    ] {
        assert!(report.contains(needle), "report.md lacks {needle:?}:\n{report}");
    }
    let html = project.read_artifact(RECIPE, "report", "report.html");
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg"), "{html}");
    assert!(!html.contains("src=\"figures/"), "the page must inline its figures");

    // A random model writes nonsense: kept, counted, never fatal.
    let outcomes = project.read_artifact(RECIPE, "eval", "outcomes.jsonl");
    assert_eq!(outcomes.lines().count(), 9, "3 reports x 3 tasks");
    let metrics: serde_json::Value =
        serde_json::from_str(&project.read_artifact(RECIPE, "eval", "metrics.json")).unwrap();
    let malformed: u64 = metrics["scores"]["malformed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(malformed > 0, "{metrics}");
    assert_eq!(metrics["subject"]["method"], "selective");
    assert!(metrics["general"]["perplexity_ratio"].as_f64().unwrap() > 0.0);
    assert!(metrics["embeddings"]["key"].as_u64().unwrap() > 0);

    // Only the edited variant re-runs: its train, its eval and the report.
    project.edit(
        RECIPE,
        "no_contrastive: { params: { lambda: 0 } }",
        "no_contrastive: { params: { lambda: 0.0001 } }",
    );
    let plan = project.ok(&["plan", RECIPE]);
    let pending: Vec<&str> = plan
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() >= 3 && cols[2] != "cached" && !line.starts_with("grid:"))
                .then_some(cols[0])
        })
        .collect();
    assert_eq!(pending, ["train@no_contrastive", "eval@no_contrastive", "report"], "{plan}");
    assert!(plan.contains("param `contrastive_lambda` 0.0 -> 0.0001"), "{plan}");
}

#[test]
fn the_same_recipe_gives_the_same_report_bytes() {
    let (a, b) = (project(), project());
    a.ok(&["run", RECIPE, "-q"]);
    b.ok(&["run", RECIPE, "-q"]);
    for (stage, file) in
        [("eval@lora", "metrics.json"), ("eval@lora", "outcomes.jsonl"), ("report", "report.html")]
    {
        assert_eq!(
            a.read_artifact(RECIPE, stage, file),
            b.read_artifact(RECIPE, stage, file),
            "{stage}/{file} differs between two runs"
        );
    }
}

#[test]
fn compare_prints_deltas_between_two_variants() {
    let project = project();
    project.ok(&["run", RECIPE, "-q"]);
    let out = project.ok(&["compare", "eval", "eval@lora", "--recipe", RECIPE]);
    assert!(out.starts_with("eval vs eval@lora\n"), "{out}");
    for metric in ["trainable %", "key F1", "CIRS", "CCI", "perplexity ratio"] {
        assert!(out.contains(metric), "{out}");
    }
    let missing = project.run(&["compare", "eval", "eval@nope", "--recipe", RECIPE]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no stage `eval@nope`"));
}

#[test]
fn eval_command_scores_a_file_outside_a_recipe() {
    let project = project();
    project.ok(&["run", RECIPE, "-q", "--variant", "lora"]);
    let tasks = project.artifact(RECIPE, "tasks");
    let train = project.artifact(RECIPE, "train@lora");
    let json = project.path().join("m.json");
    let out = project.ok(&[
        "eval",
        "--model",
        "recipes/models/tiny",
        "--adapter",
        train.to_str().unwrap(),
        "--data",
        tasks.join("validation.jsonl").to_str().unwrap(),
        "--schema-from",
        RECIPE,
        "--max-reports",
        "2",
        "--resamples",
        "20",
        "--json",
        json.to_str().unwrap(),
        "-q",
    ]);
    assert!(out.starts_with("lora ("), "{out}");
    assert!(out.contains("key F1"), "{out}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(metrics["reports"], 2);
    let records = project.ok(&[
        "eval",
        "--model",
        "recipes/models/tiny",
        "--data",
        "recipes/data/seed.jsonl",
        "--format",
        "records",
        "--task",
        "alert",
        "--max-reports",
        "2",
        "--resamples",
        "20",
        "-q",
    ]);
    assert!(records.starts_with("base (0.00% trainable), 2 reports, 2 answers"), "{records}");
}
