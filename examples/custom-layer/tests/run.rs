//! Runs the example and checks that both layers did their part.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[path = "../../support/run.rs"]
mod support;

#[test]
fn the_timeout_retries_slow_attempts_and_the_audit_log_sees_every_outcome() {
    let run = support::run(
        env!("CARGO_BIN_EXE_custom-layer"),
        &[("NO_COLOR", "1")],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    // r-1: acked at once; r-2: timed out once, then acked; r-3: timed out three times.
    assert_eq!(
        run.lines_with(&["succeeded=2 retried=3 dead_lettered=1"]),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.lines_with(&["audit", "message_id=\"r-1\"", "outcome=\"ack\""]),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.lines_with(&["audit", "message_id=\"r-2\"", "outcome=\"retry\""]),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.lines_with(&["audit", "message_id=\"r-2\"", "outcome=\"ack\""]),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.lines_with(&["audit", "message_id=\"r-3\"", "outcome=\"retry\""]),
        3,
        "{run:?}"
    );
}
