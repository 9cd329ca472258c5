//! `report`: the evaluated variants of a recipe side by side, as Markdown
//! and a self-contained HTML page; see [`crate::eval::report`].
//!
//! The report reads `eval` artifacts gathered across variants
//! (`evals: eval@*`), so a recipe's baselines and ablations land in one
//! report that is rebuilt whenever any of them changes.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::{read_jsonl, write_json};
use crate::eval::embed::SpanEmbedding;
use crate::eval::projection::tsne;
use crate::eval::report::{
    ArtifactRef, FigureFile, Report as ReportData, Row, Table, html, markdown,
};
use crate::plot::{Series, line_chart, scatter};
use crate::recipe::DEFAULT_VARIANT;
use crate::schema::EntityRole;
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::stages::eval::EvalMetrics;

pub struct Report;

/// The row name of the `baseline` input.
const BASELINE: &str = "base";

/// One table of the report.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub title: String,
    /// Variants in row order.
    pub rows: Vec<String>,
    /// The variant the findings compare every other row with; default: the first row.
    #[serde(default)]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    pub title: String,
    /// The tables; default: one table of every variant, `default` first.
    pub tables: Vec<TableSpec>,
    /// How rows name each variant; default: the variant's name.
    pub labels: BTreeMap<String, String>,
    /// Variants whose entity-span embeddings are drawn as a t-SNE map; default: the first
    /// table's reference.
    pub projection: Vec<String>,
    /// t-SNE iterations.
    pub tsne_epochs: usize,
}

impl Default for ReportParams {
    fn default() -> Self {
        Self {
            title: "watchfire report".to_string(),
            tables: Vec::new(),
            labels: BTreeMap::new(),
            projection: Vec::new(),
            tsne_epochs: 1000,
        }
    }
}

impl Validate for ReportParams {
    fn validate(&self) -> Result<(), ParamError> {
        for (i, table) in self.tables.iter().enumerate() {
            if table.rows.is_empty() {
                return Err(ParamError::new(format!("tables.{i}.rows"), "must name a variant"));
            }
            if let Some(reference) = &table.reference
                && !table.rows.contains(reference)
            {
                return Err(ParamError::new(
                    format!("tables.{i}.reference"),
                    format!("`{reference}` is not one of the table's rows"),
                ));
            }
        }
        if !(100..=10_000).contains(&self.tsne_epochs) {
            return Err(ParamError::new("tsne_epochs", "must be between 100 and 10000"));
        }
        Ok(())
    }
}

impl Stage for Report {
    type Params = ReportParams;

    const KIND: &'static str = "report";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Puts evaluated variants side by side: tables of trainable \
        parameters, key-entity F1, CIRS and CCI with 95% intervals, on held-out synthetic \
        reports and (with `real`) on real text, plus retained general ability; findings that \
        state where the reference method wins and where it does not; the loss curves, the \
        probe's head heat map and a t-SNE map of key vs peripheral span embeddings with their \
        separation score. Every row names the artifacts it was read from. Writes \
        `report.md`, a self-contained `report.html`, `report.json` and the SVG figures. Bind \
        inputs across variants with `STAGE@*`.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec {
            name: "evals",
            required: true,
            doc: "`eval` stages on held-out synthetic reports: `eval@*` for every variant, or \
                  one `eval` stage.",
        },
        InputSpec {
            name: "real",
            required: false,
            doc: "`eval` stages on real text, gathered the same way.",
        },
        InputSpec {
            name: "baseline",
            required: false,
            doc: "An `eval` of the base model without an adapter: the first row of every \
                  table.",
        },
        InputSpec {
            name: "baseline_real",
            required: false,
            doc: "The base model's `eval` on real text.",
        },
        InputSpec {
            name: "trains",
            required: false,
            doc: "`train` stages (`train@*`), for the loss curves.",
        },
        InputSpec { name: "probe", required: false, doc: "A `probe` stage, for its heat map." },
    ];
    const OUTPUTS: &'static [&'static str] =
        &["report.md", "report.html", "report.json", "figures"];

    fn run(params: &ReportParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let evals = gathered(ctx, "evals");
        let real: BTreeMap<&str, &Path> = gathered(ctx, "real").into_iter().collect();
        let variants: Vec<&str> = ordered_variants(&evals);
        let specs = table_specs(params, &variants);
        let label = |v: &str| params.labels.get(v).cloned().unwrap_or_else(|| v.to_string());
        let evals: BTreeMap<&str, &Path> = evals.into_iter().collect();
        let mut tables = Vec::new();
        let mut missing = Vec::new();
        for spec in &specs {
            let mut rows = Vec::new();
            for variant in &spec.rows {
                let Some(path) = evals.get(variant.as_str()) else {
                    missing.push(variant.clone());
                    continue;
                };
                rows.push(Row {
                    variant: variant.clone(),
                    label: label(variant),
                    synthetic: read_eval(path)?,
                    real: real.get(variant.as_str()).map(|p| read_eval(p)).transpose()?,
                });
            }
            let reference =
                spec.reference.clone().or_else(|| rows.first().map(|r| r.variant.clone()));
            if let Some(path) = ctx.optional_input("baseline") {
                let base = Row {
                    variant: BASELINE.to_string(),
                    label: "base model, no adapter".to_string(),
                    synthetic: read_eval(path)?,
                    real: ctx.optional_input("baseline_real").map(read_eval).transpose()?,
                };
                rows.insert(0, base);
            }
            tables.push(Table { title: spec.title.clone(), reference, rows });
        }

        let figures_dir = ctx.output("figures");
        fs_err::create_dir_all(&figures_dir)?;
        let mut figures = Vec::new();
        figures.extend(loss_figure(ctx, &figures_dir, &label)?);
        figures.extend(probe_figure(ctx, &figures_dir)?);
        let projected = if params.projection.is_empty() {
            tables.first().and_then(|t| t.reference.clone()).into_iter().collect()
        } else {
            params.projection.clone()
        };
        for variant in &projected {
            let Some(path) = evals.get(variant.as_str()) else { continue };
            figures.extend(projection_figure(
                path,
                variant,
                &label(variant),
                &figures_dir,
                params,
                ctx.seed,
            )?);
        }

        if tables.iter().all(|t| t.rows.is_empty()) {
            return Err(unknown_variant(&missing.join("`, `"), &variants));
        }
        missing.sort();
        missing.dedup();
        let report = ReportData { title: params.title.clone(), tables, figures, missing };
        fs_err::write(ctx.output("report.md"), markdown(&report))?;
        fs_err::write(ctx.output("report.html"), html(&report))?;
        write_json(&ctx.output("report.json"), &report)
    }
}

/// The instances bound to `slot`: gathered ones by variant, or a plain
/// binding as the `default` variant.
fn gathered<'a>(ctx: &'a StageContext<'_>, slot: &str) -> Vec<(&'a str, &'a Path)> {
    let found = ctx.gathered(slot);
    if !found.is_empty() {
        return found;
    }
    ctx.optional_input(slot).map(|p| (DEFAULT_VARIANT, p)).into_iter().collect()
}

/// `default` first, then the rest in name order.
fn ordered_variants<'a>(evals: &[(&'a str, &Path)]) -> Vec<&'a str> {
    let mut names: Vec<&str> = evals.iter().map(|(v, _)| *v).collect();
    names.sort_by_key(|v| (*v != DEFAULT_VARIANT, *v));
    names.dedup();
    names
}

fn table_specs(params: &ReportParams, variants: &[&str]) -> Vec<TableSpec> {
    if !params.tables.is_empty() {
        return params.tables.clone();
    }
    vec![TableSpec {
        title: "Results".to_string(),
        rows: variants.iter().map(|v| v.to_string()).collect(),
        reference: None,
    }]
}

fn unknown_variant(variant: &str, known: &[&str]) -> StageError {
    StageError::failed(format!(
        "the report names variant `{variant}`, which no gathered `eval` has; variants: {}",
        known.join(", ")
    ))
}

/// The stage name and short key of the artifact holding `path`, from the
/// manifest beside its `out/` folder.
fn artifact_ref(path: &Path) -> ArtifactRef {
    let dir = path.parent();
    let manifest = dir.and_then(|d| std::fs::read(d.join("manifest.json")).ok());
    let value: Option<serde_json::Value> = manifest.and_then(|b| serde_json::from_slice(&b).ok());
    let field = |name: &str| {
        value.as_ref().and_then(|v| v.get(name)).and_then(|v| v.as_str()).map(str::to_string)
    };
    let key = field("key").unwrap_or_default();
    ArtifactRef {
        stage: field("stage").unwrap_or_else(|| path.display().to_string()),
        key: key.chars().take(12).collect(),
    }
}

fn read_eval(path: &Path) -> Result<(ArtifactRef, EvalMetrics), StageError> {
    let file = path.join("metrics.json");
    let text = fs_err::read_to_string(&file)?;
    let metrics: EvalMetrics =
        serde_json::from_str(&text).map_err(|e| StageError::data(&file, None, e.to_string()))?;
    Ok((artifact_ref(path), metrics))
}

fn svg_figure(path: &Path, title: &str, caption: String) -> Result<FigureFile, StageError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(FigureFile {
        title: title.to_string(),
        path: format!("figures/{name}"),
        caption,
        svg: fs_err::read_to_string(path)?,
    })
}

/// One loss curve per trained variant.
fn loss_figure(
    ctx: &StageContext<'_>,
    dir: &Path,
    label: &dyn Fn(&str) -> String,
) -> Result<Option<FigureFile>, StageError> {
    let trains = gathered(ctx, "trains");
    if trains.is_empty() {
        return Ok(None);
    }
    let mut names = Vec::new();
    let mut curves = Vec::new();
    let mut sources = Vec::new();
    for (variant, path) in &trains {
        let rows: Vec<serde_json::Value> = read_jsonl(&path.join("curves.jsonl"))?;
        let points = rows
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("loss")?.as_f64()?)))
            .collect();
        names.push(label(variant));
        curves.push(points);
        sources.push(artifact_ref(path).to_string());
    }
    let series: Vec<Series<'_>> = names
        .iter()
        .zip(curves)
        .map(|(name, points)| Series { name: name.as_str(), points })
        .collect();
    let file = dir.join("loss.svg");
    line_chart(&file, "Training loss", "step", "loss", &series)
        .map_err(|e| StageError::failed(e.to_string()))?;
    let caption = format!("Training objective per step. From: {}.", sources.join("; "));
    svg_figure(&file, "Loss curves", caption).map(Some)
}

fn probe_figure(ctx: &StageContext<'_>, dir: &Path) -> Result<Option<FigureFile>, StageError> {
    let Some(probe) = ctx.optional_input("probe") else { return Ok(None) };
    let file = dir.join("probe-heatmap.svg");
    fs_err::copy(probe.join("heatmap.svg"), &file)?;
    let caption = format!(
        "Gradient magnitude of each attention head during the probe; outlined heads are the \
         selected mask. From: {}.",
        artifact_ref(probe)
    );
    svg_figure(&file, "Head probe", caption).map(Some)
}

fn projection_figure(
    path: &Path,
    variant: &str,
    label: &str,
    dir: &Path,
    params: &ReportParams,
    seed: u64,
) -> Result<Option<FigureFile>, StageError> {
    let points: Vec<SpanEmbedding> = read_jsonl(&path.join("embeddings.jsonl"))?;
    let Ok(map) = tsne(&points, seed, params.tsne_epochs) else { return Ok(None) };
    let (key, peripheral): (Vec<_>, Vec<_>) = points
        .iter()
        .zip(&map)
        .map(|(p, xy)| (p.role, (xy[0], xy[1])))
        .partition(|(role, _)| *role == EntityRole::Key);
    let groups = [
        Series { name: "key", points: key.into_iter().map(|(_, p)| p).collect() },
        Series { name: "peripheral", points: peripheral.into_iter().map(|(_, p)| p).collect() },
    ];
    let file = dir.join(format!("projection-{}.svg", file_safe(variant)));
    scatter(&file, &format!("Span embeddings: {label}"), &groups)
        .map_err(|e| StageError::failed(e.to_string()))?;
    let (_, metrics) = read_eval(path)?;
    let separation = metrics
        .embeddings
        .as_ref()
        .and_then(|e| e.separation)
        .map_or("–".to_string(), |s| format!("{s:.3}"));
    let caption = format!(
        "t-SNE of {} entity-span embeddings (cosine distance) for {label}; separation score \
         (mean silhouette, key vs peripheral, in the embedding space) {separation}. From: {}.",
        points.len(),
        artifact_ref(path)
    );
    svg_figure(&file, &format!("Key vs peripheral spans: {label}"), caption).map(Some)
}

fn file_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}
