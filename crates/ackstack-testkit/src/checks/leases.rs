//! Invariant 6 (leases): a long handler keeps its lease; a lost one is never acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::{Message, Source};

use super::{CheckResult, Verdict, drain, ensure, publish_all, run, run_until_done, test_config};
use crate::Harness;

/// Invariant 6: a handler that runs two and a half times its lease keeps it and is acked
/// once.
pub async fn long_handlers_keep_their_lease<H: Harness>(h: Arc<H>) -> CheckResult {
    // A 4 s lease, extended at 70%: 1.2 s of slack for the extension call on a loaded machine
    // (with 2 s, a slow answer from the SQS emulator once let the lease lapse).
    let q = h.create(Duration::from_secs(4)).await;
    if h.source(&q).await.capabilities().lease.is_none() {
        return Ok(Verdict::Skipped("the broker has no leases".into()));
    }
    publish_all(&h.publisher(&q).await, vec![Message::new("slow")]).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, c2) = (calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |_d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                // Over two leases long.
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
        },
        move || c2.load(Ordering::SeqCst) >= 1,
    )
    .await?;
    ensure(calls.load(Ordering::SeqCst) == 1, || {
        "redelivered while its handler still ran".into()
    })?;
    ensure(summary.acked == 1 && summary.leases_lost == 0, || {
        format!("{summary:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 6: when the lease is lost, the handler's token fires and the delivery is never
/// acked; it comes back.
pub async fn lost_lease_is_never_acked<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(2)).await;
    if h.source(&q).await.capabilities().lease.is_none() {
        return Ok(Verdict::Skipped("the broker has no leases".into()));
    }
    publish_all(
        &h.publisher(&q).await,
        vec![Message::new("outlives its lease")],
    )
    .await?;
    let mut config = test_config();
    config.lease.max_total = Duration::from_secs(2);
    config.concurrency = 1;
    let cancelled = Arc::new(AtomicBool::new(false));
    let (c, c2) = (cancelled.clone(), cancelled.clone());
    let summary = run_until_done(
        &*h,
        &q,
        config,
        move |_d, cx| {
            let c = c.clone();
            async move {
                tokio::select! {
                    _ = cx.cancelled() => c.store(true, Ordering::SeqCst),
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                }
                Ok(())
            }
        },
        move || c2.load(Ordering::SeqCst),
    )
    .await?;
    ensure(cancelled.load(Ordering::SeqCst), || {
        "the handler's token never fired".into()
    })?;
    ensure(summary.acked == 0 && summary.leases_lost >= 1, || {
        format!("{summary:?}")
    })?;
    let again = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(again.iter().any(|(p, _)| p == "outlives its lease"), || {
        format!("the message was lost: {again:?}")
    })?;
    Ok(Verdict::Passed)
}
