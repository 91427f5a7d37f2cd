//! The report: what every experiment returns ([`ExperimentReport`]), and writing it out —
//! `results.json` (every figure), `response_times.json` (every request), one CSV per
//! experiment, every chart as `.svg` and `.png`, a self-contained `report.html` (inline
//! SVG, no script, no network) and the summary tables printed on the terminal.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::charts::{self, Chart};
use super::clients::{Outcome, Sample};
use super::summary::RunSummary;

/// A table of figures: printed on the terminal, shown in the HTML, saved as CSV.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Self {
        Table {
            title: title.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as CSV (RFC 4180 quoting).
    pub fn csv(&self) -> String {
        let mut out = String::new();
        for line in std::iter::once(&self.columns).chain(&self.rows) {
            let cells: Vec<String> = line.iter().map(|c| csv_cell(c)).collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }

    /// The table as aligned text for the terminal.
    pub fn text(&self) -> String {
        let ncol = self.columns.len();
        let mut width = vec![0usize; ncol];
        for line in std::iter::once(&self.columns).chain(&self.rows) {
            for (i, c) in line.iter().enumerate().take(ncol) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (k, line) in std::iter::once(&self.columns).chain(&self.rows).enumerate() {
            let cells: Vec<String> = line
                .iter()
                .enumerate()
                .take(ncol)
                .map(|(i, c)| {
                    if i == 0 {
                        format!("{c:<w$}", w = width[i])
                    } else {
                        format!("{c:>w$}", w = width[i])
                    }
                })
                .collect();
            let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
            if k == 0 {
                let total = width.iter().sum::<usize>() + 2 * ncol.saturating_sub(1);
                let _ = writeln!(out, "  {}", "-".repeat(total));
            }
        }
        out
    }
}

fn csv_cell(c: &str) -> String {
    if c.contains([',', '"', '\n']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_string()
    }
}

/// The samples of one run, kept for `response_times.json`.
#[derive(Clone, Debug)]
pub struct SampleSet {
    /// The run's label (as in [`RunSummary::label`]).
    pub run: String,
    /// The plugin (or `none`).
    pub plugin: String,
    pub samples: Vec<Sample>,
}

/// Everything one experiment found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExperimentReport {
    /// `distribution`, `scaling`, ...
    pub name: String,
    pub title: String,
    /// What the experiment does and what to look at.
    pub about: String,
    pub wall_time_s: f64,
    /// One summary per run of traffic.
    pub runs: Vec<RunSummary>,
    /// Experiment-specific figures (loads, shares moved, recovery times, ...).
    pub figures: serde_json::Value,
    /// The first is the experiment's CSV and terminal summary.
    pub tables: Vec<Table>,
    /// Files of the charts (`<name>.svg`, `<name>.png`).
    pub charts: Vec<String>,
    /// Caveats: parts skipped, and why.
    pub notes: Vec<String>,
    #[serde(skip)]
    pub chart_specs: Vec<Chart>,
    #[serde(skip)]
    pub samples: Vec<SampleSet>,
}

impl ExperimentReport {
    pub fn new(name: &str, title: &str, about: &str) -> Self {
        ExperimentReport {
            name: name.to_string(),
            title: title.to_string(),
            about: about.to_string(),
            figures: serde_json::Value::Null,
            ..ExperimentReport::default()
        }
    }

    /// Keeps a run: its summary and its samples.
    pub fn add_run(&mut self, summary: RunSummary, samples: Vec<Sample>) {
        self.samples.push(SampleSet {
            run: summary.label.clone(),
            plugin: summary.plugin.clone(),
            samples,
        });
        self.runs.push(summary);
    }

    pub fn chart(&mut self, chart: Chart) {
        self.charts.push(format!("{}.svg", chart.name));
        self.charts.push(format!("{}.png", chart.name));
        self.chart_specs.push(chart);
    }
}

/// What `simulate` returns and `results.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub seed: u64,
    pub quick: bool,
    pub wall_time_s: f64,
    /// Plugins compared in the per-plugin experiments.
    pub plugins: Vec<String>,
    pub experiments: Vec<ExperimentReport>,
    #[serde(skip)]
    pub out_dir: PathBuf,
}

impl Report {
    pub fn experiment(&self, name: &str) -> Option<&ExperimentReport> {
        self.experiments.iter().find(|e| e.name == name)
    }
}

/// One line of `response_times.json`.
#[derive(Serialize)]
struct ResponseTime<'a> {
    experiment: &'a str,
    run: &'a str,
    plugin: &'a str,
    method: super::clients::Verb,
    start_ms: f64,
    latency_ms: f64,
    backend: Option<&'a str>,
    /// HTTP status; null when the request got no answer (see `error`).
    status: Option<u16>,
    error: Option<&'static str>,
}

/// Writes every file of the report into `dir` (created if needed).
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut svgs = Vec::new();
    for e in &report.experiments {
        std::fs::write(dir.join(format!("{}.csv", e.name)), main_table(e).csv())
            .with_context(|| format!("writing {}.csv", e.name))?;
        let mut inline = Vec::new();
        for c in &e.chart_specs {
            let svg = charts::svg(c)?;
            std::fs::write(dir.join(format!("{}.svg", c.name)), &svg)
                .with_context(|| format!("writing {}.svg", c.name))?;
            charts::png(c, &dir.join(format!("{}.png", c.name)))?;
            inline.push(svg);
        }
        svgs.push(inline);
    }
    let json = serde_json::to_vec_pretty(report)?;
    std::fs::write(dir.join("results.json"), json).context("writing results.json")?;
    write_response_times(report, &dir.join("response_times.json"))?;
    std::fs::write(dir.join("report.html"), html(report, &svgs)).context("writing report.html")?;
    Ok(())
}

fn main_table(e: &ExperimentReport) -> Table {
    e.tables.first().cloned().unwrap_or_default()
}

fn write_response_times(report: &Report, path: &Path) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    w.write_all(b"[")?;
    let mut first = true;
    for e in &report.experiments {
        for set in &e.samples {
            for s in &set.samples {
                let (status, error) = match s.outcome {
                    Outcome::Status(code) => (Some(code), None),
                    Outcome::Failed(kind) => (None, Some(kind.as_str())),
                };
                let line = ResponseTime {
                    experiment: &e.name,
                    run: &set.run,
                    plugin: &set.plugin,
                    method: s.verb,
                    start_ms: round3(s.start.as_secs_f64() * 1000.0),
                    latency_ms: round3(s.latency.as_secs_f64() * 1000.0),
                    backend: s.backend.as_deref(),
                    status,
                    error,
                };
                w.write_all(if first { b"\n" } else { b",\n" })?;
                first = false;
                serde_json::to_writer(&mut w, &line)?;
            }
        }
    }
    w.write_all(b"\n]\n")?;
    w.flush()?;
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG document made embeddable: without its XML declaration.
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

fn html_table(t: &Table) -> String {
    let mut out = String::new();
    if !t.title.is_empty() {
        let _ = write!(out, "<h3>{}</h3>", esc(&t.title));
    }
    out.push_str("<table><thead><tr>");
    for c in &t.columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    out.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>\n");
    out
}

fn html(report: &Report, svgs: &[Vec<String>]) -> String {
    let mut out = String::new();
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>lbwasm simulate report</title><style>\
         body{font-family:sans-serif;max-width:1060px;margin:2em auto;padding:0 1em;color:#222}\
         h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}\
         table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}\
         th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\
         th:first-child,td:first-child{text-align:left} th{background:#f3f3f3}\
         .about{background:#f7f9fc;border-left:4px solid #1f77b4;padding:.5em 1em}\
         .note{color:#a15c00} svg{max-width:100%;height:auto;display:block;margin:1em 0}\
         nav a{margin-right:1em} code{background:#f3f3f3;padding:0 3px}\
         </style></head><body>\n",
    );
    let _ = write!(
        out,
        "<h1>lbwasm simulate</h1><p>Seed <code>{}</code>{}, {:.1} s of wall time. \
         Backends, the proxy (with the real wasm plugins) and the clients ran in one process \
         on 127.0.0.1. Plugins: {}. Rerun with <code>lbwasm simulate --seed {}{}</code>.</p>\n<nav>",
        report.seed,
        if report.quick { " (--quick)" } else { "" },
        report.wall_time_s,
        esc(&report.plugins.join(", ")),
        report.seed,
        if report.quick { " --quick" } else { "" },
    );
    for e in &report.experiments {
        let _ = write!(out, "<a href=\"#{0}\">{0}</a>", esc(&e.name));
    }
    out.push_str("</nav>\n");
    for (e, svg) in report.experiments.iter().zip(svgs) {
        let _ = write!(
            out,
            "<h2 id=\"{}\">{}: {}</h2>\n<div class=\"about\">",
            esc(&e.name),
            esc(&e.name),
            esc(&e.title)
        );
        for para in e.about.split("\n\n") {
            let _ = write!(out, "<p>{}</p>", esc(para));
        }
        out.push_str("</div>\n");
        for n in &e.notes {
            let _ = writeln!(out, "<p class=\"note\">Note: {}</p>", esc(n));
        }
        for s in svg {
            out.push_str(inline_svg(s));
            out.push('\n');
        }
        for t in &e.tables {
            out.push_str(&html_table(t));
        }
        let _ = writeln!(
            out,
            "<p>Files: <code>{0}.csv</code>{1}; {2:.1} s.</p>",
            esc(&e.name),
            e.charts
                .iter()
                .map(|c| format!(", <code>{}</code>", esc(c)))
                .collect::<String>(),
            e.wall_time_s
        );
    }
    out.push_str(
        "<h2>Files</h2><p><code>results.json</code>: every figure above. \
         <code>response_times.json</code>: one entry per request (experiment, run, plugin, \
         method, start_ms, latency_ms, backend, status or error). One CSV per experiment, \
         every chart as SVG and PNG.</p></body></html>\n",
    );
    out
}

/// The terminal summary: the main table of each experiment.
pub fn terminal_summary(report: &Report) -> String {
    let mut out = String::new();
    for e in &report.experiments {
        let _ = writeln!(out, "\n{} — {} ({:.1} s)", e.name, e.title, e.wall_time_s);
        if let Some(t) = e.tables.first() {
            out.push_str(&t.text());
        }
        for n in &e.notes {
            let _ = writeln!(out, "  note: {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_when_needed() {
        let mut t = Table::new("t", &["a", "b"]);
        t.row(vec!["x,y".into(), "say \"hi\"".into()]);
        assert_eq!(t.csv(), "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n");
    }

    #[test]
    fn text_aligns_columns() {
        let mut t = Table::new("t", &["plugin", "p99"]);
        t.row(vec!["round_robin".into(), "12.5".into()]);
        let text = t.text();
        assert!(text.contains("round_robin  12.5"), "{text}");
    }
}
