//! `filter`: keeps consistent, uncopied, non-duplicate synthetic records.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{read_records, write_json, write_jsonl};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::synth::filter::{FilterConfig, filter};

pub struct Filter;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FilterParams {
    /// Drop a record whose estimated Jaccard similarity (MinHash over word shingles) with an
    /// already kept record reaches this.
    pub near_duplicate_threshold: f64,
    /// Words per shingle for the near-duplicate check.
    pub shingle_words: usize,
    /// Drop a record that shares this many consecutive words verbatim with any seed report;
    /// 0 turns the check off. Templates keep seed wording between slots, and a slot-free
    /// seed sentence (about 15 words) is copied whole, so shorter runs are expected. 20 words
    /// catches passages longer than a sentence and keeps about nine records in ten of
    /// hierarchical output on the bundled seed (12 would keep three in ten).
    pub max_copied_ngram: usize,
}

impl Default for FilterParams {
    fn default() -> Self {
        Self { near_duplicate_threshold: 0.9, shingle_words: 3, max_copied_ngram: 20 }
    }
}

impl Validate for FilterParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(self.near_duplicate_threshold > 0.0 && self.near_duplicate_threshold <= 1.0) {
            return Err(ParamError::new("near_duplicate_threshold", "must be in (0, 1]"));
        }
        if !(1..=10).contains(&self.shingle_words) {
            return Err(ParamError::new("shingle_words", "must be between 1 and 10"));
        }
        if self.max_copied_ngram != 0 && !(4..=1000).contains(&self.max_copied_ngram) {
            return Err(ParamError::new("max_copied_ngram", "must be 0 or between 4 and 1000")
                .with_help("short n-grams are shared by any two reports on the same topic"));
        }
        Ok(())
    }
}

impl Stage for Filter {
    type Params = FilterParams;

    const KIND: &'static str = "filter";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Re-checks every synthetic record independently of the generator \
        (spans, counts against severity, times against time of day, vehicles against scene, \
        provenance), drops records that copy long word runs from the seed or nearly duplicate a \
        kept record, and reports drop reasons, diversity and template usage.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec { name: "records", required: true, doc: "Output of a `detail` stage." },
        InputSpec { name: "seed", required: true, doc: "Output of the `seed` stage." },
    ];
    const OUTPUTS: &'static [&'static str] = &["corpus.jsonl", "dropped.jsonl", "report.json"];

    fn run(params: &FilterParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let records = read_records(&ctx.input_file("records", "records.jsonl")?)?;
        let seed = read_records(&ctx.input_file("seed", "records.jsonl")?)?;
        let progress = ctx.progress(Some(records.len() as u64), "records");
        let config = FilterConfig {
            near_duplicate_threshold: params.near_duplicate_threshold,
            shingle_words: params.shingle_words,
            max_copied_ngram: params.max_copied_ngram,
        };
        let outcome = filter(records, &seed, &config);
        progress.inc(outcome.report.input as u64);
        write_jsonl(&ctx.output("corpus.jsonl"), &outcome.kept)?;
        write_jsonl(&ctx.output("dropped.jsonl"), &outcome.dropped)?;
        write_json(&ctx.output("report.json"), &outcome.report)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::corpus::read_lines;
    use crate::schema::EntitySchema;
    use crate::stages::detail::{Detail, DetailParams};
    use crate::stages::scene::{Scene, SceneParams};
    use crate::stages::seed::{Seed, SeedParams};
    use crate::synth::checks::{SeedFacts, check};
    use crate::synth::template::Mode;
    use crate::synth::testkit::{Harness, assert_spans_slice, tiny_schema, tiny_seed};

    /// seed -> scene -> detail -> filter; returns the filter's output folder.
    fn chain(h: &Harness, data: &Path, mode: Mode, count: usize, seed: u64) -> PathBuf {
        let schema = tiny_schema();
        let seed_out = h.run::<Seed>(&SeedParams::default(), &[("data", data)], seed, &schema);
        let seed_out = seed_out.unwrap();
        let scene_params = SceneParams { mode, ..Default::default() };
        let templates = h.run::<Scene>(&scene_params, &[("seed", &seed_out)], seed, &schema);
        let records = h.run::<Detail>(
            &DetailParams { count, ..Default::default() },
            &[("templates", &templates.unwrap()), ("seed", &seed_out)],
            seed,
            &schema,
        );
        let inputs = [("records", records.unwrap()), ("seed", seed_out)];
        let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(k, p)| (*k, p.as_path())).collect();
        h.run::<Filter>(&FilterParams::default(), &inputs, seed, &EntitySchema::default()).unwrap()
    }

    fn report(out: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
    }

    #[test]
    fn kept_records_pass_every_check_and_report_is_complete() {
        let h = Harness::new();
        let data = h.write_records("seed.jsonl", &tiny_seed());
        let out = chain(&h, &data, Mode::Hierarchical, 400, 1);
        let kept = crate::corpus::read_records(&out.join("corpus.jsonl")).unwrap();
        assert!(!kept.is_empty());
        assert_spans_slice(&kept);
        let facts = SeedFacts::learn(&tiny_seed());
        assert!(kept.iter().all(|r| check(r, &facts).is_ok()));

        let report = report(&out);
        let dropped = read_lines(&out.join("dropped.jsonl")).unwrap().len();
        assert_eq!(report["input"], 400);
        assert_eq!(report["kept"].as_u64().unwrap() as usize + dropped, 400);
        assert!(report["diversity"]["distinct_2"].as_f64().unwrap() > 0.0);
        assert!(report["templates"]["distinct"].as_u64().unwrap() > 1);
        assert!(report["dropped"]["near_duplicate"].is_u64());
    }

    #[test]
    fn filter_is_deterministic_and_seed_sensitive() {
        let h = Harness::new();
        let data = h.write_records("seed.jsonl", &tiny_seed());
        let read = |out: PathBuf| std::fs::read(out.join("corpus.jsonl")).unwrap();
        let a = read(chain(&h, &data, Mode::Hierarchical, 300, 1));
        assert_eq!(a, read(chain(&h, &data, Mode::Hierarchical, 300, 1)));
        assert_ne!(a, read(chain(&h, &data, Mode::Hierarchical, 300, 2)));
    }

    #[test]
    fn inconsistent_and_duplicate_records_are_dropped() {
        let seed = tiny_seed();
        let mut good = seed[3].clone();
        good.id = "g".into();
        good.synthetic = true;
        good.text = good.text.replace("This evening", "This evening, as reported,");
        good.entities = crate::synth::testkit::report(
            "g",
            "collision",
            &good.text,
            &[("time", "18:20"), ("vehicle", "motorcycle")],
            &[],
        )
        .entities;
        good.provenance = Some(crate::corpus::Provenance {
            generator: "test".into(),
            mode: "hierarchical".into(),
            template_id: "t".into(),
            seed_ids: vec![],
            stage_key: "k".into(),
        });
        let mut twin = good.clone();
        twin.id = "twin".into();
        let mut late = good.clone();
        late.id = "late".into();
        late.attributes.insert("time_of_day".into(), "morning".into());
        let config = FilterConfig { max_copied_ngram: 0, ..params() };
        let outcome = crate::synth::filter::filter(vec![good, twin, late], &seed, &config);
        let reasons: Vec<(&str, &str)> =
            outcome.dropped.iter().map(|d| (d.id.as_str(), d.reason)).collect();
        assert_eq!(reasons, [("twin", "near_duplicate"), ("late", "time_mismatch")]);

        let copied = crate::synth::filter::filter(
            vec![outcome.kept[0].clone()],
            &seed,
            &FilterConfig { max_copied_ngram: 8, ..params() },
        );
        assert_eq!(copied.dropped[0].reason, "copied_ngram");
    }

    fn params() -> FilterConfig {
        let p = FilterParams::default();
        FilterConfig {
            near_duplicate_threshold: p.near_duplicate_threshold,
            shingle_words: p.shingle_words,
            max_copied_ngram: p.max_copied_ngram,
        }
    }

    /// The bundled seed set, when it is there: the figures the report quotes.
    #[test]
    fn bundled_seed_chain_figures() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/data/seed.jsonl");
        if !data.exists() {
            eprintln!("skipped: {} is absent", data.display());
            return;
        }
        let h = Harness::new();
        for mode in [Mode::Hierarchical, Mode::Flat] {
            let out = chain(&h, &data, mode, 2000, 42);
            let report = report(&out);
            let kept = crate::corpus::read_records(&out.join("corpus.jsonl")).unwrap();
            assert_spans_slice(&kept);
            assert!(report["kept"].as_u64().unwrap() > 0);
            eprintln!("{mode:?}: {}", serde_json::to_string(&report).unwrap());
        }
        let stats = std::fs::read_to_string(h.path().join("out-2-scene/stats.json")).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(stats["mode"], "hierarchical");
        for (scene, figures) in stats["scenes"].as_object().unwrap() {
            eprintln!("{scene}: {} templates, roles {}", figures["templates"], figures["roles"]);
        }
    }
}
