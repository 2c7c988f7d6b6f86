//! Invariant 4 (dead-lettering): what reaches the dead-letter destination, after how many attempts,
//! with which metadata.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::{DeadLetterReason, HandlerError, Message};

use super::{CheckResult, LEASE, Verdict, drain, ensure, publish_all, run, test_config};
use crate::Harness;

/// Invariant 4: past the attempt limit, the message goes to the dead-letter destination with
/// its payload and headers intact and ackstack's metadata.
pub async fn dead_letters_after_max_attempts<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let payload = r#"{"order_id":"A-7","amount_cents":100}"#;
    publish_all(
        &h.publisher(&q).await,
        vec![
            Message::new(payload)
                .header("x-app", "kept as is")
                .message_id("dl-1"),
        ],
    )
    .await?;
    let mut config = test_config();
    config.retry.max_attempts = 2;
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, c2) = (calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |_d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::transient("downstream unavailable")) }
        },
        move || c2.load(Ordering::SeqCst) >= 2,
    )
    .await?;
    ensure(calls.load(Ordering::SeqCst) == 2, || {
        format!(
            "handler ran {} times for 2 attempts",
            calls.load(Ordering::SeqCst)
        )
    })?;
    ensure(summary.dead_lettered == 1, || format!("{summary:?}"))?;
    let dl = h.wait_dead_letters(&q, 1, Duration::from_secs(10)).await;
    ensure(dl.len() == 1, || {
        format!("expected 1 dead letter, found {}", dl.len())
    })?;
    let copy = &dl[0];
    ensure(copy.payload == payload, || {
        format!("payload changed: {:?}", copy.payload)
    })?;
    ensure(copy.headers.get_str("x-app") == Some("kept as is"), || {
        format!("header lost: {:?}", copy.headers)
    })?;
    let m = &copy.metadata;
    ensure(m.attempts == 2, || {
        format!("metadata attempts {}", m.attempts)
    })?;
    ensure(m.reason == DeadLetterReason::MaxAttempts, || {
        format!("reason {:?}", m.reason)
    })?;
    ensure(m.error_message.contains("downstream unavailable"), || {
        format!("message {:?}", m.error_message)
    })?;
    ensure(m.queue == q.name, || {
        format!("queue {:?} != {:?}", m.queue, q.name)
    })?;
    ensure(m.consumer == "conformance", || {
        format!("consumer {:?}", m.consumer)
    })?;
    ensure(
        m.first_failure_ms.is_none_or(|f| f <= m.last_failure_ms),
        || format!("{m:?}"),
    )?;
    let left = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(left.is_empty(), || {
        format!("the dead-lettered original was not acked: {left:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariants 4 and 10: a payload that does not decode is dead-lettered on its first attempt,
/// byte for byte.
pub async fn permanent_failures_dead_letter_at_once<H: Harness>(h: Arc<H>) -> CheckResult {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Order {
        order_id: String,
    }
    let q = h.create(LEASE).await;
    let body = "{not json at all";
    publish_all(&h.publisher(&q).await, vec![Message::new(body)]).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, c2) = (calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            let decoded = ackstack_core::decode::json::<Order>(&d).map(|_| ());
            async move { decoded }
        },
        move || c2.load(Ordering::SeqCst) >= 1,
    )
    .await?;
    ensure(calls.load(Ordering::SeqCst) == 1, || {
        "a permanent failure was retried".into()
    })?;
    ensure(summary.dead_lettered == 1 && summary.retried == 0, || {
        format!("{summary:?}")
    })?;
    let dl = h.wait_dead_letters(&q, 1, Duration::from_secs(10)).await;
    ensure(dl.len() == 1, || {
        format!("expected 1 dead letter, found {}", dl.len())
    })?;
    ensure(dl[0].payload == body, || "payload changed".into())?;
    ensure(
        dl[0].metadata.reason == DeadLetterReason::Permanent && dl[0].metadata.attempts == 1,
        || format!("{:?}", dl[0].metadata),
    )?;
    Ok(Verdict::Passed)
}
