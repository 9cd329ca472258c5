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
    /// 0 turns the check off. Templates keep seed wording between slots, so short runs are
    /// expected; 12 words is about a full clause, which is where copying starts to identify
    /// its source report.
    pub max_copied_ngram: usize,
}

impl Default for FilterParams {
    fn default() -> Self {
        Self {
            near_duplicate_threshold: 0.9,
            shingle_words: 3,
            max_copied_ngram: 12,
        }
    }
}

impl Validate for FilterParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(self.near_duplicate_threshold > 0.0 && self.near_duplicate_threshold <= 1.0) {
            return Err(ParamError::new(
                "near_duplicate_threshold",
                "must be in (0, 1]",
            ));
        }
        if !(1..=10).contains(&self.shingle_words) {
            return Err(ParamError::new("shingle_words", "must be between 1 and 10"));
        }
        if self.max_copied_ngram != 0 && !(4..=1000).contains(&self.max_copied_ngram) {
            return Err(
                ParamError::new("max_copied_ngram", "must be 0 or between 4 and 1000")
                    .with_help("short n-grams are shared by any two reports on the same topic"),
            );
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
        InputSpec {
            name: "records",
            required: true,
            doc: "Output of a `detail` stage.",
        },
        InputSpec {
            name: "seed",
            required: true,
            doc: "Output of the `seed` stage.",
        },
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
