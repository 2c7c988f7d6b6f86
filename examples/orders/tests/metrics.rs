//! `orders --metrics-addr`: `/metrics` in the Prometheus text format with ackstack's labelled
//! metrics, and `/health` as JSON with 200 or 503; scraped over HTTP while the binary runs.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ackstack_testkit::unique_name;

mod common;

/// One sample: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// A running `orders` whose stdout lines arrive on a channel.
struct Orders {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Orders {
    fn spawn(args: &[&str]) -> Orders {
        let mut child = common::orders_command(args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Orders { child, lines }
    }

    /// The first stdout line starting with `prefix` (panics after 60 s).
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line starting with {prefix:?}: {e}"),
            }
        }
    }

    /// The `host:port` of the endpoint, from the `serving` line.
    fn endpoint(&self) -> String {
        let line = self.line("serving ");
        let url = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("metrics=http://"))
            .expect("a metrics URL");
        url.trim_end_matches("/metrics").to_string()
    }

    /// Waits for the exit code (killing it after 60 s).
    fn wait(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("orders did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `GET path` on `endpoint`: the status code and the body.
fn get(endpoint: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(endpoint).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {endpoint}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_string())
}

/// The samples of a Prometheus text exposition, by metric name.
fn parse(text: &str) -> BTreeMap<String, Vec<Sample>> {
    let mut out: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label=value");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.entry(name.to_string())
            .or_default()
            .push((labels, value.parse().expect("a number")));
    }
    out
}

/// The value of `name` whose labels include all of `want` (summed when several match).
fn value(samples: &BTreeMap<String, Vec<Sample>>, name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .get(name)
        .into_iter()
        .flatten()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_and_health_are_served_with_the_consumer_labels() {
    let queue = unique_name("orders-metrics");
    let orders = Orders::spawn(&[
        "--broker",
        "rabbitmq",
        "--queue",
        &queue,
        "--base-delay-ms",
        "20",
        "--exit-when-idle",
        "4",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let endpoint = orders.endpoint();
    let me = [
        ("consumer", "example-orders"),
        ("broker", "rabbitmq"),
        ("queue", queue.as_str()),
    ];
    let with = |k: &'static str, v: &'static str| {
        let mut labels = me.to_vec();
        labels.push((k, v));
        labels
    };
    // Six published: four good (one of them twice, one failing its first two attempts) and
    // one malformed: eight deliveries. Scraped until they are all settled; the run then idles
    // for 4 s before it exits, so the endpoint is still up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, samples) = loop {
        let (code, text) = get(&endpoint, "/metrics");
        assert_eq!(code, 200, "{text}");
        let samples = parse(&text);
        let settled = value(&samples, "ackstack_outcomes_total", &me);
        if settled >= 8.0 && value(&samples, "ackstack_acked_total", &me) >= 6.0 {
            break (text, samples);
        }
        assert!(Instant::now() < deadline, "not settled in time: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (health_code, health) = get(&endpoint, "/health");
    assert_eq!(
        value(&samples, "ackstack_received_total", &me),
        8.0,
        "{text}"
    );
    assert_eq!(
        value(&samples, "ackstack_outcomes_total", &with("outcome", "ack")),
        5.0,
        "{text}"
    );
    assert_eq!(
        value(
            &samples,
            "ackstack_outcomes_total",
            &with("outcome", "dead_letter")
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "ackstack_retried_total",
            &with("error_kind", "transient")
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "ackstack_dead_lettered_total",
            &with("error_kind", "permanent")
        ),
        1.0
    );
    assert_eq!(value(&samples, "ackstack_deduplicated_total", &me), 1.0);
    assert_eq!(value(&samples, "ackstack_in_flight", &me), 0.0);
    assert_eq!(
        value(
            &samples,
            "ackstack_consumer_state",
            &with("state", "running")
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "ackstack_handler_seconds_count",
            &with("outcome", "ack")
        ),
        5.0,
        "one latency sample per acked delivery, the duplicate included"
    );
    assert!(
        samples
            .get("ackstack_handler_seconds_bucket")
            .is_some_and(|b| b
                .iter()
                .any(|(l, _)| l.get("le").map(String::as_str) == Some("0.1"))),
        "the latency histogram has the documented buckets: {text}"
    );
    for (name, series) in &samples {
        if !name.starts_with("ackstack_") {
            continue;
        }
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        assert!(
            ackstack::metrics::ALL.contains(&base)
                || ackstack::metrics::ALL.contains(&name.as_str()),
            "{name} is a documented metric"
        );
        for (labels, _) in series {
            for key in ["consumer", "broker", "queue"] {
                assert!(labels.contains_key(key), "{name} lacks {key}: {labels:?}");
            }
        }
    }
    assert_eq!(health_code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(orders.wait(), Some(0));
}

#[test]
fn health_is_503_while_the_broker_is_waited_for() {
    let orders = Orders::spawn(&[
        "--broker",
        "rabbitmq",
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--connect-timeout",
        "4",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let endpoint = orders.endpoint();
    let (code, body) = get(&endpoint, "/health");
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "starting");
    let (code, _) = get(&endpoint, "/nothing-here");
    assert_eq!(code, 404);
    assert_eq!(orders.wait(), Some(1), "gives up at the connect timeout");
}
