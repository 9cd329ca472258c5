//! How runs look in a terminal: progress bars, notices, tables.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use watchfire::cache::{CacheKey, KeyFields};
use watchfire::progress::{Progress, ProgressSink, Reporter};
use watchfire::scheduler::{Outcome, RunObserver, Status};

use super::Global;

/// Draws one bar per running stage loop, or nothing.
pub struct CliReporter {
    bars: Option<MultiProgress>,
}

impl CliReporter {
    /// Bars only on a terminal, and not with `--quiet` or `-v`.
    pub fn new(global: &Global) -> Self {
        let show = !global.quiet && global.verbose == 0 && std::io::stderr().is_terminal();
        let bars = show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { bars }
    }

    fn println(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

struct Bar(ProgressBar);

impl ProgressSink for Bar {
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    fn set_message(&self, message: String) {
        self.0.set_message(message);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Reporter for CliReporter {
    fn progress(&self, stage: &str, total: Option<u64>, unit: &'static str) -> Progress {
        let Some(bars) = &self.bars else {
            return Progress::hidden();
        };
        let bar = match total {
            Some(total) => ProgressBar::new(total),
            None => ProgressBar::new_spinner(),
        };
        let template =
            format!("{{prefix:>12.cyan}} {{bar:30}} {{pos}}/{{len}} {unit} ({{per_sec}}) {{msg}}");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = bars.add(bar.with_style(style).with_prefix(stage.to_string()));
        Progress::new(Arc::new(Bar(bar)))
    }

    fn notice(&self, stage: &str, message: &str) {
        self.println(&format!("note: `{stage}`: {message}"));
    }
}

/// Prints notices (always) and keys (at `-vv`).
pub struct CliObserver<'a> {
    pub reporter: &'a CliReporter,
    pub verbose: u8,
}

impl RunObserver for CliObserver<'_> {
    fn key_computed(&self, name: &str, fields: &KeyFields, key: &CacheKey) {
        if self.verbose >= 2 {
            let json = serde_json::to_string_pretty(fields).unwrap_or_default();
            self.reporter.println(&format!("key of `{name}` = {key}\n{json}"));
        }
    }

    fn stage_started(&self, name: &str) {
        tracing::info!("`{name}` started");
    }

    fn stage_finished(&self, outcome: &Outcome) {
        tracing::info!(
            "`{}` {} in {}",
            outcome.name,
            status_word(&outcome.status),
            duration(outcome.duration)
        );
    }

    fn notice(&self, message: &str) {
        self.reporter.println(&format!("warning: {message}"));
    }
}

pub fn status_word(status: &Status) -> &'static str {
    match status {
        Status::Cached => "cached",
        Status::Ran => "ran",
        Status::BuiltElsewhere => "built by another process",
        Status::Failed(_) => "failed",
        Status::Skipped { .. } => "skipped",
        Status::Refused(_) => "refused",
    }
}

pub fn duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1.0 {
        "0 ms".to_string()
    } else if ms < 10_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A plain, left-aligned text table.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|h| h.to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}
