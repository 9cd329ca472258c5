//! `scene`: G_scene, coarse report templates with typed slots per scene category.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{read_records, write_json, write_jsonl};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
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
    /// What writes the templates.
    pub backend: Backend,
}

impl Default for SceneParams {
    fn default() -> Self {
        Self { mode: Mode::Hierarchical, templates_per_scene: 40, backend: Backend::Template }
    }
}

impl Validate for SceneParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(1..=100_000).contains(&self.templates_per_scene) {
            return Err(ParamError::new("templates_per_scene", "must be between 1 and 100000"));
        }
        Ok(())
    }
}

impl Stage for Scene {
    type Params = SceneParams;

    const KIND: &'static str = "scene";
    const VERSION: u32 = 1;
    const DOC: &'static str = "G_scene: delexicalises the seed reports into sentences with typed \
        slots, learns per scene category a chain of sentence roles and a pool of sentences per \
        role, and samples distinct coarse templates from them (or, in flat mode, from all \
        sentences pooled). Each template records its slots and the seed reports it came from.";
    const INPUTS: &'static [InputSpec] =
        &[InputSpec { name: "seed", required: true, doc: "Output of a `seed` stage." }];
    const OUTPUTS: &'static [&'static str] = &["templates.jsonl", "stats.json"];

    fn run(params: &SceneParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let seed = read_records(&ctx.input_file("seed", "records.jsonl")?)?;
        let (templates, stats) =
            build_templates(&seed, params.mode, params.templates_per_scene, ctx.seed);
        if templates.is_empty() {
            return Err(StageError::failed("the seed yields no templates"));
        }
        write_jsonl(&ctx.output("templates.jsonl"), &templates)?;
        write_json(&ctx.output("stats.json"), &stats)
    }
}
