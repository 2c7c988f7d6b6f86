//! Invariant 9 (graceful shutdown), with 1 and 2: in-flight work drains and is acked; work
//! abandoned at the deadline comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::{Consumer, Message, handler_fn};
use tokio::time::Instant;

use super::{
    CheckResult, LEASE, RUN_LIMIT, Verdict, drain, ensure, publish_all, run_until_done, test_config,
};
use crate::Harness;

/// Invariants 1, 2 and 9: work abandoned at the shutdown deadline is never acked; a new
/// consumer gets it again (with a higher attempt where the broker counts redeliveries).
pub async fn unacked_work_is_redelivered<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(3)).await;
    publish_all(&h.publisher(&q).await, vec![Message::new("stuck")]).await?;
    let started = Arc::new(AtomicBool::new(false));
    let (s, s2) = (started.clone(), started.clone());
    let mut config = test_config();
    config.shutdown_deadline = Duration::from_millis(200);
    let summary = run_until_done(
        &*h,
        &q,
        config,
        move |_d, cx| {
            s.store(true, Ordering::SeqCst);
            async move {
                cx.cancelled().await;
                Ok(())
            }
        },
        move || s2.load(Ordering::SeqCst),
    )
    .await?;
    ensure(summary.acked == 0, || {
        format!("abandoned work was acked: {summary:?}")
    })?;
    ensure(summary.abandoned == 1, || {
        format!("expected 1 abandoned: {summary:?}")
    })?;
    let again = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(again.len() == 1 && again[0].0 == "stuck", || {
        format!("expected the stuck message back once, got {again:?}")
    })?;
    if h.counts_redeliveries() {
        ensure(again[0].1 >= 2, || {
            format!("redelivery kept attempt {}", again[0].1)
        })?;
    }
    Ok(Verdict::Passed)
}

/// Invariant 9: at shutdown, in-flight handlers finish and their deliveries are acked.
pub async fn shutdown_drains_in_flight_work<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(
        &h.publisher(&q).await,
        (0..4).map(|i| Message::new(format!("d{i}"))).collect(),
    )
    .await?;
    let started = Arc::new(AtomicUsize::new(0));
    let (s, s2) = (started.clone(), started.clone());
    let source = h.source(&q).await;
    let summary = Consumer::new(source)
        .config(test_config())
        .run_until(
            handler_fn(move |_d, _cx| {
                s.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(())
                }
            }),
            async move {
                let deadline = Instant::now() + RUN_LIMIT;
                while s2.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    ensure(summary.acked == 4 && summary.abandoned == 0, || {
        format!("in-flight work not drained: {summary:?}")
    })?;
    let left = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(left.is_empty(), || {
        format!("drained work came back: {left:?}")
    })?;
    Ok(Verdict::Passed)
}
