//! Rows, the printed table (Markdown, so that it can be pasted into
//! `BENCHMARKS.md` as is), the goals check and `target/bench/peers.json`.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::util::{Trials, thousands};

/// Which number of a row a ratio compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Throughput,
    P50,
    Bytes,
}

/// One result line. The JSON file gets the first six fields only.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub system: String,
    pub msgs_per_sec: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub bytes_per_msg: Option<f64>,
    /// Lowest and highest of the trials whose median is `msgs_per_sec`.
    #[serde(skip)]
    pub range: Option<(f64, f64)>,
    /// The row this one is compared with: (scenario, system, metric).
    #[serde(skip)]
    pub vs: Option<(String, String, Metric)>,
    #[serde(skip)]
    pub note: String,
}

impl Row {
    pub fn new(scenario: &str, system: impl Into<String>) -> Self {
        Row {
            scenario: scenario.to_string(),
            system: system.into(),
            msgs_per_sec: None,
            p50_us: None,
            p99_us: None,
            bytes_per_msg: None,
            range: None,
            vs: None,
            note: String::new(),
        }
    }

    pub fn rate(mut self, msgs_per_sec: f64) -> Self {
        self.msgs_per_sec = Some(msgs_per_sec);
        self
    }

    /// The median of several trials, and their spread.
    pub fn trials(mut self, t: Trials) -> Self {
        self.msgs_per_sec = Some(t.median);
        if t.max > t.min {
            self.range = Some((t.min, t.max));
        }
        self
    }

    pub fn latency(mut self, p50_us: f64, p99_us: f64) -> Self {
        self.p50_us = Some(p50_us);
        self.p99_us = Some(p99_us);
        self
    }

    pub fn bytes(mut self, bytes_per_msg: f64) -> Self {
        self.bytes_per_msg = Some(bytes_per_msg);
        self
    }

    /// Compare with `system` of the same scenario.
    pub fn vs(self, system: &str, metric: Metric) -> Self {
        let scenario = self.scenario.clone();
        self.vs_in(&scenario, system, metric)
    }

    /// Compare with `system` of another scenario.
    pub fn vs_in(mut self, scenario: &str, system: &str, metric: Metric) -> Self {
        self.vs = Some((scenario.to_string(), system.to_string(), metric));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    fn metric(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Throughput => self.msgs_per_sec,
            Metric::P50 => self.p50_us,
            Metric::Bytes => self.bytes_per_msg,
        }
    }
}

/// Every row of the run, in order.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn push(&mut self, row: Row) {
        println!("  {}", one_line(&row));
        self.rows.push(row);
    }

    pub fn find(&self, scenario: &str, system: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.system == system)
    }

    /// `row`'s metric divided by its reference's, if both exist.
    fn ratio(&self, row: &Row) -> Option<(f64, &str)> {
        let (scenario, system, metric) = row.vs.as_ref()?;
        let reference = self.find(scenario, system)?;
        let ours = row.metric(*metric)?;
        let theirs = reference.metric(*metric)?;
        (theirs > 0.0).then(|| (ours / theirs, reference.system.as_str()))
    }

    /// The results as a Markdown table, one section per scenario, in scenario
    /// order (rows measured later, such as RabbitMQ's, join their scenario).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut scenario = "";
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        // Stable: rows keep their order within a scenario.
        rows.sort_by(|a, b| a.scenario.cmp(&b.scenario));
        for row in rows {
            if row.scenario != scenario {
                scenario = &row.scenario;
                let _ = writeln!(out, "\n### {scenario}\n");
                let _ = writeln!(
                    out,
                    "| system | msgs/s | trials min–max | p50 µs | p99 µs | bytes/msg | ratio | note |"
                );
                let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|---|");
            }
            let ratio = match (self.ratio(row), &row.vs) {
                (Some((r, reference)), Some((s, _, metric))) => {
                    let what = match metric {
                        Metric::Throughput => "",
                        Metric::P50 => " (p50)",
                        Metric::Bytes => " (bytes)",
                    };
                    let place = if *s == row.scenario {
                        String::new()
                    } else {
                        format!(" [{}]", short(s))
                    };
                    format!("{r:.2}× {reference}{place}{what}")
                }
                _ => String::new(),
            };
            let range = row.range.map_or(String::new(), |(lo, hi)| {
                format!("{}–{}", short_rate(lo), short_rate(hi))
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.system,
                fmt_rate(row.msgs_per_sec),
                range,
                fmt_num(row.p50_us),
                fmt_num(row.p99_us),
                fmt_num(row.bytes_per_msg),
                ratio,
                row.note
            );
        }
        out
    }

    /// Writes the rows as a JSON array; returns the path.
    pub fn write_json(&self) -> std::io::Result<PathBuf> {
        let dir = target_dir().join("bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("peers.json");
        let json = serde_json::to_string_pretty(&self.rows).map_err(std::io::Error::other)?;
        std::fs::write(&path, json + "\n")?;
        Ok(path)
    }
}

/// `target/`, or `$CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn short(scenario: &str) -> &str {
    scenario.split_whitespace().next().unwrap_or(scenario)
}

fn one_line(row: &Row) -> String {
    let mut s = format!("{:<62}", row.system);
    if let Some(r) = row.msgs_per_sec {
        let _ = write!(s, " {:>13} msg/s", fmt_rate(Some(r)));
    }
    if let Some((lo, hi)) = row.range {
        let _ = write!(s, " [{}–{}]", short_rate(lo), short_rate(hi));
    }
    if let (Some(p50), Some(p99)) = (row.p50_us, row.p99_us) {
        let _ = write!(s, "  p50 {p50:.1} µs  p99 {p99:.1} µs");
    }
    if let Some(b) = row.bytes_per_msg {
        let _ = write!(s, "  {b:.0} B");
    }
    if !row.note.is_empty() {
        let _ = write!(s, "  ({})", row.note);
    }
    s
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| thousands(v.round() as u64))
}

/// `1234567.0` as `1.23M`, `45678.0` as `45.7k`.
fn short_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "–".to_string(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}
