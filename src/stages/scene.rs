//! `scene`: G_scene, coarse report templates with typed slots per scene category.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{read_records, write_json, write_jsonl};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::synth::llm::{self, LlmParams};
use crate::synth::scene::build_templates;
use crate::synth::template::{Backend, Mode};

pub struct Scene;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SceneParams {
    /// `hierarchical` learns a role chain and sentence pools per scene; `flat` pools the
    /// sentences of all scenes with no order (the "without hierarchical generation" ablation).
    pub mode: Mode,
    /// Distinct templates wanted per scene category (flat mode: this times the number of
    /// scenes in all). Fewer come out when the seed cannot yield more distinct ones.
    pub templates_per_scene: usize,
    /// What writes the templates: `template` learns them from the seed; `llm` asks the
    /// `model` input for new ones per scene category, showing delexicalised seed reports as
    /// examples (`mode: hierarchical` only).
    pub backend: Backend,
    /// Model calls of `backend: llm`. Unset: the defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmParams>,
}

impl Default for SceneParams {
    fn default() -> Self {
        Self {
            mode: Mode::Hierarchical,
            templates_per_scene: 40,
            backend: Backend::Template,
            llm: None,
        }
    }
}

impl Validate for SceneParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(1..=100_000).contains(&self.templates_per_scene) {
            return Err(ParamError::new("templates_per_scene", "must be between 1 and 100000"));
        }
        if self.backend == Backend::Llm && self.mode == Mode::Flat {
            return Err(ParamError::new("mode", "must be `hierarchical` with `backend: llm`")
                .with_help("the LLM backend writes templates per scene category"));
        }
        llm::validate_backend(self.backend, self.llm.as_ref())
    }
}

impl Stage for Scene {
    type Params = SceneParams;

    const KIND: &'static str = "scene";
    const VERSION: u32 = 1;
    const DOC: &'static str = "G_scene: delexicalises the seed reports into sentences with typed \
        slots, learns per scene category a chain of sentence roles and a pool of sentences per \
        role, and samples distinct coarse templates from them (or, in flat mode, from all \
        sentences pooled). Each template records its slots and the seed reports it came from. With \
        `backend: llm` a model writes new templates per scene category instead, shown a few \
        delexicalised seed reports, and templates that fail the checks are dropped and counted.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec { name: "seed", required: true, doc: "Output of a `seed` stage." },
        InputSpec {
            name: llm::MODEL_INPUT,
            required: false,
            doc: "A `model` stage: needed with `backend: llm`, refused without it.",
        },
    ];
    const OUTPUTS: &'static [&'static str] = &["templates.jsonl", "stats.json"];

    fn run(params: &SceneParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let seed = read_records(&ctx.input_file("seed", "records.jsonl")?)?;
        if params.backend == Backend::Llm {
            let model = llm::load_model(ctx.input(llm::MODEL_INPUT)?)?;
            let progress = ctx.progress(None, "requests");
            let llm_params = params.llm.clone().unwrap_or_default();
            let (templates, stats) = llm::llm_templates(
                &seed,
                params.templates_per_scene,
                &llm_params,
                ctx.seed,
                model.as_ref(),
                || progress.inc(1),
            );
            if templates.is_empty() {
                let rejected: Vec<String> = stats
                    .rejected
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(reason, n)| format!("{n} {reason}"))
                    .collect();
                let failure = match &stats.first_failure {
                    Some(why) => format!("; first failed request: {why}"),
                    None => String::new(),
                };
                return Err(StageError::failed(format!(
                    "the model wrote no usable template in {} requests ({} proposed, rejected: \
                     {}){failure}",
                    stats.requests,
                    stats.proposed,
                    if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") }
                )));
            }
            write_jsonl(&ctx.output("templates.jsonl"), &templates)?;
            return write_json(&ctx.output("stats.json"), &stats);
        }
        let (templates, stats) =
            build_templates(&seed, params.mode, params.templates_per_scene, ctx.seed);
        if templates.is_empty() {
            return Err(StageError::failed("the seed yields no templates"));
        }
        write_jsonl(&ctx.output("templates.jsonl"), &templates)?;
        write_json(&ctx.output("stats.json"), &stats)
    }

    fn check_inputs(params: &SceneParams, bound: &[&str]) -> Result<(), ParamError> {
        llm::check_model_input(params.backend, bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::read_lines;
    use crate::schema::EntitySchema;
    use crate::synth::template::{Piece, parse};
    use crate::synth::testkit::{Harness, tiny_seed};

    fn templates(h: &Harness, mode: Mode, seed: u64) -> (String, Vec<Template>) {
        let data = h.write_records("seed.jsonl", &tiny_seed());
        let params = SceneParams { mode, templates_per_scene: 10, ..Default::default() };
        let out = h.run::<Scene>(&params, &[("seed", &data)], seed, &EntitySchema::default());
        let path = out.unwrap().join("templates.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = read_lines(&path)
            .unwrap()
            .iter()
            .map(|(_, line)| serde_json::from_str(line).unwrap())
            .collect();
        (text, parsed)
    }

    use crate::synth::template::Template;

    #[test]
    fn hierarchical_templates_keep_scene_and_slots() {
        let h = Harness::new();
        let (_, templates) = templates(&h, Mode::Hierarchical, 7);
        assert!(templates.len() >= 15, "{}", templates.len());
        let ids: std::collections::BTreeSet<_> = templates.iter().map(|t| &t.id).collect();
        assert_eq!(ids.len(), templates.len(), "templates are distinct");
        for template in &templates {
            let scene = template.scene.as_deref().unwrap();
            assert_eq!(template.roles[0], "opening");
            assert!(template.seed_ids.iter().all(|id| id.starts_with(&scene[..1])), "{template:?}");
            for piece in parse(&template.text).unwrap() {
                if let Piece::Slot { kind, index } = piece {
                    assert!(template.slots.iter().any(|s| s.kind == kind && s.index == index));
                }
            }
        }
    }

    #[test]
    fn same_seed_same_bytes_and_flat_differs() {
        let h = Harness::new();
        let (a, _) = templates(&h, Mode::Hierarchical, 7);
        let (b, _) = templates(&h, Mode::Hierarchical, 7);
        let (c, _) = templates(&h, Mode::Hierarchical, 8);
        let (flat, flat_templates) = templates(&h, Mode::Flat, 7);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, flat);
        assert!(flat_templates.iter().all(|t| t.scene.is_none() && t.mode == Mode::Flat));
        let mixed = flat_templates.iter().filter(|t| {
            let scenes: std::collections::BTreeSet<_> =
                t.seed_ids.iter().map(|s| &s[..1]).collect();
            scenes.len() > 1
        });
        assert!(mixed.count() > 0, "flat templates mix scenes");
    }
}
