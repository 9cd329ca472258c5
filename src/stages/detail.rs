//! `detail`: G_detail, fills template slots conditioned on scene and attributes.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{read_records, write_json, write_jsonl};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::synth::detail::{DetailConfig, Generator};
use crate::synth::histogram::Privacy;
use crate::synth::llm::{self, LlmDetailConfig, LlmDetailStats, LlmParams};
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
    /// What fills the slots: `template` draws typed values from the seed; `llm` asks the
    /// `model` input for them under a JSON schema, one request per record, and flags records
    /// whose answer cannot be used for `filter` to drop.
    pub backend: Backend,
    /// Model calls of `backend: llm`. Unset: the defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmParams>,
}

impl Default for DetailParams {
    fn default() -> Self {
        Self {
            count: 1000,
            dp_epsilon: None,
            dp_threshold: 2.0,
            attributes: BTreeMap::new(),
            backend: Backend::Template,
            llm: None,
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
        if self.backend == Backend::Llm && self.dp_epsilon.is_some() {
            return Err(ParamError::new("dp_epsilon", "is not supported with `backend: llm`")
                .with_help("the LLM backend shows seed values to the model without noise"));
        }
        llm::validate_backend(self.backend, self.llm.as_ref())
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
    /// With `backend: llm`: requests, and records flagged invalid per reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    llm: Option<LlmDetailStats>,
}

impl Stage for Detail {
    type Params = DetailParams;

    const KIND: &'static str = "detail";
    const VERSION: u32 = 1;
    const DOC: &'static str = "G_detail: draws a scene, a template and attributes (time of day, \
        district, severity, agency) from the seed's distributions, fills every slot with a typed \
        value that agrees with them, and writes synthetic records with gold entity spans, a \
        synthetic marker and provenance. Optionally releases the seed's counts with Laplace noise. \
        With `backend: llm` a model writes the values instead, one JSON answer per record under a \
        schema that encodes the same constraints; records whose answer cannot be used are kept, \
        flagged `invalid`, for `filter` to drop and count.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec { name: "templates", required: true, doc: "Output of a `scene` stage." },
        InputSpec {
            name: "seed",
            required: true,
            doc: "Output of a `seed` stage: value distributions are counted on it.",
        },
        InputSpec {
            name: llm::MODEL_INPUT,
            required: false,
            doc: "A `model` stage: needed with `backend: llm`, refused without it.",
        },
    ];
    const OUTPUTS: &'static [&'static str] = &["records.jsonl", "stats.json"];

    fn run(params: &DetailParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let templates = read_templates(&ctx.input_file("templates", "templates.jsonl")?)?;
        let seed = read_records(&ctx.input_file("seed", "records.jsonl")?)?;
        if params.backend == Backend::Llm {
            return run_llm(params, ctx, &templates, &seed);
        }
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
        let records = generator.generate_with(ctx.seed, params.count, |n| progress.inc(n));
        let mut stats = DetailStats {
            records: records.len(),
            usable_templates: generator.usable_templates(),
            scenes: BTreeMap::new(),
            modes: BTreeMap::new(),
            dp_epsilon: params.dp_epsilon,
            llm: None,
        };
        for record in &records {
            *stats.scenes.entry(record.scene.clone()).or_default() += 1;
            let mode = record.provenance.as_ref().map(|p| p.mode.clone()).unwrap_or_default();
            *stats.modes.entry(mode).or_default() += 1;
        }
        write_jsonl(&ctx.output("records.jsonl"), &records)?;
        write_json(&ctx.output("stats.json"), &stats)
    }

    fn check_inputs(params: &DetailParams, bound: &[&str]) -> Result<(), ParamError> {
        llm::check_model_input(params.backend, bound)
    }
}

/// `detail` with `backend: llm`.
fn run_llm(
    params: &DetailParams,
    ctx: &StageContext<'_>,
    templates: &[Template],
    seed: &[crate::corpus::Record],
) -> Result<(), StageError> {
    let model = llm::load_model(ctx.input(llm::MODEL_INPUT)?)?;
    let config = LlmDetailConfig {
        params: params.llm.clone().unwrap_or_default(),
        pinned: params.attributes.clone(),
        stage_key: ctx.key.to_string(),
    };
    let progress = ctx.progress(Some(params.count as u64), "records");
    let (records, llm_stats) =
        llm::llm_records(templates, seed, &config, ctx.seed, params.count, model.as_ref(), || {
            progress.inc(1)
        })
        .map_err(StageError::failed)?;
    let mut stats = DetailStats {
        records: records.len(),
        usable_templates: llm_stats.usable_templates,
        scenes: BTreeMap::new(),
        modes: BTreeMap::new(),
        dp_epsilon: None,
        llm: Some(llm_stats),
    };
    for record in &records {
        *stats.scenes.entry(record.scene.clone()).or_default() += 1;
        let mode = record.provenance.as_ref().map(|p| p.mode.clone()).unwrap_or_default();
        *stats.modes.entry(mode).or_default() += 1;
    }
    write_jsonl(&ctx.output("records.jsonl"), &records)?;
    write_json(&ctx.output("stats.json"), &stats)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Record;
    use crate::schema::EntitySchema;
    use crate::stages::scene::{Scene, SceneParams};
    use crate::synth::slot_class::{DayPart, Severity, SlotClass, parse_clock};
    use crate::synth::template::Mode;
    use crate::synth::testkit::{Harness, assert_spans_slice, tiny_seed};

    fn generate(
        h: &Harness,
        mode: Mode,
        params: &DetailParams,
        seed: u64,
    ) -> (String, Vec<Record>) {
        let data = h.write_records("seed.jsonl", &tiny_seed());
        let schema = EntitySchema::default();
        let scene_params = SceneParams { mode, templates_per_scene: 10, ..Default::default() };
        let templates = h.run::<Scene>(&scene_params, &[("seed", &data)], 3, &schema).unwrap();
        let inputs = [("templates", templates.as_path()), ("seed", data.as_path())];
        let out = h.run::<Detail>(params, &inputs, seed, &schema).unwrap();
        let text = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
        (text, crate::corpus::read_records(&out.join("records.jsonl")).unwrap())
    }

    fn params(count: usize) -> DetailParams {
        DetailParams { count, ..Default::default() }
    }

    #[test]
    fn records_carry_valid_spans_and_provenance() {
        let h = Harness::new();
        let (_, records) = generate(&h, Mode::Hierarchical, &params(500), 1);
        assert_eq!(records.len(), 500);
        assert_spans_slice(&records);
        for r in &records {
            assert!(r.synthetic);
            let p = r.provenance.as_ref().unwrap();
            assert_eq!(
                (p.generator.as_str(), p.stage_key.as_str()),
                ("watchfire detail", "testkey")
            );
            assert!(!p.seed_ids.is_empty());
        }
    }

    #[test]
    fn values_agree_with_attributes() {
        let h = Harness::new();
        let (_, records) = generate(&h, Mode::Hierarchical, &params(500), 2);
        let seed = tiny_seed();
        for r in &records {
            let part = r.attributes.get("time_of_day").and_then(|v| DayPart::parse(v));
            for e in &r.entities {
                let value = e.value.as_deref().unwrap();
                match SlotClass::of(&e.kind) {
                    SlotClass::Time => {
                        let clock = parse_clock(value).expect(value);
                        assert_eq!(Some(DayPart::of_minute(clock)), part, "{}", r.text);
                    }
                    SlotClass::Fatalities => {
                        assert_eq!(
                            Severity::parse(&r.attributes["severity"]),
                            Some(Severity::High)
                        );
                    }
                    SlotClass::Vehicle => assert!(
                        seed.iter().any(|s| s.scene == r.scene
                            && s.entities.iter().any(|se| se.value.as_deref() == Some(value))),
                        "{value} in {}",
                        r.scene
                    ),
                    _ => {}
                }
            }
            let lower = r.text.to_lowercase();
            if let Some(part) = part {
                for other in DayPart::ALL.iter().filter(|p| **p != part) {
                    let word = format!(" {} ", other.name());
                    assert!(!lower.contains(&word), "{} with {part:?}: {}", other.name(), r.text);
                }
            }
        }
    }

    #[test]
    fn output_is_deterministic_per_seed_and_mode() {
        let h = Harness::new();
        let (a, _) = generate(&h, Mode::Hierarchical, &params(200), 5);
        let (b, _) = generate(&h, Mode::Hierarchical, &params(200), 5);
        let (c, _) = generate(&h, Mode::Hierarchical, &params(200), 6);
        let (flat, flat_records) = generate(&h, Mode::Flat, &params(200), 5);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, flat);
        assert_spans_slice(&flat_records);
        assert!(flat_records.iter().all(|r| r.provenance.as_ref().unwrap().mode == "flat"));
    }

    #[test]
    fn dp_changes_the_distribution_and_keeps_spans() {
        let h = Harness::new();
        let count = |records: &[Record]| {
            let mut by: BTreeMap<String, usize> = BTreeMap::new();
            for r in records {
                for e in &r.entities {
                    *by.entry(format!("{}={}", e.kind, e.value.as_deref().unwrap()))
                        .or_default() += 1;
                }
                *by.entry(format!("scene={}", r.scene)).or_default() += 1;
            }
            by
        };
        let (_, exact) = generate(&h, Mode::Hierarchical, &params(2000), 9);
        let private = DetailParams { dp_epsilon: Some(1.0), dp_threshold: 0.5, ..params(2000) };
        let (_, noisy) = generate(&h, Mode::Hierarchical, &private, 9);
        assert_spans_slice(&noisy);
        assert_ne!(count(&exact), count(&noisy));
        let (exact, noisy) = (count(&exact), count(&noisy));
        assert_ne!(exact, noisy);
        assert!(noisy.len() < exact.len(), "rare values drop: {} vs {}", noisy.len(), exact.len());
    }

    #[test]
    fn pinned_attributes_hold() {
        let h = Harness::new();
        let pinned = DetailParams {
            attributes: BTreeMap::from([
                ("severity".to_string(), "low".to_string()),
                ("time_of_day".to_string(), "morning".to_string()),
            ]),
            ..params(200)
        };
        let (_, records) = generate(&h, Mode::Hierarchical, &pinned, 4);
        for r in &records {
            assert_eq!(r.attributes["severity"], "low");
            assert!(r.entities.iter().all(|e| SlotClass::of(&e.kind) != SlotClass::Fatalities));
        }
    }

    #[test]
    fn params_are_range_checked() {
        assert!(DetailParams { dp_epsilon: Some(0.0), ..params(1) }.validate().is_err());
        assert!(DetailParams { count: 0, ..params(1) }.validate().is_err());
        assert!(params(1).validate().is_ok());
    }
}
