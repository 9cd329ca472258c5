//! `detail`: G_detail, fills template slots conditioned on scene and attributes.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{read_records, write_json, write_jsonl};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::synth::detail::{DetailConfig, Generator};
use crate::synth::histogram::Privacy;
use crate::synth::template::{Backend, Template};

pub struct Detail;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DetailParams {
    /// Number of synthetic records to write.
    pub count: usize,
    /// Differential privacy budget per released count: every histogram taken from the seed
    /// gets Laplace noise of scale 1/epsilon. Unset: exact counts.
    pub dp_epsilon: Option<f64>,
    /// With `dp_epsilon`, noisy counts below this are dropped, so rare seed values vanish.
    pub dp_threshold: f64,
    /// Attributes every record gets, such as `{severity: high}`; they override sampled ones.
    pub attributes: BTreeMap<String, String>,
    /// What fills the slots.
    pub backend: Backend,
}

impl Default for DetailParams {
    fn default() -> Self {
        Self {
            count: 1000,
            dp_epsilon: None,
            dp_threshold: 2.0,
            attributes: BTreeMap::new(),
            backend: Backend::Template,
        }
    }
}

impl Validate for DetailParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(1..=100_000_000).contains(&self.count) {
            return Err(ParamError::new("count", "must be between 1 and 100000000"));
        }
        if let Some(epsilon) = self.dp_epsilon
            && !(epsilon > 0.0 && epsilon <= 100.0)
        {
            return Err(ParamError::new("dp_epsilon", "must be between 0 (exclusive) and 100")
                .with_help("smaller is more private; 1.0 is a common choice"));
        }
        if !(0.0..=1000.0).contains(&self.dp_threshold) {
            return Err(ParamError::new("dp_threshold", "must be between 0 and 1000"));
        }
        if let Some(key) = self.attributes.keys().find(|k| k.trim().is_empty()) {
            return Err(ParamError::new(format!("attributes.{key}"), "must not be empty"));
        }
        Ok(())
    }
}

/// `stats.json` of a detail run.
#[derive(Serialize)]
struct DetailStats {
    records: usize,
    usable_templates: usize,
    scenes: BTreeMap<String, usize>,
    modes: BTreeMap<String, usize>,
    dp_epsilon: Option<f64>,
}

impl Stage for Detail {
    type Params = DetailParams;

    const KIND: &'static str = "detail";
    const VERSION: u32 = 1;
    const DOC: &'static str = "G_detail: draws a scene, a template and attributes (time of day, \
        district, severity, agency) from the seed's distributions, fills every slot with a typed \
        value that agrees with them, and writes synthetic records with gold entity spans, a \
        synthetic marker and provenance. Optionally releases the seed's counts with Laplace noise.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec { name: "templates", required: true, doc: "Output of a `scene` stage." },
        InputSpec {
            name: "seed",
            required: true,
            doc: "Output of a `seed` stage: value distributions are counted on it.",
        },
    ];
    const OUTPUTS: &'static [&'static str] = &["records.jsonl", "stats.json"];

    fn run(params: &DetailParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let templates = read_templates(&ctx.input_file("templates", "templates.jsonl")?)?;
        let seed = read_records(&ctx.input_file("seed", "records.jsonl")?)?;
        let config = DetailConfig {
            privacy: params
                .dp_epsilon
                .map(|epsilon| Privacy { epsilon, threshold: params.dp_threshold }),
            pinned: params.attributes.clone(),
            stage_key: ctx.key.to_string(),
        };
        let generator = Generator::new(templates, &seed, config, ctx.seed)
            .map_err(|e| StageError::failed(e.to_string()))?;

        let progress = ctx.progress(Some(params.count as u64), "records");
        let records = generator.generate(ctx.seed, params.count);
        progress.inc(records.len() as u64);
        let mut stats = DetailStats {
            records: records.len(),
            usable_templates: generator.usable_templates(),
            scenes: BTreeMap::new(),
            modes: BTreeMap::new(),
            dp_epsilon: params.dp_epsilon,
        };
        for record in &records {
            *stats.scenes.entry(record.scene.clone()).or_default() += 1;
            let mode = record.provenance.as_ref().map(|p| p.mode.clone()).unwrap_or_default();
            *stats.modes.entry(mode).or_default() += 1;
        }
        write_jsonl(&ctx.output("records.jsonl"), &records)?;
        write_json(&ctx.output("stats.json"), &stats)
    }
}

fn read_templates(path: &std::path::Path) -> Result<Vec<Template>, StageError> {
    crate::corpus::read_lines(path)?
        .into_iter()
        .map(|(number, line)| {
            serde_json::from_str(&line)
                .map_err(|e| StageError::data(path, Some(number), e.to_string()))
        })
        .collect()
}
