//! Runs the example as a user does and checks what it prints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[path = "../../support/run.rs"]
mod support;

#[test]
fn jobs_are_done_and_the_failing_one_is_dead_lettered_after_three_attempts() {
    let run = support::run(
        env!("CARGO_BIN_EXE_minimal"),
        &[("NO_COLOR", "1")],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.lines_with(&["done: resize 1.png"]), 1, "{run:?}");
    assert_eq!(run.lines_with(&["done: resize 2.png"]), 1, "{run:?}");
    assert_eq!(
        run.lines_with(&["succeeded=2 retried=2 dead_lettered=1"]),
        1,
        "{run:?}"
    );
    assert_eq!(run.lines_with(&["dead letter: explode"]), 1, "{run:?}");
}
