//! `tasks`: training and validation examples for entity extraction, report
//! summary and alert generation, split by template.

use std::collections::BTreeSet;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapt::tasks::{Task, TaskConfig, build};
use crate::corpus::{read_records, write_json, write_jsonl};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};

pub struct Tasks;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TasksParams {
    /// Subtasks to write examples for: `entities` (report -> one `type: value` line per
    /// entity), `summary` (report -> one or two sentences stating every key fact verbatim),
    /// `alert` (report -> `SCENE | place | time | severity | hazard`). Each record's examples
    /// are written in that order, whatever the order here.
    pub tasks: Vec<Task>,
    /// Share of templates whose records go to validation, in (0, 1). A hash of the stage
    /// seed and the template id decides, so no template is on both sides; records without
    /// provenance (real seed reports) are split by a hash of their id instead. With two
    /// templates or more, both sides get at least one.
    pub validation_share: f64,
    /// Use only the first this many records of the input, in file order; 0 uses all.
    pub max_records: usize,
}

impl Default for TasksParams {
    fn default() -> Self {
        Self { tasks: Task::ALL.to_vec(), validation_share: 0.1, max_records: 0 }
    }
}

impl Validate for TasksParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.tasks.is_empty() {
            return Err(ParamError::new("tasks", "must name at least one task")
                .with_help("the tasks are `entities`, `summary` and `alert`"));
        }
        let distinct: BTreeSet<Task> = self.tasks.iter().copied().collect();
        if distinct.len() != self.tasks.len() {
            return Err(ParamError::new("tasks", "names a task twice"));
        }
        if !(self.validation_share > 0.0 && self.validation_share < 1.0) {
            return Err(ParamError::new("validation_share", "must be in (0, 1)"));
        }
        Ok(())
    }
}

impl Stage for Tasks {
    type Params = TasksParams;

    const KIND: &'static str = "tasks";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Turns annotated reports into prompt/target examples for three \
        subtasks: entity extraction (one `type: value` line per entity of a schema type), \
        report summary (one or two sentences stating every key fact verbatim) and alert \
        generation (`SCENE | place | time | severity | hazard`). Targets are built from the \
        gold spans and attributes, and each example lists the key facts its target states. \
        Train and validation are split by template, so no validation report shares a template \
        with a training report; records without provenance (real seed reports) are split by \
        their id.";
    const INPUTS: &'static [InputSpec] = &[InputSpec {
        name: "records",
        required: true,
        doc: "Annotated reports: a `filter` stage's output (`corpus.jsonl`), or a `seed` stage's \
              (`records.jsonl`).",
    }];
    const OUTPUTS: &'static [&'static str] = &["train.jsonl", "validation.jsonl", "stats.json"];
    const USES_SCHEMA: bool = true;

    fn run(params: &TasksParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let path = records_file(ctx)?;
        let records = read_records(&path)?;
        let progress = ctx.progress(Some(records.len() as u64), "records");
        let config = TaskConfig {
            tasks: params.tasks.clone(),
            validation_share: params.validation_share,
            max_records: params.max_records,
            seed: ctx.seed,
        };
        let built = build(records, ctx.schema, &config)
            .map_err(|message| StageError::data(&path, None, message))?;
        progress.inc(built.stats.records_used as u64);
        if built.validation.is_empty() {
            ctx.notice("validation is empty: the input has a single template");
        }
        write_jsonl(&ctx.output("train.jsonl"), &built.train)?;
        write_jsonl(&ctx.output("validation.jsonl"), &built.validation)?;
        write_json(&ctx.output("stats.json"), &built.stats)
    }
}

/// The records file: the input itself, or in an artifact folder `corpus.jsonl`
/// (`filter`) or else `records.jsonl` (`seed`, `detail`).
fn records_file(ctx: &StageContext<'_>) -> Result<PathBuf, StageError> {
    let input = ctx.input("records")?;
    if !input.is_dir() {
        return Ok(input.to_path_buf());
    }
    ["corpus.jsonl", "records.jsonl"].iter().map(|name| input.join(name)).find(|p| p.is_file()).ok_or_else(
        || {
            StageError::data(
                input,
                None,
                "holds neither `corpus.jsonl` (a `filter` output) nor `records.jsonl` (a `seed` output)",
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::adapt::tasks::{Example, parse_entities};
    use crate::corpus::Record;
    use crate::schema::EntitySchema;
    use crate::stages::detail::{Detail, DetailParams};
    use crate::stages::filter::{Filter, FilterParams};
    use crate::stages::scene::{Scene, SceneParams};
    use crate::stages::seed::{Seed, SeedParams};
    use crate::synth::testkit::{Harness, tiny_schema, tiny_seed};

    /// seed -> scene -> detail -> filter; returns the seed and filter output folders.
    fn corpus(h: &Harness, count: usize, seed: u64) -> (PathBuf, PathBuf) {
        let schema = tiny_schema();
        let data = h.write_records("seed.jsonl", &tiny_seed());
        let seed_out =
            h.run::<Seed>(&SeedParams::default(), &[("data", &data)], seed, &schema).unwrap();
        let templates =
            h.run::<Scene>(&SceneParams::default(), &[("seed", &seed_out)], seed, &schema);
        let records = h
            .run::<Detail>(
                &DetailParams { count, ..Default::default() },
                &[("templates", &templates.unwrap()), ("seed", &seed_out)],
                seed,
                &schema,
            )
            .unwrap();
        let filter = h
            .run::<Filter>(
                &FilterParams { max_copied_ngram: 0, ..Default::default() },
                &[("records", &records), ("seed", &seed_out)],
                seed,
                &EntitySchema::default(),
            )
            .unwrap();
        (seed_out, filter)
    }

    fn run_tasks(h: &Harness, params: &TasksParams, input: &Path, seed: u64) -> PathBuf {
        h.run::<Tasks>(params, &[("records", input)], seed, &tiny_schema()).unwrap()
    }

    fn examples(path: PathBuf) -> Vec<Example> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn outputs(dir: &Path) -> Vec<Vec<u8>> {
        Tasks::OUTPUTS.iter().map(|name| std::fs::read(dir.join(name)).unwrap()).collect()
    }

    #[test]
    fn same_input_and_seed_give_the_same_bytes() {
        let h = Harness::new();
        let (_, filter) = corpus(&h, 200, 1);
        let params = TasksParams::default();
        let a = run_tasks(&h, &params, &filter, 5);
        let b = run_tasks(&h, &params, &filter, 5);
        assert_eq!(outputs(&a), outputs(&b));
        let c = run_tasks(&h, &params, &filter, 6);
        assert_ne!(outputs(&a)[0], outputs(&c)[0], "another seed, another split");
    }

    #[test]
    fn a_filter_corpus_becomes_split_examples() {
        let h = Harness::new();
        let (_, filter) = corpus(&h, 300, 2);
        let out = run_tasks(&h, &TasksParams::default(), &filter, 3);
        let records = read_records(&filter.join("corpus.jsonl")).unwrap();
        let train = examples(out.join("train.jsonl"));
        let validation = examples(out.join("validation.jsonl"));
        assert_eq!(train.len() + validation.len(), records.len() * 3);
        assert!(!train.is_empty() && !validation.is_empty());
        let templates = |examples: &[Example]| -> BTreeSet<String> {
            examples.iter().map(|e| e.template_id.clone().unwrap()).collect()
        };
        assert!(templates(&train).is_disjoint(&templates(&validation)));
        for example in train.iter().chain(&validation) {
            let record: &Record = records.iter().find(|r| r.id == example.source_id).unwrap();
            match example.task {
                Task::Entities => {
                    let mut gold: Vec<_> = record.entities.iter().collect();
                    gold.sort_by_key(|e| e.start);
                    let gold: Vec<(String, String)> =
                        gold.iter().map(|e| (e.kind.clone(), e.value.clone().unwrap())).collect();
                    assert_eq!(parse_entities(&example.target), gold);
                }
                _ => {
                    for fact in &example.key_facts {
                        assert!(example.target.contains(&fact.value), "{}", example.target);
                    }
                }
            }
        }
        let stats: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap())
                .unwrap();
        assert_eq!(stats["records_used"], records.len());
        assert_eq!(stats["split_by_template"], records.len());
        assert!(stats["validation"]["groups"].as_u64().unwrap() >= 1);
    }

    #[test]
    fn seed_records_are_read_from_the_seed_artifact_and_split_by_id() {
        let h = Harness::new();
        let (seed_out, _) = corpus(&h, 50, 1);
        let params =
            TasksParams { tasks: vec![Task::Alert], validation_share: 0.3, max_records: 0 };
        let out = run_tasks(&h, &params, &seed_out, 1);
        let train = examples(out.join("train.jsonl"));
        let validation = examples(out.join("validation.jsonl"));
        assert_eq!(train.len() + validation.len(), tiny_seed().len());
        assert!(!train.is_empty() && !validation.is_empty());
        assert!(train.iter().chain(&validation).all(|e| e.template_id.is_none()));
        assert!(train.iter().chain(&validation).all(|e| e.task == Task::Alert));
    }

    #[test]
    fn params_are_checked() {
        let bad = |params: TasksParams| params.validate().unwrap_err().param;
        let base = TasksParams::default();
        assert_eq!(bad(TasksParams { tasks: vec![], ..base.clone() }), "tasks");
        assert_eq!(
            bad(TasksParams { tasks: vec![Task::Alert, Task::Alert], ..base.clone() }),
            "tasks"
        );
        assert_eq!(bad(TasksParams { validation_share: 0.0, ..base.clone() }), "validation_share");
        assert_eq!(bad(TasksParams { validation_share: 1.0, ..base }), "validation_share");
        assert!(TasksParams::default().validate().is_ok());
    }

    #[test]
    fn an_empty_schema_is_refused() {
        let h = Harness::new();
        let (_, filter) = corpus(&h, 20, 1);
        let err = h
            .run::<Tasks>(
                &TasksParams::default(),
                &[("records", &filter)],
                1,
                &EntitySchema::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");
    }
}
