//! The recorder's scrapes, parsed, and the panels' queries over them (rates, quantiles).

use std::collections::BTreeMap;
use std::time::Instant;

/// The window of a rate, in scrapes (one a second): Grafana's `rate(...[5s])`.
pub(crate) const WINDOW: usize = 5;

/// One scrape: when, and what the recorder rendered.
pub(crate) struct Scrape {
    pub(crate) at: Instant,
    pub(crate) samples: Vec<Sample>,
}

/// One sample of a scrape: a metric's name, its labels and its value.
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) value: f64,
}

/// The Prometheus text format, as the recorder renders it (comments skipped).
pub(crate) fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter_map(|pair| pair.split_once("=\""))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
            .collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

pub(crate) fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `sum(name{label="value"})` in one scrape.
pub(crate) fn sum(scrape: &[Sample], name: &str, filter: Option<(&str, &str)>) -> f64 {
    scrape
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| filter.is_none_or(|(k, v)| label(s, k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

/// `rate(...[5s])` at each scrape: the increase over the last five scrapes (fewer at the
/// start) divided by the seconds between them.
pub(crate) fn rate(scrapes: &[Scrape], f: impl Fn(&[Sample]) -> f64) -> Vec<f64> {
    (0..scrapes.len())
        .map(|i| {
            let j = i.saturating_sub(WINDOW);
            let secs = (scrapes[i].at - scrapes[j].at).as_secs_f64();
            if secs <= 0.0 {
                0.0
            } else {
                (f(&scrapes[i].samples) - f(&scrapes[j].samples)).max(0.0) / secs
            }
        })
        .collect()
}

/// `histogram_quantile(q, sum by (le) (rate(name_bucket[5s])))` at each scrape, in ms
/// (zero where nothing finished in the window).
pub(crate) fn quantile(scrapes: &[Scrape], name: &str, q: f64) -> Vec<f64> {
    let buckets = |scrape: &[Sample]| {
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in scrape.iter().filter(|s| s.name == format!("{name}_bucket")) {
            let le = match label(s, "le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse() {
                    Ok(le) => le,
                    Err(_) => continue,
                },
                None => continue,
            };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
        }
        let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    (0..scrapes.len())
        .map(|i| {
            let now = buckets(&scrapes[i].samples);
            let then = buckets(&scrapes[i.saturating_sub(WINDOW)].samples);
            let inc: Vec<(f64, f64)> = now
                .iter()
                .map(|&(le, n)| {
                    let before = then.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
                    (le, n - before)
                })
                .collect();
            let total = inc.last().map_or(0.0, |b| b.1);
            if total <= 0.0 {
                return 0.0;
            }
            let rank = q * total;
            let mut lower = (0.0, 0.0);
            for &(le, n) in &inc {
                if n >= rank {
                    if le.is_infinite() {
                        return lower.0 * 1000.0;
                    }
                    let share = if n > lower.1 {
                        (rank - lower.1) / (n - lower.1)
                    } else {
                        0.0
                    };
                    return (lower.0 + (le - lower.0) * share) * 1000.0;
                }
                lower = (le, n);
            }
            lower.0 * 1000.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn scrape(at: Instant, text: &str) -> Scrape {
        Scrape {
            at,
            samples: parse(text),
        }
    }

    #[test]
    fn rates_and_quantiles_are_prometheus_s() {
        let t0 = Instant::now();
        let scrapes = [
            scrape(
                t0,
                "# TYPE x counter\nx_total{queue=\"q\"} 0\n\
                 h_bucket{le=\"0.01\"} 0\nh_bucket{le=\"0.1\"} 0\nh_bucket{le=\"+Inf\"} 0\n",
            ),
            scrape(
                t0 + Duration::from_secs(2),
                "x_total{queue=\"q\"} 10\nh_bucket{le=\"0.01\"} 50\n\
                 h_bucket{le=\"0.1\"} 90\nh_bucket{le=\"+Inf\"} 100\nh_bucket{le=\"junk\"} 7\n",
            ),
        ];
        let r = rate(&scrapes, |s| sum(s, "x_total", Some(("queue", "q"))));
        assert_eq!(r, vec![0.0, 5.0]);
        let q = |q| quantile(&scrapes, "h", q)[1];
        assert!((q(0.5) - 10.0).abs() < 1e-9, "{}", q(0.5));
        assert!((q(0.9) - 100.0).abs() < 1e-9, "{}", q(0.9));
        assert!(
            (q(0.99) - 100.0).abs() < 1e-9,
            "the +Inf bucket gives its lower bound"
        );
        assert_eq!(quantile(&scrapes, "h", 0.5)[0], 0.0, "nothing finished");
    }
}
