//! `eval` and `compare`: the `eval` stage's evaluation outside a recipe,
//! and metric deltas between two evaluations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use miette::{IntoDiagnostic, miette};
use watchfire::adapt::tasks::{Example, Task, TaskConfig, build};
use watchfire::corpus::{read_jsonl, read_records};
use watchfire::eval::evaluate::{
    EvalConfig, MaxTokens, SubjectInfo, evaluate, first_reports, report_count,
};
use watchfire::eval::score::Figure;
use watchfire::eval::subject::{Subject, load_f32};
use watchfire::schema::{EntityRole, EntitySchema};
use watchfire::stages::eval::{EvalMetrics, headline};
use watchfire::stages::seed::{SeedFormat, read_reports};

use super::render::Table;
use super::show::stage_output;
use super::{Global, load};

/// What `--data` holds.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataFormat {
    /// Examples, as a `tasks` stage writes them (`validation.jsonl`).
    Examples,
    /// Annotated reports, as a `seed` or `filter` stage writes them.
    Records,
    /// IDRISI-R tweets with location spans (a file or a folder of `*.jsonl`).
    Idrisi,
    /// SAFENET reports (a file or a folder of `*.csv`).
    Safenet,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: super::model::ModelArg,
    /// A `train` artifact folder, or an adapter folder.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The data to evaluate on.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t = DataFormat::Examples)]
    pub format: DataFormat,
    /// Take the entity schema (key and peripheral types) from this recipe [default: every
    /// type in the data is key].
    #[arg(long, value_name = "RECIPE")]
    pub schema_from: Option<PathBuf>,
    /// Subtasks to evaluate (repeatable): entities, summary, alert [default: all three].
    #[arg(long = "task", value_parser = super::model::parse_task)]
    pub tasks: Vec<Task>,
    /// Evaluate the first N reports only.
    #[arg(long, value_name = "N")]
    pub max_reports: Option<usize>,
    /// Bootstrap resamples for the intervals.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Prompts of one task decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the metrics as JSON to this file (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

pub fn eval(global: &Global, args: EvalArgs) -> miette::Result<ExitCode> {
    let model_path = super::model::model_path(global, &args.model)?;
    let tasks: Vec<Task> =
        if args.tasks.is_empty() { Task::ALL.to_vec() } else { args.tasks.clone() };
    let (examples, schema) = read_data(global, &args, &tasks)?;
    let base = load_f32(&model_path).map_err(|e| miette!("{e}"))?;
    let subject =
        Subject::load(&model_path, args.adapter.as_deref()).map_err(|e| miette!("{e}"))?;
    let layers = base.config().num_hidden_layers;
    let config = EvalConfig {
        schema: &schema,
        max_tokens: MaxTokens::default(),
        entity_types: &[],
        resamples: args.resamples,
        seed: args.seed,
        batch: args.batch,
        embedding_layer: layers / 2,
        embedding_reports: 0,
        general: None,
    };
    let bar = super::model::progress_bar(global, examples.len() as u64, "answers");
    let evaluation = evaluate(&subject, &base, &examples, &config, |n| bar.inc(n as u64))
        .map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    let metrics = EvalMetrics {
        subject: SubjectInfo::of(&subject, &base),
        reports: report_count(&examples),
        scores: evaluation.scores,
        general: None,
        embeddings: None,
    };
    print_metrics(&metrics);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&metrics).into_diagnostic()?;
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            fs_err::write(path, text + "\n").into_diagnostic()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The examples of `--data` and the schema they are scored under.
fn read_data(
    global: &Global,
    args: &EvalArgs,
    tasks: &[Task],
) -> miette::Result<(Vec<Example>, EntitySchema)> {
    let recipe_schema = match &args.schema_from {
        Some(recipe) => Some(load(global, recipe, &[])?.schema),
        None => None,
    };
    if args.format == DataFormat::Examples {
        let mut examples: Vec<Example> = read_jsonl(&args.data).map_err(|e| miette!("{e}"))?;
        examples.retain(|e| tasks.contains(&e.task));
        let schema = recipe_schema.unwrap_or_else(|| {
            schema_of(examples.iter().flat_map(|e| e.spans.iter().map(|s| s.kind.as_str())))
        });
        return Ok((first_reports(examples, args.max_reports.unwrap_or(0)), schema));
    }
    let records = match args.format {
        DataFormat::Records => read_records(&args.data).map_err(|e| miette!("{e}"))?,
        format => {
            let seed_format =
                if format == DataFormat::Idrisi { SeedFormat::Idrisi } else { SeedFormat::Safenet };
            // Readers check spans against a schema; accept every type here.
            let open = schema_of(["location", "state", "incident_name", "resource"]);
            let schema = recipe_schema.as_ref().unwrap_or(&open);
            read_reports(&args.data, seed_format, schema, None, || {})
                .map_err(|e| miette!("{e}"))?
                .0
        }
    };
    let records = match args.max_reports {
        Some(n) => records.into_iter().take(n).collect(),
        None => records,
    };
    let schema = recipe_schema.unwrap_or_else(|| {
        schema_of(records.iter().flat_map(|r| r.entities.iter().map(|e| e.kind.as_str())))
    });
    let config =
        TaskConfig { tasks: tasks.to_vec(), validation_share: 0.5, max_records: 0, seed: 0 };
    let built = build(records, &schema, &config).map_err(|e| miette!("{e}"))?;
    let mut examples = built.train;
    examples.extend(built.validation);
    Ok((examples, schema))
}

/// A schema in which every given type is a key type.
fn schema_of<'a>(types: impl IntoIterator<Item = &'a str>) -> EntitySchema {
    EntitySchema(types.into_iter().map(|t| (t.to_string(), EntityRole::Key)).collect())
}

fn fmt(figure: Option<Figure>) -> String {
    match figure {
        None => "–".to_string(),
        Some(f) => format!("{:.3}  [{:.3}, {:.3}]", f.value, f.low, f.high),
    }
}

fn print_metrics(metrics: &EvalMetrics) {
    let s = &metrics.scores;
    println!(
        "{} ({:.2}% trainable), {} reports, {} answers",
        metrics.subject.method,
        metrics.subject.trainable_percent,
        metrics.reports,
        s.examples.values().sum::<usize>()
    );
    let mut table = Table::new(&["metric", "value  [95% interval]"]);
    table.row(vec!["key F1".into(), fmt(s.key_entities.as_ref().map(|e| e.f1))]);
    table.row(vec!["all-type F1".into(), fmt(s.all_entities.as_ref().map(|e| e.f1))]);
    table.row(vec!["CIRS".into(), fmt(s.cirs)]);
    table.row(vec!["CCI".into(), fmt(s.cci)]);
    for (task, count) in &s.malformed {
        if *count > 0 {
            table.row(vec![format!("malformed {}", task.name()), count.to_string()]);
        }
    }
    print!("{}", table.render());
}

#[derive(Args)]
pub struct CompareArgs {
    /// An `eval` artifact: a stage instance of the recipe (`eval@lora`), an artifact folder,
    /// or a `metrics.json`.
    pub a: String,
    /// The evaluation to compare with `a`.
    pub b: String,
    /// The recipe the stage names belong to [default: the last one run with this cache].
    #[arg(long, short)]
    pub recipe: Option<PathBuf>,
}

pub fn compare(global: &Global, args: CompareArgs) -> miette::Result<ExitCode> {
    let a = read_metrics(global, &args.recipe, &args.a)?;
    let b = read_metrics(global, &args.recipe, &args.b)?;
    println!("{} vs {}", args.a, args.b);
    let mut table = Table::new(&["metric", &args.a, &args.b, "delta (a - b)"]);
    for (name, x, y) in metric_pairs(&a, &b) {
        let delta = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.3}", x - y),
            _ => "–".to_string(),
        };
        let show = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
        table.row(vec![name, show(x), show(y), delta]);
    }
    print!("{}", table.render());
    println!("a: {}\nb: {}", headline(&a.scores), headline(&b.scores));
    Ok(ExitCode::SUCCESS)
}

/// Every figure both evaluations may have, by name.
fn metric_pairs(a: &EvalMetrics, b: &EvalMetrics) -> Vec<(String, Option<f64>, Option<f64>)> {
    let figures = |m: &EvalMetrics| -> BTreeMap<&'static str, Option<f64>> {
        let s = &m.scores;
        BTreeMap::from([
            ("1 trainable %", Some(m.subject.trainable_percent)),
            ("2 key F1", s.key_entities.as_ref().map(|e| e.f1.value)),
            ("3 key precision", s.key_entities.as_ref().map(|e| e.precision)),
            ("4 key recall", s.key_entities.as_ref().map(|e| e.recall)),
            ("5 all-type F1", s.all_entities.as_ref().map(|e| e.f1.value)),
            ("6 CIRS", s.cirs.map(|f| f.value)),
            ("7 CCI", s.cci.map(|f| f.value)),
            ("8 perplexity ratio", m.general.as_ref().map(|g| g.perplexity_ratio)),
            ("9 mean KL", m.general.as_ref().map(|g| g.mean_kl)),
        ])
    };
    let (fa, fb) = (figures(a), figures(b));
    fa.iter()
        .map(|(name, x)| (name[2..].to_string(), *x, fb.get(name).copied().flatten()))
        .collect()
}

fn read_metrics(
    global: &Global,
    recipe: &Option<PathBuf>,
    spec: &str,
) -> miette::Result<EvalMetrics> {
    let path = Path::new(spec);
    let file = if path.is_file() {
        path.to_path_buf()
    } else if path.is_dir() {
        path.join("metrics.json")
    } else {
        stage_output(global, recipe.clone(), spec)?.join("metrics.json")
    };
    let text = fs_err::read_to_string(&file).into_diagnostic()?;
    serde_json::from_str(&text)
        .map_err(|e| miette!("{}: not an `eval` artifact's metrics: {e}", file.display()))
}
