//! The `tasks` stage through the binary: seed -> scene -> detail -> filter ->
//! tasks as `recipes/tasks.yaml` writes it, and seed -> tasks on real reports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::Project;
use serde_json::Value;
use watchfire::adapt::tasks::{parse_alert, parse_entities};

const RECIPE: &str = "recipes/tasks.yaml";

fn jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn str_of<'v>(value: &'v Value, field: &str) -> &'v str {
    value[field].as_str().unwrap_or_else(|| panic!("no string `{field}` in {value}"))
}

/// The record's entities as `(type, value)` in order of appearance.
fn gold(record: &Value) -> Vec<(String, String)> {
    let mut entities: Vec<&Value> = record["entities"].as_array().unwrap().iter().collect();
    entities.sort_by_key(|e| e["start"].as_u64().unwrap());
    entities
        .iter()
        .map(|e| (str_of(e, "type").to_string(), str_of(e, "value").to_string()))
        .collect()
}

#[test]
fn the_tasks_recipe_writes_exact_targets_split_by_template() {
    let project = Project::with_recipe("tasks.yaml");
    project.edit(RECIPE, "records: 2000", "records: 400");
    project.ok(&["run", RECIPE]);

    let corpus = jsonl(&project.artifact(RECIPE, "filter").join("corpus.jsonl"));
    let records: BTreeMap<&str, &Value> = corpus.iter().map(|r| (str_of(r, "id"), r)).collect();
    let out = project.artifact(RECIPE, "tasks");
    let train = jsonl(&out.join("train.jsonl"));
    let validation = jsonl(&out.join("validation.jsonl"));
    assert!(!train.is_empty() && !validation.is_empty());
    assert_eq!(train.len() + validation.len(), corpus.len() * 3, "three tasks per record");

    let mut side_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut per_task: BTreeMap<&str, usize> = BTreeMap::new();
    for (side, examples) in [("train", &train), ("validation", &validation)] {
        for example in examples.iter() {
            let template = str_of(example, "template_id");
            let first = *side_of.entry(template).or_insert(side);
            assert_eq!(first, side, "template {template} is in both splits");

            let record = records[str_of(example, "source_id")];
            assert_eq!(record["provenance"]["template_id"], example["template_id"]);
            let prompt = str_of(example, "prompt");
            assert!(prompt.ends_with(&format!("\n\nReport:\n{}", str_of(record, "text"))));
            let target = str_of(example, "target");
            let facts = example["key_facts"].as_array().unwrap();
            let task = str_of(example, "task");
            *per_task.entry(task).or_default() += 1;
            match task {
                "entities" => assert_eq!(parse_entities(target), gold(record), "{target}"),
                "summary" => {
                    for fact in facts {
                        let value = str_of(fact, "value");
                        assert!(target.contains(value), "summary {target:?} lacks {value:?}");
                    }
                    // Every key-typed entity of the record is a key fact of its summary.
                    let key = [
                        "time",
                        "location",
                        "vehicle",
                        "plate",
                        "injured",
                        "fatalities",
                        "weapon",
                        "suspect_description",
                        "hazard",
                    ];
                    for (kind, value) in gold(record) {
                        if key.contains(&kind.as_str()) {
                            assert!(target.contains(&value), "summary {target:?} lacks {value:?}");
                        }
                    }
                }
                "alert" => {
                    let fields = parse_alert(target).unwrap_or_else(|| panic!("{target}"));
                    assert_eq!(
                        fields.scene,
                        str_of(record, "scene").replace('_', " ").to_uppercase()
                    );
                    assert_eq!(fields.severity, str_of(&record["attributes"], "severity"));
                    for fact in facts {
                        assert!(target.contains(str_of(fact, "value")), "{target}");
                    }
                }
                other => panic!("unknown task {other}"),
            }
        }
    }
    assert_eq!(per_task.len(), 3);
    assert!(per_task.values().all(|n| *n == corpus.len()), "{per_task:?}");

    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["records_used"], corpus.len());
    let groups = |side: &str| stats[side]["groups"].as_u64().unwrap() as usize;
    assert_eq!(groups("train") + groups("validation"), side_of.len());

    // Same input and seed, same bytes: a rebuild from scratch matches the lock.
    let verified = project.ok(&["verify", RECIPE]);
    assert!(verified.contains("5 stages verified, 0 not matching"), "{verified}");
}

#[test]
fn real_seed_reports_are_split_by_id() {
    let project = Project::with_recipe("tasks.yaml");
    let text = project.read(RECIPE);
    let stages = text.find("stages:").unwrap();
    let recipe = format!(
        "{}stages:\n  seed:\n    kind: seed\n    inputs:\n      data: data/seed.jsonl\n\n  \
         real:\n    kind: tasks\n    params:\n      validation_share: 0.2\n      \
         tasks: [summary, entities]\n    inputs:\n      records: seed\n",
        &text[..stages]
    );
    project.write("recipes/real.yaml", &recipe);
    project.ok(&["run", "recipes/real.yaml"]);
    let out = project.artifact("recipes/real.yaml", "real");
    let train = jsonl(&out.join("train.jsonl"));
    let validation = jsonl(&out.join("validation.jsonl"));
    assert_eq!(train.len() + validation.len(), 144 * 2, "two tasks per seed report");
    let ids = |examples: &[Value]| -> BTreeSet<String> {
        examples.iter().map(|e| str_of(e, "source_id").to_string()).collect()
    };
    assert!(ids(&train).is_disjoint(&ids(&validation)));
    let share = ids(&validation).len() as f64 / 144.0;
    assert!((0.05..0.4).contains(&share), "{share}");
    assert!(train.iter().chain(&validation).all(|e| e.get("template_id").is_none()));
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["split_by_record_id"], 144);
    assert!(stats.get("alert").is_none(), "no alert task, no alert figures");
}
