//! deploy/: the Grafana dashboard and the Prometheus alert rules name only metrics and labels
//! that the code records, the dashboard shows what an operator needs, and the rules pass
//! `promtool check rules` and their own unit tests (`promtool test rules`).
//!
//! promtool is looked for in `PROMTOOL`, then on `PATH`; `scripts/test.sh` installs it (from
//! Debian's prometheus package, unpacked into its cache) and sets `PROMTOOL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const DASHBOARD: &str = "deploy/grafana/ackstack-dashboard.json";
const RULES: &str = "deploy/prometheus/ackstack-alerts.yml";

/// The labels ackstack's metrics carry (and `le`, which Prometheus adds to histogram buckets).
const LABELS: &[&str] = &[
    "consumer",
    "broker",
    "queue",
    "outcome",
    "error_kind",
    "state",
    "partition",
    "outbox",
    "destination",
    "le",
];

/// Whether ackstack records a metric of this name (the consumer's, or the outbox relay's).
fn recorded(name: &str) -> bool {
    ackstack::metrics::ALL.contains(&name) || ackstack::postgres::OUTBOX_METRICS.contains(&name)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `ackstack_*` metric name in `text`, histogram series suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ackstack_") {
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| recorded(b))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[len..];
    }
    names
}

/// Every label named in a `by (...)` or `on (...)` clause, or as a `{label=...}` matcher.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for keyword in ["by (", "on (", "by(", "on(", "without (", "ignoring ("] {
        for part in expr.split(keyword).skip(1) {
            let list = part.split(')').next().unwrap_or_default();
            labels.extend(list.split(',').map(|l| l.trim().to_string()));
        }
    }
    for part in expr.split('{').skip(1) {
        let matchers = part.split('}').next().unwrap_or_default();
        for m in matchers.split(',') {
            if let Some(name) = m.split(['=', '!']).next() {
                labels.insert(name.trim().to_string());
            }
        }
    }
    labels.retain(|l| !l.is_empty());
    labels
}

/// The `expr:` values of a rules file, each with its continuation lines (`expr: >-` blocks).
fn rule_exprs(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some((at, text)) = &mut current {
            if indent > *at && !line.trim().is_empty() {
                text.push(' ');
                text.push_str(line.trim());
                continue;
            }
            exprs.push(std::mem::take(text));
            current = None;
        }
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim().trim_start_matches(">-").trim().to_string();
            current = Some((indent, rest));
        }
    }
    if let Some((_, text)) = current {
        exprs.push(text);
    }
    exprs
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {title} shows nothing");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            exprs.push((title.clone(), expr.to_string()));
        }
    }
    exprs
}

#[test]
fn the_dashboard_names_only_recorded_metrics_and_labels() {
    let exprs = dashboard_exprs();
    let mut shown = BTreeSet::new();
    for (title, expr) in &exprs {
        for name in metric_names(expr) {
            assert!(
                recorded(&name),
                "panel {title}: {name} is not a metric ackstack records"
            );
            shown.insert(name);
        }
        for label in label_names(expr) {
            assert!(
                LABELS.contains(&label.as_str()),
                "panel {title}: label {label} is not one ackstack sets"
            );
        }
        assert!(
            expr.contains("consumer=~\"$consumer\""),
            "panel {title} follows the consumer selector: {expr}"
        );
    }
    use ackstack::metrics as m;
    for needed in [
        m::RECEIVED,
        m::ACKED,
        m::OUTCOMES,
        m::RETRIED,
        m::DEAD_LETTERED,
        m::IN_FLIGHT,
        m::HANDLER_SECONDS,
        m::CONSUMER_STATE,
        m::LEASES_LOST,
        m::STORE_ERRORS,
        m::BACKLOG,
        m::PARTITION_LAG,
    ] {
        assert!(shown.contains(needed), "the dashboard shows {needed}");
    }
}

#[test]
fn the_alert_rules_name_only_recorded_metrics_and_labels() {
    let rules = read(RULES);
    let names = metric_names(&rules);
    assert!(names.len() >= 6, "{names:?}");
    for name in &names {
        assert!(
            recorded(name),
            "{RULES}: {name} is not a metric ackstack records"
        );
    }
    let exprs = rule_exprs(&rules);
    assert!(exprs.len() >= 7, "{exprs:?}");
    for expr in &exprs {
        for label in label_names(expr) {
            assert!(
                LABELS.contains(&label.as_str()),
                "{RULES}: label {label} in {expr}"
            );
        }
    }
    for alert in [
        "AckstackDeadLettersRising",
        "AckstackCircuitOpen",
        "AckstackLeaseLosses",
        "AckstackStoreUnavailable",
        "AckstackNoProgress",
        "AckstackNoProgressWithBacklog",
        "AckstackOutboxStalled",
        "AckstackOutboxParked",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} is defined"
        );
    }
}

fn promtool() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PROMTOOL").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let Some(promtool) = promtool() else {
        eprintln!("promtool not found (set PROMTOOL or install Debian's prometheus); not checked");
        return;
    };
    let dir = root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "ackstack-alerts.yml"],
        ["test", "rules", "ackstack-alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", promtool.display()));
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
