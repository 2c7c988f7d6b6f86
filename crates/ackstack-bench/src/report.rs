//! Rows of results: aggregation over rounds, ratios, the Markdown table and the JSON file.

use serde::Serialize;

use crate::common::Sample;

/// What a loop is, relative to the raw baselines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The naive raw loop: the base of the first ratio.
    RawNaive,
    /// The hand-tuned raw loop: the base of the second ratio.
    RawTuned,
    /// An ackstack loop.
    Ackstack,
}

/// Results of one loop of one broker over all rounds.
#[derive(Clone, Debug)]
pub struct Series {
    /// The broker (memory, rabbitmq, sqs, kafka).
    pub broker: &'static str,
    /// Short name of the loop.
    pub mode: &'static str,
    /// What it does, for the notes column.
    pub description: String,
    /// Its role in the ratios.
    pub role: Role,
    /// What "calls" counts for this broker.
    pub calls_what: &'static str,
    /// Messages per round.
    pub messages: u64,
    /// Successful rounds.
    pub samples: Vec<Sample>,
    /// Failed rounds.
    pub errors: Vec<String>,
    /// The mode of another row of the same broker this one is also compared with.
    pub compare_to: Option<&'static str>,
}

impl Series {
    /// An empty series.
    pub fn new(
        broker: &'static str,
        mode: &'static str,
        role: Role,
        calls_what: &'static str,
        messages: u64,
        description: impl Into<String>,
    ) -> Self {
        Series {
            broker,
            mode,
            description: description.into(),
            role,
            calls_what,
            messages,
            samples: Vec::new(),
            errors: Vec::new(),
            compare_to: None,
        }
    }

    /// Also compares this row with the row of mode `mode` (a ratio in the notes).
    pub fn compared_to(mut self, mode: &'static str) -> Self {
        self.compare_to = Some(mode);
        self
    }

    /// Records one round's outcome.
    pub fn record(&mut self, result: Result<Sample, String>) {
        match result {
            Ok(s) => self.samples.push(s),
            Err(e) => {
                eprintln!("  {} {}: round failed: {e}", self.broker, self.mode);
                self.errors.push(e);
            }
        }
    }

    fn rates(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.samples.iter().map(Sample::rate).collect();
        r.sort_by(f64::total_cmp);
        r
    }

    /// (worst, median, best) msg/s.
    pub fn spread(&self) -> Option<(f64, f64, f64)> {
        let r = self.rates();
        let (first, last) = (r.first()?, r.last()?);
        Some((*first, median(&r)?, *last))
    }

    fn per_message(&self, f: impl Fn(&Sample) -> Option<u64>) -> Option<f64> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| f(s).map(|x| x as f64 / s.messages.max(1) as f64))
            .collect();
        v.sort_by(f64::total_cmp);
        median(&v)
    }
}

fn median(sorted: &[f64]) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    Some(if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    })
}

/// A ratio of medians and whether the spreads overlap.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// This row's median over the base's median.
    pub ratio: f64,
    /// True when this row's [worst, best] overlaps the base's: no winner can be named.
    pub indistinguishable: bool,
}

/// One row of the report, as printed and as written to JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The broker.
    pub broker: String,
    /// The loop.
    pub mode: String,
    /// Raw baseline or ackstack.
    pub role: Role,
    /// What the loop does.
    pub description: String,
    /// Messages per round.
    pub messages: u64,
    /// Rounds that completed.
    pub rounds_ok: usize,
    /// Rounds that failed, with their errors.
    pub errors: Vec<String>,
    /// msg/s, best round.
    pub best: Option<f64>,
    /// msg/s, median round.
    pub median: Option<f64>,
    /// msg/s, worst round.
    pub worst: Option<f64>,
    /// Against the naive raw loop of the same broker.
    pub vs_raw_naive: Option<Ratio>,
    /// Against the hand-tuned raw loop of the same broker.
    pub vs_raw_tuned: Option<Ratio>,
    /// Broker calls per message (median over rounds).
    pub calls_per_message: Option<f64>,
    /// What the calls are.
    pub calls_counted: String,
    /// Redis round trips per message (Redis dedup rows).
    pub redis_round_trips_per_message: Option<f64>,
    /// PostgreSQL transactions per message (inbox rows).
    pub pg_transactions_per_message: Option<f64>,
    /// PostgreSQL round trips per message (inbox rows).
    pub pg_round_trips_per_message: Option<f64>,
    /// The row this one is also compared with, and the ratio.
    pub compared: Option<(String, Ratio)>,
    /// Heap allocations per message (median over rounds), whole process during the loop.
    pub allocations_per_message: Option<f64>,
    /// Highest VmHWM over the rounds, KiB.
    pub peak_rss_kib: Option<u64>,
}

fn ratio(row: &Series, base: Option<&Series>) -> Option<Ratio> {
    let base = base?;
    if std::ptr::eq(row, base) {
        return None;
    }
    let (w, m, b) = row.spread()?;
    let (bw, bm, bb) = base.spread()?;
    if bm <= 0.0 {
        return None;
    }
    Some(Ratio {
        ratio: m / bm,
        indistinguishable: w <= bb && bw <= b,
    })
}

/// Turns the series of one broker into rows, with ratios to its raw baselines.
pub fn rows(series: &[Series]) -> Vec<Row> {
    let naive = series.iter().find(|s| s.role == Role::RawNaive);
    let tuned = series.iter().find(|s| s.role == Role::RawTuned);
    series
        .iter()
        .map(|s| {
            let spread = s.spread();
            Row {
                broker: s.broker.to_string(),
                mode: s.mode.to_string(),
                role: s.role,
                description: s.description.clone(),
                messages: s.messages,
                rounds_ok: s.samples.len(),
                errors: s.errors.clone(),
                best: spread.map(|x| x.2),
                median: spread.map(|x| x.1),
                worst: spread.map(|x| x.0),
                vs_raw_naive: ratio(s, naive),
                vs_raw_tuned: ratio(s, tuned),
                calls_per_message: s.per_message(|x| x.counts.calls),
                calls_counted: s.calls_what.to_string(),
                redis_round_trips_per_message: s.per_message(|x| x.counts.redis_round_trips),
                pg_transactions_per_message: s.per_message(|x| x.counts.pg_transactions),
                pg_round_trips_per_message: s.per_message(|x| x.counts.pg_round_trips),
                compared: s.compare_to.and_then(|mode| {
                    let base = series.iter().find(|b| b.mode == mode);
                    Some((mode.to_string(), ratio(s, base)?))
                }),
                allocations_per_message: s.per_message(|x| Some(x.allocations)),
                peak_rss_kib: s.samples.iter().filter_map(|x| x.peak_rss_kib).max(),
            }
        })
        .collect()
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn rate(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) => format!("{:.0}", x),
    }
}

fn ratio_cell(r: &Option<Ratio>) -> String {
    match r {
        None => "–".into(),
        Some(r) if r.indistinguishable => format!("{:.2} (indistinguishable)", r.ratio),
        Some(r) => format!("{:.2}", r.ratio),
    }
}

/// Redis round trips or PostgreSQL transactions per message.
fn store_calls(r: &Row) -> String {
    match (
        r.redis_round_trips_per_message,
        r.pg_transactions_per_message,
    ) {
        (Some(rt), _) => format!("{rt:.3} RT"),
        (None, Some(tx)) => match r.pg_round_trips_per_message {
            Some(rt) => format!("{tx:.3} tx, {rt:.2} RT"),
            None => format!("{tx:.3} tx"),
        },
        (None, None) => "–".to_string(),
    }
}

/// The Markdown table of `rows`.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| broker | mode | msgs × rounds | msg/s best | msg/s median | msg/s worst | vs naive raw | vs tuned raw | calls/msg | store calls/msg | allocs/msg | peak RSS MiB |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let rounds = if r.errors.is_empty() {
            format!("{} × {}", r.messages, r.rounds_ok)
        } else {
            format!(
                "{} × {} ({} failed)",
                r.messages,
                r.rounds_ok,
                r.errors.len()
            )
        };
        let calls = match r.calls_per_message {
            None => "–".to_string(),
            Some(c) => format!("{c:.3}"),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.broker,
            r.mode,
            rounds,
            rate(r.best),
            rate(r.median),
            rate(r.worst),
            ratio_cell(&r.vs_raw_naive),
            ratio_cell(&r.vs_raw_tuned),
            calls,
            store_calls(r),
            num(r.allocations_per_message),
            r.peak_rss_kib
                .map_or("–".to_string(), |k| format!("{:.1}", k as f64 / 1024.0)),
        ));
    }
    out
}

/// The notes under the table: what each row ran and what its calls count, and failures.
pub fn notes(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut seen_calls: Vec<(String, String)> = Vec::new();
    for r in rows {
        out.push_str(&format!("- {} {}: {}\n", r.broker, r.mode, r.description));
        if let Some((base, ratio)) = &r.compared {
            out.push_str(&format!(
                "  - {} of {base}\n",
                ratio_cell(&Some(ratio.clone()))
            ));
        }
        for e in &r.errors {
            out.push_str(&format!("  - failed round: {e}\n"));
        }
        let key = (r.broker.clone(), r.calls_counted.clone());
        if !seen_calls.contains(&key) {
            seen_calls.push(key);
        }
    }
    for (broker, what) in seen_calls {
        out.push_str(&format!("- {broker} calls/msg counts: {what}\n"));
    }
    out
}
