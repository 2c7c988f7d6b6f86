//! Draws the main panels of `deploy/grafana/ackstack-dashboard.json` from a real run, without
//! Grafana: a consumer on RabbitMQ handles a steady stream of orders while its payment
//! provider goes down for a while (the kill switch trips, the backlog grows, then drains);
//! its Prometheus recorder is scraped once a second, the panels' queries are evaluated over
//! the scrapes (rates over 5 s, `histogram_quantile` over the latency buckets) and the
//! picture is written as SVG.
//!
//! ```text
//! cargo run -p ackstack-bench --bin dashboard -- --out docs/dashboard.svg
//! ```
//!
//! Flags: `--out PATH` (default `docs/dashboard.svg`), `--secs N` (length of the run, default
//! 90), `--rate N` (orders per second, default 200). `AMQP_URL` names the broker (default
//! the local RabbitMQ).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, Delivery, HandlerError, KillSwitchConfig, Message, Publish,
    handler_fn,
};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Rates and quantiles are taken over this many seconds of scrapes.
const WINDOW: usize = 5;
/// When the payment provider is down, as fractions of the run.
const OUTAGE: (f64, f64) = (0.33, 0.5);

struct Args {
    out: String,
    secs: u64,
    rate: u64,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        out: "docs/dashboard.svg".into(),
        secs: 90,
        rate: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| format!("{flag}: {value:?} is not a number from 1 to 100000"))
        };
        match flag.as_str() {
            "--out" => args.out = value.clone(),
            "--secs" => args.secs = number()?,
            "--rate" => args.rate = number()?,
            _ => return Err(format!("unknown flag {flag} (--out, --secs, --rate)")),
        }
    }
    Ok(args)
}

/// A reproducible number from a message's sequence number and attempt (splitmix64).
fn mix(seq: u64, attempt: u32) -> u64 {
    let mut z = seq
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(attempt));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payment call: a few milliseconds, now and then a slow one, 3% transient failures, one
/// malformed order in 200, and nothing but failures while the provider is down.
async fn charge(delivery: Delivery, outage: (Instant, Instant)) -> Result<(), HandlerError> {
    let seq: u64 = std::str::from_utf8(&delivery.payload)
        .ok()
        .and_then(|s| s.strip_prefix("order "))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| HandlerError::permanent("malformed order"))?;
    let h = mix(seq, delivery.attempt);
    let millis = if h.is_multiple_of(50) {
        40 + h % 80
    } else {
        2 + h % 8
    };
    tokio::time::sleep(Duration::from_millis(millis)).await;
    let now = Instant::now();
    if now >= outage.0 && now < outage.1 {
        return Err(HandlerError::transient("payment provider unavailable"));
    }
    if seq % 200 == 7 {
        return Err(HandlerError::permanent("card number malformed"));
    }
    if (h >> 8) % 100 < 3 {
        return Err(HandlerError::transient("payment provider timed out"));
    }
    Ok(())
}

/// One scrape: when, and what the recorder rendered.
struct Scrape {
    at: Instant,
    samples: Vec<Sample>,
}

/// One sample of a scrape: a metric's name, its labels and its value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// The Prometheus text format, as the recorder renders it (comments skipped).
fn parse(text: &str) -> Vec<Sample> {
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

fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `sum(name{label="value"})` in one scrape.
fn sum(scrape: &[Sample], name: &str, filter: Option<(&str, &str)>) -> f64 {
    scrape
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| filter.is_none_or(|(k, v)| label(s, k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

/// `rate(...[5s])` at each scrape: the increase over the last five scrapes (fewer at the
/// start) divided by the seconds between them.
fn rate(scrapes: &[Scrape], f: impl Fn(&[Sample]) -> f64) -> Vec<f64> {
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
fn quantile(scrapes: &[Scrape], name: &str, q: f64) -> Vec<f64> {
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

/// One panel: the dashboard's title, the unit of its y axis and its lines.
struct Panel {
    title: &'static str,
    unit: &'static str,
    lines: Vec<(&'static str, Vec<f64>)>,
}

fn panels(scrapes: &[Scrape]) -> Vec<Panel> {
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
fn nice(max: f64) -> f64 {
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

fn svg(panels: &[Panel], secs: usize, outage: (f64, f64), caption: &str) -> String {
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
fn short(v: f64) -> String {
    let (v, suffix) = if v >= 1000.0 {
        (v / 1000.0, "k")
    } else {
        (v, "")
    };
    let text = format!("{v:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(ackstack_core::metrics::HANDLER_SECONDS.to_string()),
            ackstack_core::metrics::HANDLER_SECONDS_BUCKETS,
        )?
        .install_recorder()?;
    let uri = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let queue = format!("dashboard-{}", std::process::id());
    let config = RabbitConfig::new(uri, queue.clone());
    let publisher = RabbitPublisher::connect(config.clone()).await?;
    let source = RabbitSource::connect(config.clone()).await?;

    let mut kill_switch = KillSwitchConfig::default();
    kill_switch.window = Duration::from_secs(10);
    kill_switch.activation = 20;
    kill_switch.trip = 0.5;
    kill_switch.cooldown = Duration::from_secs(5);
    kill_switch.probes = 3;
    kill_switch.count_permanent = false;
    let mut consumer_config = ConsumerConfig::default();
    consumer_config.backlog_interval = Duration::from_secs(1);
    consumer_config.kill_switch = Some(kill_switch);
    let consumer = Consumer::new(source)
        .config(consumer_config)
        .concurrency(16)
        .name("payments")
        .max_attempts(4)
        .backoff(Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_secs(2),
        ));
    let control = consumer.control();

    let start = Instant::now();
    let run = Duration::from_secs(args.secs);
    let outage = (start + run.mul_f64(OUTAGE.0), start + run.mul_f64(OUTAGE.1));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(consumer.run_until(
        handler_fn(move |d, _cx| charge(d, outage)),
        async move {
            let _ = stopped.await;
        },
    ));
    let pace = Duration::from_secs_f64(1.0 / args.rate as f64);
    let publishing = tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for seq in 0u64.. {
            if next.duration_since(start.into()) >= run {
                break;
            }
            tokio::time::sleep_until(next).await;
            next += pace;
            if let Err(e) = publisher
                .publish(Message::new(format!("order {seq}")))
                .await
            {
                eprintln!("publish: {e}");
            }
        }
    });

    let mut scrapes = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..=args.secs {
        tick.tick().await;
        scrapes.push(Scrape {
            at: Instant::now(),
            samples: parse(&handle.render()),
        });
    }
    let _ = publishing.await;
    let _ = stop.send(());
    let summary = consumer.await??;
    let caption = format!(
        "ackstack on RabbitMQ: {} orders/s, payment provider down from {:.0}s to {:.0}s; \
         kill switch opened {} times",
        args.rate,
        OUTAGE.0 * args.secs as f64,
        OUTAGE.1 * args.secs as f64,
        control.trips()
    );
    let picture = svg(&panels(&scrapes), args.secs as usize, OUTAGE, &caption);
    std::fs::write(&args.out, picture).map_err(|e| format!("{}: {e}", args.out))?;
    println!("{caption}\n{summary:?}\nwrote {}", args.out);
    delete_queues(&config).await;
    Ok(())
}

/// Deletes the run's work, dead-letter and delay queues (errors ignored: they are the run's
/// own, uniquely named).
async fn delete_queues(config: &RabbitConfig) {
    use lapin::options::QueueDeleteOptions;
    let Ok(Ok(connection)) = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(&config.uri, lapin::ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for name in config.declared_queues() {
        if let Ok(name) = lapin::types::ShortString::try_new(name) {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                channel.queue_delete(name, QueueDeleteOptions::default()),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
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
