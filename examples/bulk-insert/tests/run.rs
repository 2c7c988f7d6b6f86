//! Runs the example against PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`) and checks that every reading was stored by a few
//! bulk inserts and that the two payloads that are not readings were dead-lettered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[path = "../../support/run.rs"]
mod support;

#[test]
fn readings_are_inserted_in_batches_and_bad_payloads_dead_lettered() {
    let no_env: &[(&str, &str)] = &[];
    let run = support::run(
        env!("CARGO_BIN_EXE_bulk-insert"),
        no_env,
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.lines_with(&["table rows=250"]), 1, "{run:?}");
    assert_eq!(
        run.lines_with(&["batches=", "rows=250", "dead_lettered=2"]),
        1,
        "{run:?}"
    );
    assert_eq!(run.lines_with(&["dead letter: oops"]), 1, "{run:?}");
    assert_eq!(
        run.lines_with(&["dead letter: sensor-9,not-a-number"]),
        1,
        "{run:?}"
    );
    // 252 deliveries in batches of up to 100: a few calls of the handler, not one a message.
    let batches: usize = run
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("batches="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a `batches=` line");
    assert!((1..=10).contains(&batches), "{batches} batches: {run:?}");
}
