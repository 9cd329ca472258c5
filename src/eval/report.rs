//! The report's content: tables of evaluated variants, findings that say
//! plainly where the full method wins and where it does not, and figures,
//! rendered as Markdown and as one self-contained HTML page.
//!
//! Every number in a table names the artifact that produced it: each row
//! ends with the `eval` instances it was read from and the first twelve hex
//! digits of their cache keys, which `watchfire show` and `cache ls` print.

use std::fmt::Write as _;

use serde::Serialize;

use super::score::Figure;
use crate::stages::eval::EvalMetrics;

/// An artifact a figure came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArtifactRef {
    /// The stage instance, as `cache ls` names it.
    pub stage: String,
    /// The first twelve hex digits of its cache key.
    pub key: String,
}

impl std::fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.stage, self.key)
    }
}

/// One evaluated variant: its synthetic held-out figures and, when the
/// recipe evaluates real text too, those.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub variant: String,
    pub label: String,
    pub synthetic: (ArtifactRef, EvalMetrics),
    pub real: Option<(ArtifactRef, EvalMetrics)>,
}

/// A titled group of rows.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    /// The row the others are compared with (the full method), if any.
    pub reference: Option<String>,
    pub rows: Vec<Row>,
}

/// A figure file and what it shows.
#[derive(Debug, Clone, Serialize)]
pub struct FigureFile {
    pub title: String,
    /// Path inside the artifact, such as `figures/loss.svg`.
    pub path: String,
    pub caption: String,
    /// The SVG text, inlined into the HTML page.
    #[serde(skip)]
    pub svg: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub tables: Vec<Table>,
    pub figures: Vec<FigureFile>,
    /// Variants the tables name that this run did not evaluate (a run
    /// with `--variant`).
    pub missing: Vec<String>,
}

fn missing_note(report: &Report) -> Option<String> {
    (!report.missing.is_empty()).then(|| {
        format!(
            "Not in this run: {}. Run the recipe without `--variant` to include them.",
            report.missing.join(", ")
        )
    })
}

/// The metrics a table compares, each with how to read it from an eval.
struct Column {
    name: &'static str,
    get: fn(&EvalMetrics) -> Option<Figure>,
    /// Whether larger is better.
    higher: bool,
}

const fn point(value: f64) -> Figure {
    Figure { value, low: f64::NAN, high: f64::NAN }
}

const COLUMNS: &[Column] = &[
    Column { name: "key F1", get: |m| m.scores.key_entities.as_ref().map(|e| e.f1), higher: true },
    Column { name: "CIRS", get: |m| m.scores.cirs, higher: true },
    Column { name: "CCI", get: |m| m.scores.cci, higher: true },
];

const GENERAL_COLUMNS: &[Column] = &[
    Column {
        name: "PPL ratio",
        get: |m| m.general.as_ref().map(|g| point(g.perplexity_ratio)),
        higher: false,
    },
    Column { name: "KL", get: |m| m.general.as_ref().map(|g| point(g.mean_kl)), higher: false },
];

fn fmt_figure(figure: Option<Figure>) -> String {
    match figure {
        None => "–".to_string(),
        Some(f) if f.low.is_nan() => format!("{:.3}", f.value),
        Some(f) => format!("{:.3} [{:.3}, {:.3}]", f.value, f.low, f.high),
    }
}

/// The cells of one row, in header order.
fn cells(row: &Row, has_real: bool) -> Vec<String> {
    let (synthetic_ref, synthetic) = &row.synthetic;
    let mut out = vec![row.label.clone(), format!("{:.2}%", synthetic.subject.trainable_percent)];
    out.extend(COLUMNS.iter().map(|c| fmt_figure((c.get)(synthetic))));
    if has_real {
        let real = row.real.as_ref().map(|(_, m)| m);
        out.extend(COLUMNS.iter().map(|c| fmt_figure(real.and_then(c.get))));
    }
    out.extend(GENERAL_COLUMNS.iter().map(|c| fmt_figure((c.get)(synthetic))));
    let mut from = synthetic_ref.to_string();
    if let Some((real_ref, _)) = &row.real {
        let _ = write!(from, "; {real_ref}");
    }
    out.push(from);
    out
}

fn header(has_real: bool) -> Vec<String> {
    let mut out = vec!["method".to_string(), "trainable".to_string()];
    out.extend(COLUMNS.iter().map(|c| c.name.to_string()));
    if has_real {
        out.extend(COLUMNS.iter().map(|c| format!("real {}", c.name)));
    }
    out.extend(GENERAL_COLUMNS.iter().map(|c| c.name.to_string()));
    out.push("from".to_string());
    out
}

/// Sentences comparing the reference row with every other row, metric by
/// metric: a win, a loss or a tie, and whether the 95% intervals overlap.
pub fn findings(table: &Table) -> Vec<String> {
    let Some(reference) = &table.reference else { return Vec::new() };
    let Some(best) = table.rows.iter().find(|r| &r.variant == reference) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for other in table.rows.iter().filter(|r| &r.variant != reference) {
        let sides = [("", best.synthetic.1.clone(), other.synthetic.1.clone())];
        let real = match (&best.real, &other.real) {
            (Some(a), Some(b)) => Some(("real ", a.1.clone(), b.1.clone())),
            _ => None,
        };
        for (prefix, ours, theirs) in sides.into_iter().chain(real) {
            for column in COLUMNS.iter().chain(GENERAL_COLUMNS) {
                let (Some(a), Some(b)) = ((column.get)(&ours), (column.get)(&theirs)) else {
                    continue;
                };
                out.push(compare_sentence(best, other, prefix, column, a, b));
            }
        }
    }
    out
}

fn compare_sentence(
    best: &Row,
    other: &Row,
    prefix: &str,
    column: &Column,
    a: Figure,
    b: Figure,
) -> String {
    let delta = a.value - b.value;
    let better = if column.higher { delta > 0.0 } else { delta < 0.0 };
    let verdict = if delta == 0.0 {
        "ties with"
    } else if better {
        "beats"
    } else {
        "does not beat"
    };
    let overlap = if a.low.is_nan() || b.low.is_nan() {
        String::new()
    } else if a.low <= b.high && b.low <= a.high {
        "; the 95% intervals overlap".to_string()
    } else {
        "; the 95% intervals do not overlap".to_string()
    };
    format!(
        "{} {verdict} {} on {prefix}{} ({:.3} vs {:.3}, {:+.3}){overlap}.",
        best.label, other.label, column.name, a.value, b.value, delta
    )
}

/// The report as Markdown; figures are linked by their paths.
pub fn markdown(report: &Report) -> String {
    let mut out = format!("# {}\n\n", report.title);
    out.push_str(INTRO);
    out.push('\n');
    if let Some(note) = missing_note(report) {
        let _ = writeln!(out, "{note}\n");
    }
    for table in &report.tables {
        let has_real = table.rows.iter().any(|r| r.real.is_some());
        let _ = writeln!(out, "## {}\n", table.title);
        let head = header(has_real);
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
        for row in &table.rows {
            let _ = writeln!(out, "| {} |", cells(row, has_real).join(" | "));
        }
        out.push('\n');
        let found = findings(table);
        if !found.is_empty() {
            out.push_str("Findings:\n\n");
            for line in found {
                let _ = writeln!(out, "- {line}");
            }
            out.push('\n');
        }
    }
    for figure in &report.figures {
        let _ = writeln!(
            out,
            "## {}\n\n![{}]({})\n\n{}\n",
            figure.title, figure.title, figure.path, figure.caption
        );
    }
    out
}

const INTRO: &str = "Key F1 is entity precision/recall F1 over the schema's key types; CIRS \
    is the share of key facts that summaries and alerts keep; CCI is the share of stated \
    facts that agree with the report. Brackets hold 95% bootstrap intervals over reports. \
    PPL ratio is the adapted model's perplexity on general text over the base model's; KL is \
    the mean per-token KL divergence from the base model on text the base model wrote. \
    `from` names the artifacts each row was read from (stage and cache key).\n";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The report as one HTML page with its figures inlined.
pub fn html(report: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n<p>{}</p>\n",
        escape(&report.title),
        escape(&report.title),
        escape(INTRO.trim())
    );
    if let Some(note) = missing_note(report) {
        let _ = writeln!(out, "<p><strong>{}</strong></p>", escape(&note));
    }
    for table in &report.tables {
        let has_real = table.rows.iter().any(|r| r.real.is_some());
        let _ = writeln!(out, "<h2>{}</h2>\n<table>\n<tr>", escape(&table.title));
        for cell in header(has_real) {
            let _ = write!(out, "<th>{}</th>", escape(&cell));
        }
        out.push_str("</tr>\n");
        for row in &table.rows {
            let class =
                if table.reference.as_ref() == Some(&row.variant) { " class=\"ours\"" } else { "" };
            let _ = write!(out, "<tr{class}>");
            for cell in cells(row, has_real) {
                let _ = write!(out, "<td>{}</td>", escape(&cell));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
        let found = findings(table);
        if !found.is_empty() {
            out.push_str("<ul class=\"findings\">\n");
            for line in found {
                let _ = writeln!(out, "<li>{}</li>", escape(&line));
            }
            out.push_str("</ul>\n");
        }
    }
    for figure in &report.figures {
        let _ = writeln!(
            out,
            "<h2>{}</h2>\n<figure>{}<figcaption>{}</figcaption></figure>",
            escape(&figure.title),
            strip_xml_declaration(&figure.svg),
            escape(&figure.caption)
        );
    }
    out.push_str("</body>\n</html>\n");
    out
}

fn strip_xml_declaration(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(at) => &svg[at..],
        None => svg,
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;\
    padding:0 1rem;color:#222}table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}\
    th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left}th{background:#f3f3f3}\
    tr.ours{background:#fff6e0}figure{margin:1rem 0}figcaption{font-size:.9rem;color:#555}\
    ul.findings{font-size:.9rem}";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::eval::evaluate::SubjectInfo;
    use crate::eval::metrics::Counts;
    use crate::eval::score::{EntityScores, Scores};

    fn metrics(f1: f64, cirs: f64) -> EvalMetrics {
        let fig = |v: f64| Figure { value: v, low: v - 0.05, high: v + 0.05 };
        EvalMetrics {
            subject: SubjectInfo {
                method: "selective".into(),
                trainable_parameters: 8,
                base_parameters: 1000,
                trainable_percent: 0.8,
                prefixes: vec![],
            },
            reports: 10,
            scores: Scores {
                examples: BTreeMap::new(),
                malformed: BTreeMap::new(),
                key_entities: Some(EntityScores {
                    precision: f1,
                    recall: f1,
                    f1: fig(f1),
                    counts: Counts::default(),
                }),
                all_entities: None,
                per_type: BTreeMap::new(),
                cirs: Some(fig(cirs)),
                cci: None,
                per_task: BTreeMap::new(),
            },
            general: None,
            embeddings: None,
        }
    }

    fn row(variant: &str, f1: f64, cirs: f64) -> Row {
        Row {
            variant: variant.into(),
            label: variant.into(),
            synthetic: (
                ArtifactRef { stage: format!("eval@{variant}"), key: "0123456789ab".into() },
                metrics(f1, cirs),
            ),
            real: None,
        }
    }

    #[test]
    fn findings_state_losses_as_plainly_as_wins() {
        let table = Table {
            title: "Table 1".into(),
            reference: Some("ours".into()),
            rows: vec![row("ours", 0.8, 0.5), row("lora", 0.6, 0.7)],
        };
        let found = findings(&table);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("ours beats lora on key F1 (0.800 vs 0.600, +0.200)"));
        assert!(found[0].ends_with("do not overlap."));
        assert!(found[1].starts_with("ours does not beat lora on CIRS"));
    }

    #[test]
    fn every_row_names_its_artifact_in_both_renderings() {
        let table = Table { title: "T".into(), reference: None, rows: vec![row("lora", 0.6, 0.7)] };
        let report =
            Report { title: "R <1>".into(), tables: vec![table], figures: vec![], missing: vec![] };
        let md = markdown(&report);
        assert!(md.contains("| lora | 0.80% | 0.600 [0.550, 0.650] | 0.700 [0.650, 0.750] | – |"));
        assert!(md.contains("eval@lora 0123456789ab"));
        let page = html(&report);
        assert!(page.contains("<title>R &lt;1&gt;</title>"));
        assert!(page.contains("<td>eval@lora 0123456789ab</td>"));
    }
}
