//! Probing, training, resuming, merging and generating with an adapter,
//! through the binary, on a tiny random model built in code (exported into
//! the project as a Hugging Face folder) and the synthetic-data recipe's corpus.

mod common;

use std::path::Path;

use candle_core::DType;
use common::Project;
use watchfire::adapt::testkit::tiny_loaded;

const RECIPE: &str = "recipes/adapt.yaml";

/// seed -> scene -> detail -> filter -> tasks, then probe, train and merge on
/// the tiny model at `recipes/models/tiny` (paths are relative to the recipe).
fn project() -> Project {
    let project = Project::new();
    tiny_loaded(3, DType::F32).export(&project.path().join("recipes/models/tiny")).unwrap();
    project.write(
        RECIPE,
        r#"
name: adapt
seed: 7
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
    params: { tasks: [entities, alert] }
    inputs: { records: seed }
  scene:
    kind: scene
    inputs: { seed: seed }
  detail:
    kind: detail
    params: { count: 60 }
    inputs: { templates: scene.templates, seed: seed.records }
  filter:
    kind: filter
    inputs: { records: detail.records, seed: seed.records }
  tasks:
    kind: tasks
    params: { tasks: [entities, alert] }
    inputs: { records: filter.corpus }
  probe:
    kind: probe
    params: { steps: 2, batch: 2, max_len: 1024, select: { rule: top_k, k: 3 } }
    inputs: { model: base, examples: seed_tasks }
  train:
    kind: train
    params:
      method: selective
      steps: 6
      batch: 2
      warmup: 1
      max_len: 1024
      max_examples: 40
      prefix_len: 2
      checkpoint_every: 2
      lr: 0.01
    inputs: { model: base, examples: tasks, mask: probe }
  merged:
    kind: merge
    inputs: { model: base, adapter: train }
"#,
    );
    project
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_killed_train_stage_resumes_and_ends_with_the_same_bytes() {
    let straight = project();
    straight.ok(&["run", RECIPE]);
    let adapter = straight.artifact(RECIPE, "train").join("adapter");
    for file in ["adapter_config.json", "adapter_model.safetensors", "prefixes.safetensors"] {
        assert!(adapter.join(file).is_file(), "{file} missing");
    }
    let mask = straight.read_artifact(RECIPE, "probe", "mask.json");
    assert!(mask.contains("\"selected_heads\": 3"), "{mask}");
    let summary = straight.read_artifact(RECIPE, "train", "train.json");
    assert!(summary.contains("\"method\": \"selective\""), "{summary}");
    assert!(straight.artifact(RECIPE, "merged").join("model.safetensors").is_file());

    // The same recipe in another project: the same bytes.
    let again = project();
    again.ok(&["run", RECIPE]);
    let again_adapter = again.artifact(RECIPE, "train").join("adapter");
    for file in ["adapter_model.safetensors", "prefixes.safetensors", "watchfire.json"] {
        assert_eq!(read(&adapter.join(file)), read(&again_adapter.join(file)), "{file}");
    }

    // Interrupted after step 3 (a checkpoint was written at step 2), then resumed.
    let killed = project();
    let out =
        killed.command(&["run", RECIPE]).env("WATCHFIRE_FAIL_AFTER_STEPS", "3").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped after step 3"), "{stderr}");
    let out = killed.command(&["run", RECIPE, "-v"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from the checkpoint at step 2"), "{stderr}");
    let resumed = killed.artifact(RECIPE, "train");
    for file in
        ["adapter/adapter_model.safetensors", "adapter/prefixes.safetensors", "curves.jsonl"]
    {
        assert_eq!(
            read(&straight.artifact(RECIPE, "train").join(file)),
            read(&resumed.join(file)),
            "{file}"
        );
    }
    // Committing the key removed its checkpoints.
    let checkpoints = killed.path().join("cache/store-v1/checkpoints");
    let left = std::fs::read_dir(&checkpoints).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0);
}

#[test]
fn generate_runs_a_subtask_with_the_adapter_on_reports_from_a_file() {
    let project = project();
    project.ok(&["run", RECIPE]);
    let train = project.artifact(RECIPE, "train");
    project.write(
        "reports.jsonl",
        "{\"id\": \"a\", \"text\": \"A car hit a pole on Elm St at 9 pm.\"}\n{\"id\": \"b\", \"text\": \"Smoke on the 3rd floor.\"}\n",
    );
    let out = project.ok(&[
        "generate",
        "--model",
        "recipes/models/tiny",
        "--adapter",
        train.to_str().unwrap(),
        "--task",
        "alert",
        "--input",
        "reports.jsonl",
        "--max-tokens",
        "4",
    ]);
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[1]["task"], "alert");
    assert!(lines[0]["output"].is_string());

    let bad = project.run(&[
        "generate",
        "--model",
        "recipes/models/tiny",
        "--adapter",
        train.to_str().unwrap(),
        "--task",
        "summary",
        "hello",
    ]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("no prefix for `summary`; it has: entities, alert"), "{stderr}");
}

#[test]
fn selective_without_a_mask_is_a_recipe_error() {
    let project = project();
    project.edit(
        RECIPE,
        "inputs: { model: base, examples: tasks, mask: probe }",
        "inputs: { model: base, examples: tasks }",
    );
    let out = project.run(&["plan", RECIPE]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs a head mask"), "{stderr}");
}
