//! Invariant 10 (bad input never panics): panics and malformed payloads do not stop the consumer.

use std::sync::Arc;

use ackstack_core::Message;

use super::{CheckResult, LEASE, Seen, Verdict, ensure, publish_all, run, test_config};
use crate::Harness;

/// Invariant 10: a panicking handler is a transient failure; malformed input is a permanent
/// one; neither stops the consumer.
pub async fn panics_and_bad_input_do_not_stop_the_consumer<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(
        &h.publisher(&q).await,
        vec![
            Message::new("panic-once"),
            Message::new("\u{7f}garbage ]} ☃").header("x-odd-header", "\u{fffd}☃"),
            Message::new(r#"{"ok":true}"#),
        ],
    )
    .await?;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            s.record(&d);
            let body = String::from_utf8_lossy(&d.payload).into_owned();
            let attempt = d.attempt;
            let decoded = ackstack_core::decode::json::<serde_json::Value>(&d).map(|_| ());
            async move {
                if body == "panic-once" && attempt == 1 {
                    panic!("handler bug");
                }
                if body == "panic-once" {
                    return Ok(());
                }
                decoded
            }
        },
        move || s2.count("panic-once") >= 2 && s2.len() >= 4,
    )
    .await?;
    ensure(summary.retried == 1, || {
        format!("the panic was not retried: {summary:?}")
    })?;
    ensure(summary.dead_lettered == 1, || {
        format!("the malformed payload was not dead-lettered: {summary:?}")
    })?;
    ensure(seen.count(r#"{"ok":true}"#) == 1, || {
        format!("{:?}", seen.payloads())
    })?;
    Ok(Verdict::Passed)
}
