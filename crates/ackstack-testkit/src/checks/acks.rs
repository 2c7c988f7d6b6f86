//! Invariants 1 (no loss), 7 (batch ack) and 8 (watermarks): what is acked, when, and in how many
//! broker calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::Message;

use super::{
    CheckResult, LEASE, Seen, Verdict, drain, ensure, publish_all, run, run_until_done, test_config,
};
use crate::Harness;

/// Invariants 1 and 7: every message handled successfully is acked exactly once, and a new
/// consumer finds nothing left.
pub async fn acks_only_after_success<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let n = 30;
    publish_all(
        &h.publisher(&q).await,
        (0..n)
            .map(|i| Message::new(format!("m{i}")).message_id(format!("id-{i}")))
            .collect(),
    )
    .await?;
    let seen = Seen::default();
    let s = seen.clone();
    let s2 = seen.clone();
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            s.record(&d);
            async { Ok(()) }
        },
        move || s2.len() >= n,
    )
    .await?;
    for i in 0..n {
        ensure(seen.count(&format!("m{i}")) == 1, || {
            format!("m{i} handled {} times", seen.count(&format!("m{i}")))
        })?;
    }
    ensure(summary.acked == n as u64, || {
        format!("acked {} of {n}: {summary:?}", summary.acked)
    })?;
    let left = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(left.is_empty(), || {
        format!("acked messages came back: {left:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariants 7 and 8: acks are coalesced into fewer broker calls than deliveries.
pub async fn acks_are_batched<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let n = 60;
    publish_all(
        &h.publisher(&q).await,
        (0..n).map(|i| Message::new(format!("b{i}"))).collect(),
    )
    .await?;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let mut config = test_config();
    config.concurrency = 16;
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            async { Ok(()) }
        },
        move || s2.len() >= n,
    )
    .await?;
    ensure(summary.acked == n as u64, || format!("{summary:?}"))?;
    ensure(summary.ack_calls < n as u64, || {
        format!("{} ack calls for {n} deliveries", summary.ack_calls)
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 8: with out-of-order completion, a delivery still in flight when its successors
/// are acked is not lost when it is abandoned (no cumulative ack passed it).
pub async fn out_of_order_completion_loses_nothing<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(3)).await;
    let n = 12;
    publish_all(
        &h.publisher(&q).await,
        (0..n).map(|i| Message::new(format!("o{i}"))).collect(),
    )
    .await?;
    let seen = Seen::default();
    let s = seen.clone();
    let finished = Arc::new(AtomicUsize::new(0));
    let (f, f2) = (finished.clone(), finished.clone());
    let mut config = test_config();
    config.concurrency = n;
    config.shutdown_deadline = Duration::from_millis(200);
    let summary = run_until_done(
        &*h,
        &q,
        config,
        move |d, cx| {
            s.record(&d);
            let body = String::from_utf8_lossy(&d.payload).into_owned();
            let f = f.clone();
            async move {
                if body == "o2" {
                    cx.cancelled().await;
                    return Ok(());
                }
                // Later messages finish first.
                let i: u64 = body.trim_start_matches('o').parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(20 * (12 - i))).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
        move || f2.load(Ordering::SeqCst) >= n - 1,
    )
    .await?;
    ensure(summary.abandoned == 1, || format!("{summary:?}"))?;
    ensure(summary.acked == n as u64 - 1, || format!("{summary:?}"))?;
    let again = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(again.iter().any(|(p, _)| p == "o2"), || {
        format!("o2 was lost: a cumulative ack passed it ({again:?})")
    })?;
    Ok(Verdict::Passed)
}
