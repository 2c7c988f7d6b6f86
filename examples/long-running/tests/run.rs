//! Runs the example and checks that the long job kept its lease and the too-long one lost it,
//! was cancelled, and finished on its redelivery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[path = "../../support/run.rs"]
mod support;

#[test]
fn leases_are_extended_and_a_lost_lease_cancels_the_handler() {
    let run = support::run(
        env!("CARGO_BIN_EXE_long-running"),
        &[("NO_COLOR", "1")],
        Duration::from_secs(90),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.lines_with(&["succeeded=2 leases_lost=1 dead_lettered=0"]),
        1,
        "{run:?}"
    );
    assert!(run.lines_with(&["lease extended"]) >= 3, "{run:?}");
    assert_eq!(run.lines_with(&["lease lost"]), 1, "{run:?}");
    assert_eq!(
        run.lines_with(&["report-2", "attempt=1", "cancelled"]),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.lines_with(&["report-2", "attempt=2", "done"]),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.lines_with(&["report-1", "attempt=1", "done"]),
        1,
        "{run:?}"
    );
}
