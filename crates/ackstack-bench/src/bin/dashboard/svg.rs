//! The panels, computed from the scrapes, drawn as SVG.

use std::fmt::Write as _;

use crate::scrape::{Scrape, quantile, rate, sum};

/// One panel: the dashboard's title, the unit of its y axis and its lines.
pub(crate) struct Panel {
    title: &'static str,
    unit: &'static str,
    lines: Vec<(&'static str, Vec<f64>)>,
}

pub(crate) fn panels(scrapes: &[Scrape]) -> Vec<Panel> {
    let series = |name: &'static str, filter: Option<(&'static str, &'static str)>| {
        scrapes
            .iter()
            .map(|s| sum(&s.samples, name, filter))
            .collect::<Vec<_>>()
    };
    let per_sec = |name: &'static str, filter: Option<(&'static str, &'static str)>| {
        rate(scrapes, |s| sum(s, name, filter))
    };
    let increase = |name: &'static str, kind: &'static str| {
        let first = scrapes
            .first()
            .map_or(0.0, |s| sum(&s.samples, name, Some(("error_kind", kind))));
        series(name, Some(("error_kind", kind)))
            .into_iter()
            .map(|v| v - first)
            .collect::<Vec<_>>()
    };
    let state = |s: &'static str| series("ackstack_consumer_state", Some(("state", s)));
    vec![
        Panel {
            title: "Throughput",
            unit: "msg/s",
            lines: vec![
                ("received", per_sec("ackstack_received_total", None)),
                ("acked", per_sec("ackstack_acked_total", None)),
            ],
        },
        Panel {
            title: "Outcomes",
            unit: "/s",
            lines: ["ack", "retry", "dead_letter", "release"]
                .into_iter()
                .map(|o| (o, per_sec("ackstack_outcomes_total", Some(("outcome", o)))))
                .collect(),
        },
        Panel {
            title: "Retries",
            unit: "/s",
            lines: vec![(
                "transient",
                per_sec("ackstack_retried_total", Some(("error_kind", "transient"))),
            )],
        },
        Panel {
            title: "Dead letters",
            unit: "since start",
            lines: vec![
                (
                    "permanent",
                    increase("ackstack_dead_lettered_total", "permanent"),
                ),
                (
                    "transient",
                    increase("ackstack_dead_lettered_total", "transient"),
                ),
            ],
        },
        Panel {
            title: "In flight",
            unit: "deliveries",
            lines: vec![("in flight", series("ackstack_in_flight", None))],
        },
        Panel {
            title: "Handler latency",
            unit: "ms",
            lines: [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]
                .into_iter()
                .map(|(n, q)| (n, quantile(scrapes, "ackstack_handler_seconds", q)))
                .collect(),
        },
        Panel {
            title: "Backlog and lag",
            unit: "messages",
            lines: vec![("backlog", series("ackstack_backlog", None))],
        },
        Panel {
            title: "Consumer state",
            unit: "1 = in state",
            lines: vec![
                ("running", state("running")),
                ("circuit_open", state("circuit_open")),
                ("half_open", state("half_open")),
            ],
        },
    ]
}

/// A round axis maximum at or above `max`.
pub(crate) fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let step = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * step)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * step)
}

const COLORS: [&str; 4] = ["#56a64b", "#e0b400", "#3274d9", "#e02f44"];

pub(crate) fn svg(panels: &[Panel], secs: usize, outage: (f64, f64), caption: &str) -> String {
    let (pw, ph, gap, top) = (470.0, 200.0, 20.0, 50.0);
    let width = 2.0 * pw + 3.0 * gap;
    let rows = panels.len().div_ceil(2);
    let height = top + rows as f64 * (ph + gap) + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">"##
    );
    let _ = writeln!(
        s,
        r##"<rect width="{width}" height="{height}" fill="#111217"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{gap}" y="30" fill="#d8d9da" font-size="15">{caption}</text>"##
    );
    for (n, panel) in panels.iter().enumerate() {
        let x0 = gap + (n % 2) as f64 * (pw + gap);
        let y0 = top + (n / 2) as f64 * (ph + gap);
        let (l, r, t, b) = (x0 + 45.0, x0 + pw - 10.0, y0 + 40.0, y0 + ph - 25.0);
        let max = nice(
            panel
                .lines
                .iter()
                .flat_map(|(_, v)| v.iter().copied())
                .fold(0.0, f64::max),
        );
        let xs = |i: f64| l + (r - l) * i / secs.max(1) as f64;
        let ys = |v: f64| b - (b - t) * (v / max).clamp(0.0, 1.0);
        let _ = writeln!(
            s,
            r##"<g><rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" rx="3" fill="#181b1f" stroke="#2c3235"/>"##
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#d8d9da" font-size="13">{}</text>"##,
            x0 + 10.0,
            y0 + 18.0,
            panel.title
        );
        let (o0, o1) = (xs(outage.0 * secs as f64), xs(outage.1 * secs as f64));
        let _ = writeln!(
            s,
            r##"<rect x="{o0:.1}" y="{t}" width="{:.1}" height="{:.1}" fill="#e02f44" fill-opacity="0.12"/>"##,
            o1 - o0,
            b - t
        );
        for k in 0..=4 {
            let v = max * f64::from(k) / 4.0;
            let y = ys(v);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#2c3235"/><text x="{}" y="{:.1}" fill="#8e8e8e" text-anchor="end">{}</text>"##,
                l - 5.0,
                y + 4.0,
                short(v)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#8e8e8e">{}</text>"##,
            x0 + 10.0,
            y0 + 32.0,
            panel.unit
        );
        for tick in (0..=secs).step_by(15) {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" fill="#8e8e8e" text-anchor="middle">{tick}s</text>"##,
                xs(tick as f64),
                b + 15.0
            );
        }
        let mut legend = r - 5.0;
        for (i, (name, values)) in panel.lines.iter().enumerate().rev() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", xs(i as f64), ys(*v)))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"##,
                points.join(" ")
            );
            let _ = writeln!(
                s,
                r##"<text x="{legend:.1}" y="{}" fill="{color}" text-anchor="end">{name}</text>"##,
                y0 + 18.0
            );
            legend -= 8.0 + 6.5 * name.len() as f64;
        }
        let _ = writeln!(s, "</g>");
    }
    s.push_str("</svg>\n");
    s
}

/// An axis label: at most two decimals, none that are zero; thousands as `k`.
pub(crate) fn short(v: f64) -> String {
    let (v, suffix) = if v >= 1000.0 {
        (v / 1000.0, "k")
    } else {
        (v, "")
    };
    let text = format!("{v:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(short(3750.0), "3.75k");
        assert_eq!(short(1000.0), "1k");
        assert_eq!(short(62.5), "62.5");
        assert_eq!(short(0.0), "0");
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(880.0), 1000.0);
        assert_eq!(nice(3300.0), 5000.0);
    }
}
