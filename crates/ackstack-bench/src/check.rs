//! `--check`: the speed targets, checked against the rows of one run.
//!
//! Each target names a row (broker and mode), a figure of it and a bound. A target of a broker
//! that was not run is left out; a target whose row or figure is missing (the row failed, its
//! store was down) is a miss, as is a figure on the wrong side of its bound. Instruction counts
//! are checked by `callgrind.sh --check`, which runs under valgrind.

use serde::Serialize;

use crate::report::Row;

/// Which figure of a row a target bounds.
#[derive(Clone, Copy, Debug)]
enum Figure {
    /// Median msg/s over the naive raw loop's.
    VsNaive,
    /// Median msg/s over the tuned raw loop's.
    VsTuned,
    /// Median msg/s over the tuned raw loop's, or 1.0 when the spreads overlap (as fast as
    /// the tuned loop within its spread).
    VsTunedOrSpread,
    /// Median msg/s over the row it is compared with.
    Compared,
    /// Broker calls per message.
    Calls,
    /// Redis round trips per message.
    RedisRoundTrips,
    /// Heap allocations per message.
    Allocations,
    /// Heap allocations per message over those of the row it is compared with.
    AllocationsCompared,
}

/// At least or at most.
#[derive(Clone, Copy, Debug)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

struct Target {
    broker: &'static str,
    mode: &'static str,
    figure: Figure,
    bound: Bound,
}

const fn t(broker: &'static str, mode: &'static str, figure: Figure, bound: Bound) -> Target {
    Target {
        broker,
        mode,
        figure,
        bound,
    }
}

/// The targets of the speed work (docs/PERFORMANCE.md).
const TARGETS: &[Target] = &[
    t(
        "memory",
        "ackstack bare, concurrency 1",
        Figure::VsNaive,
        Bound::AtLeast(0.10),
    ),
    t(
        "memory",
        "ackstack bare",
        Figure::Allocations,
        Bound::AtMost(3.0),
    ),
    t(
        "memory",
        "ackstack full",
        Figure::Allocations,
        Bound::AtMost(8.0),
    ),
    t(
        "memory",
        "ackstack full + Redis dedup, concurrency 1",
        Figure::RedisRoundTrips,
        Bound::AtMost(1.1),
    ),
    t(
        "memory",
        "ackstack full + Redis dedup",
        Figure::RedisRoundTrips,
        Bound::AtMost(0.05),
    ),
    t(
        "memory",
        "ackstack full + Redis dedup",
        Figure::Compared,
        Bound::AtLeast(0.5),
    ),
    t(
        "memory",
        "ackstack full + Redis dedup",
        Figure::AllocationsCompared,
        Bound::AtMost(2.0),
    ),
    t(
        "memory",
        "ackstack full + PostgreSQL inbox, commit groups",
        Figure::Compared,
        Bound::AtLeast(0.5),
    ),
    t(
        "rabbitmq",
        "ackstack adapter",
        Figure::VsTuned,
        Bound::AtLeast(0.9),
    ),
    t(
        "rabbitmq",
        "ackstack full",
        Figure::VsTuned,
        Bound::AtLeast(0.9),
    ),
    t(
        "sqs",
        "ackstack adapter",
        Figure::Calls,
        Bound::AtMost(0.21),
    ),
    t(
        "sqs",
        "ackstack adapter",
        Figure::VsTunedOrSpread,
        Bound::AtLeast(1.0),
    ),
    t("sqs", "ackstack full", Figure::Calls, Bound::AtMost(0.21)),
    t(
        "kafka",
        "ackstack full",
        Figure::VsTuned,
        Bound::AtLeast(0.9),
    ),
    t("kafka", "ackstack full", Figure::Calls, Bound::AtMost(0.01)),
    t(
        "kafka",
        "ackstack full + Redis dedup",
        Figure::Compared,
        Bound::AtLeast(0.5),
    ),
    t(
        "kafka",
        "ackstack full + Redis dedup",
        Figure::AllocationsCompared,
        Bound::AtMost(2.0),
    ),
];

/// One target's result.
#[derive(Clone, Debug, Serialize)]
pub struct Checked {
    /// The target, as text.
    pub target: String,
    /// The measured figure, if the row had it.
    pub measured: Option<f64>,
    /// Whether the target is met.
    pub met: bool,
}

fn figure(row: &Row, rows: &[Row], figure: Figure) -> Option<f64> {
    match figure {
        Figure::VsNaive => row.vs_raw_naive.as_ref().map(|r| r.ratio),
        Figure::VsTuned => row.vs_raw_tuned.as_ref().map(|r| r.ratio),
        Figure::VsTunedOrSpread => row.vs_raw_tuned.as_ref().map(|r| {
            if r.indistinguishable {
                r.ratio.max(1.0)
            } else {
                r.ratio
            }
        }),
        Figure::Compared => row.compared.as_ref().map(|(_, r)| r.ratio),
        Figure::Calls => row.calls_per_message,
        Figure::RedisRoundTrips => row.redis_round_trips_per_message,
        Figure::Allocations => row.allocations_per_message,
        Figure::AllocationsCompared => {
            let (base, _) = row.compared.as_ref()?;
            let base = rows
                .iter()
                .find(|r| r.broker == row.broker && &r.mode == base)?;
            Some(row.allocations_per_message? / base.allocations_per_message?)
        }
    }
}

/// Checks every target of the brokers in `brokers` against `rows`.
pub fn check(rows: &[Row], brokers: &[String]) -> Vec<Checked> {
    TARGETS
        .iter()
        .filter(|t| brokers.iter().any(|b| b == t.broker))
        .map(|t| {
            let measured = rows
                .iter()
                .find(|r| r.broker == t.broker && r.mode == t.mode)
                .and_then(|r| figure(r, rows, t.figure));
            let (op, bound, met) = match (t.bound, measured) {
                (Bound::AtLeast(b), m) => (">=", b, m.is_some_and(|m| m >= b)),
                (Bound::AtMost(b), m) => ("<=", b, m.is_some_and(|m| m <= b)),
            };
            Checked {
                target: format!("{} {}: {:?} {op} {bound}", t.broker, t.mode, t.figure),
                measured,
                met,
            }
        })
        .collect()
}

/// The results as lines, misses marked.
pub fn report(checked: &[Checked]) -> String {
    let mut out = String::from("targets:\n");
    for c in checked {
        let measured = c
            .measured
            .map_or("not measured".to_string(), |m| format!("{m:.3}"));
        let mark = if c.met { "met   " } else { "MISSED" };
        out.push_str(&format!("  {mark} {} (measured {measured})\n", c.target));
    }
    out
}
