//! `seed`: reads the annotated seed reports (D_seed) into normalised records.

use std::collections::BTreeSet;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{Record, write_json, write_jsonl};
use crate::schema::EntitySchema;
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::synth::seed::{self, SeedStats, idrisi, jsonl, safenet};

pub struct Seed;

/// Layout of the seed input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SeedFormat {
    /// watchfire records, one JSON object per line, character offsets; strict.
    #[default]
    Jsonl,
    /// IDRISI-R gold tweets (`*.jsonl`): location spans, scene from `humAID_class`.
    Idrisi,
    /// SAFENET reports (`*.csv`): narrative text, spans found from structured fields.
    Safenet,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SeedParams {
    /// Layout of the input file or folder; a folder is read file by file in sorted order.
    pub format: SeedFormat,
    /// Read at most this many reports, in file order, before `share` applies.
    pub limit: Option<usize>,
    /// Fraction of the reports to keep, in (0, 1]: the paper's low-resource setting uses
    /// 0.1. The choice is a hash of the stage seed and each report id, so it is stable.
    pub share: f64,
}

impl Default for SeedParams {
    fn default() -> Self {
        Self { format: SeedFormat::Jsonl, limit: None, share: 1.0 }
    }
}

impl Validate for SeedParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !(self.share > 0.0 && self.share <= 1.0) {
            return Err(ParamError::new("share", "must be in (0, 1]"));
        }
        if self.limit == Some(0) {
            return Err(ParamError::new("limit", "must be at least 1"));
        }
        Ok(())
    }
}

/// Reads every report of a file or folder in `format`, at most `limit`;
/// `on_file` is called after each file. Fails when there is none.
pub fn read_reports(
    input: &Path,
    format: SeedFormat,
    schema: &EntitySchema,
    limit: Option<usize>,
    mut on_file: impl FnMut(),
) -> Result<(Vec<Record>, SeedStats), StageError> {
    let (ext, read): (&str, Reader) = match format {
        SeedFormat::Jsonl => ("jsonl", jsonl::read),
        SeedFormat::Idrisi => ("jsonl", idrisi::read),
        SeedFormat::Safenet => ("csv", safenet::read),
    };
    let files = seed::input_files(input, ext)?;
    let limit = limit.unwrap_or(usize::MAX);
    let mut stats = SeedStats::default();
    let mut records = Vec::new();
    let mut ids = BTreeSet::new();
    for file in &files {
        read(file, schema, &mut records, &mut ids, &mut stats, limit)?;
        stats.files.push(file.file_name().unwrap_or_default().to_string_lossy().into_owned());
        on_file();
    }
    if records.is_empty() {
        return Err(StageError::data(input, None, "no reports found"));
    }
    Ok((records, stats))
}

impl Stage for Seed {
    type Params = SeedParams;

    const KIND: &'static str = "seed";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Reads annotated seed reports (watchfire JSONL, IDRISI-R tweets or \
        SAFENET CSV) into normalised records with character offsets, checks every span against \
        the text and the recipe's entity schema, and optionally keeps a stable share of them.";
    const INPUTS: &'static [InputSpec] = &[InputSpec {
        name: "data",
        required: true,
        doc: "A seed file, or a folder of them read in sorted order.",
    }];
    const OUTPUTS: &'static [&'static str] = &["records.jsonl", "stats.json"];
    const USES_SCHEMA: bool = true;

    fn run(params: &SeedParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let input = ctx.input("data")?;
        let progress = ctx.progress(None, "files");
        let (records, mut stats) =
            read_reports(input, params.format, ctx.schema, params.limit, || progress.inc(1))?;
        let records = seed::select_share(records, params.share, ctx.seed);
        stats.count(&records);
        write_jsonl(&ctx.output("records.jsonl"), &records)?;
        write_json(&ctx.output("stats.json"), &stats)
    }
}

type Reader = fn(
    &std::path::Path,
    &crate::schema::EntitySchema,
    &mut Vec<crate::corpus::Record>,
    &mut BTreeSet<String>,
    &mut SeedStats,
    usize,
) -> Result<(), StageError>;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::corpus::read_records;
    use crate::schema::EntitySchema;
    use crate::synth::testkit::{Harness, assert_spans_slice, tiny_schema};

    fn run(
        h: &Harness,
        params: &SeedParams,
        data: &Path,
    ) -> Result<Vec<crate::corpus::Record>, StageError> {
        let out = h.run::<Seed>(params, &[("data", data)], 1, &tiny_schema())?;
        read_records(&out.join("records.jsonl"))
    }

    fn jsonl_error(lines: &[&str]) -> (Option<usize>, String) {
        let h = Harness::new();
        let path = h.path().join("seed.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        match run(&h, &SeedParams::default(), &path) {
            Err(StageError::Data { file, line, message }) => {
                assert_eq!(file, path);
                (line, message)
            }
            other => panic!("expected a data error, got {other:?}"),
        }
    }

    const GOOD: &str = r#"{"text": "Fire at 22:40 in Zürich", "scene": "fire", "entities": [{"type": "time", "start": 8, "end": 13}, {"type": "location", "start": 17, "end": 23}]}"#;

    #[test]
    fn reads_char_offsets_and_fills_ids_and_values() {
        let h = Harness::new();
        let path = h.path().join("seed.jsonl");
        std::fs::write(&path, format!("{GOOD}\n\n{GOOD}\n")).unwrap();
        let records = run(&h, &SeedParams::default(), &path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].id, "seed-1");
        assert_eq!(records[1].id, "seed-3");
        assert_eq!(records[0].entities[1].value.as_deref(), Some("Zürich"));
        assert_spans_slice(&records);
    }

    #[test]
    fn span_errors_name_the_line() {
        let bad = |entities: &str| {
            format!(
                r#"{{"text": "Fire at 22:40 in Zürich", "scene": "fire", "entities": {entities}}}"#
            )
        };
        let cases = [
            (bad(r#"[{"type": "time", "start": 8, "end": 30}]"#), "past the end of the text"),
            (bad(r#"[{"type": "time", "start": 9, "end": 9}]"#), "start must be below end"),
            (
                bad(
                    r#"[{"type": "time", "start": 8, "end": 13}, {"type": "time", "start": 10, "end": 14}]"#,
                ),
                "entity 1 and entity 2 overlap",
            ),
            (bad(r#"[{"type": "colour", "start": 0, "end": 4}]"#), "not in the recipe schema"),
            (
                bad(r#"[{"type": "time", "start": 8, "end": 13, "value": "22:41"}]"#),
                "does not match the text `22:40`",
            ),
        ];
        for (line, expected) in cases {
            let (at, message) = jsonl_error(&[GOOD, GOOD, &line]);
            assert_eq!(at, Some(3), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn share_and_limit_select_stably() {
        let h = Harness::new();
        let path = h.path().join("seed.jsonl");
        std::fs::write(&path, vec![GOOD; 40].join("\n")).unwrap();
        let limited =
            run(&h, &SeedParams { limit: Some(30), ..Default::default() }, &path).unwrap();
        assert_eq!(limited.len(), 30);
        let params = SeedParams { share: 0.1, ..Default::default() };
        let a = run(&h, &params, &path).unwrap();
        assert_eq!(a.len(), 4);
        assert_eq!(a, run(&h, &params, &path).unwrap());
        assert!(SeedParams { share: 0.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn idrisi_offsets_are_repaired_or_dropped() {
        let h = Harness::new();
        let dir = h.path().join("idrisi");
        std::fs::create_dir(&dir).unwrap();
        let tweet = r#"{"tweet_id": "1", "text": "Floods in Chico and Paradise, Cal", "humAID_class": "caution_and_advice", "location_mentions": [{"text": "Chico", "type": "City/town", "start_offset": 10, "end_offset": 15}, {"text": "Paradise", "type": "City/town", "start_offset": 2, "end_offset": 10}, {"text": "Oroville", "type": "City/town", "start_offset": 0, "end_offset": 8}]}"#;
        std::fs::write(dir.join("b_fire_2018_dev.jsonl"), tweet).unwrap();
        std::fs::write(dir.join("a_fire_2018_train.jsonl"), tweet.replace("\"1\"", "\"2\""))
            .unwrap();
        let params = SeedParams { format: SeedFormat::Idrisi, ..Default::default() };
        let out = h.run::<Seed>(&params, &[("data", &dir)], 1, &EntitySchema::default()).unwrap();
        let records = read_records(&out.join("records.jsonl")).unwrap();
        assert_eq!(records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["2", "1"]);
        assert_eq!(records[0].attributes["event"], "a_fire_2018");
        let values: Vec<_> = records[0].entities.iter().map(|e| e.value.clone().unwrap()).collect();
        assert_eq!(values, ["Chico", "Paradise"]);
        let stats: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap())
                .unwrap();
        assert_eq!(stats["repaired"], 2);
        assert_eq!(stats["dropped"]["mention_not_found"], 2);
        assert_spans_slice(&records);
    }

    #[test]
    fn safenet_rows_become_records() {
        let h = Harness::new();
        let path = h.path().join("SAFENET_2005.csv");
        let csv = "\"ID\", \"SAFENET ID\", \"Event Start Date\", \"Incident Name\", \"Event State\", \
            \"Event Jurisdiction\", \"Event Resources\", \"Event Incident Type\", \
            \"Event Incident Activity\", \"Event Incident Stage\", \"Narrative\"\n\
            \"1\",\"ABC\",\"12/12/2005 14:00\",\"TWEEDY COMPLEX (REHAB)\",\"AZ\",\"BLM\",\
            \"Chase Truck, Engine, All\",\"All Risk;\",\"Transport to/from;\",\"Non-incident;\",\
            \"Driving in Arizona to the Tweedy Complex, the chase truck met an engine. AZ crews helped.\"\n\
            \"2\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\",\"\"\n";
        std::fs::write(&path, csv).unwrap();
        let params = SeedParams { format: SeedFormat::Safenet, ..Default::default() };
        let out = h.run::<Seed>(&params, &[("data", &path)], 1, &EntitySchema::default()).unwrap();
        let records = read_records(&out.join("records.jsonl")).unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!((r.id.as_str(), r.scene.as_str()), ("ABC", "transport_to_from"));
        assert_eq!(r.attributes["state"], "AZ");
        assert_eq!(r.attributes["year"], "2005");
        let found: Vec<(&str, &str)> =
            r.entities.iter().map(|e| (e.kind.as_str(), e.value.as_deref().unwrap())).collect();
        assert_eq!(
            found,
            [
                ("state", "Arizona"),
                ("incident_name", "Tweedy Complex"),
                ("resource", "chase truck"),
                ("resource", "engine"),
                ("state", "AZ")
            ]
        );
        assert_spans_slice(&records);
    }

    #[test]
    fn real_public_data_reads_when_present() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
        if !root.exists() {
            eprintln!("skipped: {} is absent", root.display());
            return;
        }
        let h = Harness::new();
        for (format, dir) in [(SeedFormat::Idrisi, "idrisi"), (SeedFormat::Safenet, "safenet")] {
            let params = SeedParams { format, ..Default::default() };
            let out =
                h.run::<Seed>(&params, &[("data", &root.join(dir))], 1, &EntitySchema::default());
            let records = read_records(&out.unwrap().join("records.jsonl")).unwrap();
            assert!(records.len() > 1000, "{dir}: {}", records.len());
            assert!(records.iter().filter(|r| !r.entities.is_empty()).count() > 500, "{dir}");
            assert_spans_slice(&records);
        }
    }
}
