//! Deferrals (`HandlerError::defer`): a message the handler cannot take yet comes back later
//! with the same attempt number, and one deferred for too long ends in the dead-letter
//! destination (invariants 2 and 4).

use std::sync::Arc;
use std::time::Duration;

use ackstack_core::{DeadLetterReason, HandlerError, Message, Source};

use super::{CheckResult, LEASE, Seen, Verdict, ensure, publish_all, run, test_config};
use crate::Harness;

/// Skips an adapter that does not defer (`Capabilities::defers` unset where retries are at
/// the broker): its deferrals are retries, which the retry checks cover.
async fn no_deferrals<H: Harness>(h: &H, q: &crate::TestQueue) -> Option<Verdict> {
    let caps = h.source(q).await.capabilities();
    (caps.broker_delay && !caps.defers)
        .then(|| Verdict::Skipped("the adapter does not defer; a deferral is a retry".into()))
}

/// A deferral uses no attempt: the message comes back no sooner than asked, with the attempt
/// number it had, however often it is deferred.
pub async fn deferrals_use_no_attempt<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    if let Some(skip) = no_deferrals(&*h, &q).await {
        return Ok(skip);
    }
    publish_all(&h.publisher(&q).await, vec![Message::new("not yet")]).await?;
    let asked = Duration::from_secs(1);
    let mut config = test_config();
    config.retry.max_attempts = 2;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            let runs = s.count("not yet");
            async move {
                // Deferred three times (more than max_attempts), then taken.
                if runs <= 3 {
                    Err(HandlerError::defer(asked))
                } else {
                    Ok(())
                }
            }
        },
        move || s2.len() >= 4,
    )
    .await?;
    let runs = seen.of("not yet");
    let attempts: Vec<u32> = runs.iter().map(|r| r.0).collect();
    ensure(attempts == vec![1, 1, 1, 1], || {
        format!("attempt numbers across deferrals: {attempts:?}")
    })?;
    for pair in runs.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        ensure(gap + Duration::from_millis(50) >= asked, || {
            format!("a deferred message came back after {gap:?}; it asked for {asked:?}")
        })?;
    }
    ensure(
        summary.succeeded == 1
            && summary.deferred == 3
            && summary.retried == 0
            && summary.dead_lettered == 0,
        || format!("{summary:?}"),
    )?;
    Ok(Verdict::Passed)
}

/// A message deferred again and again is dead-lettered once `defer_limit` has passed since
/// its first deferral, with reason `deferred` and no attempt used.
pub async fn deferrals_end_at_the_defer_limit<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    if let Some(skip) = no_deferrals(&*h, &q).await {
        return Ok(skip);
    }
    publish_all(
        &h.publisher(&q).await,
        vec![Message::new("never ready").message_id("defer-1")],
    )
    .await?;
    let mut config = test_config();
    config.retry.defer_limit = Duration::from_secs(3);
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            async { Err(HandlerError::defer(Duration::from_secs(1))) }
        },
        // Dead-lettered: no run for longer than a deferral takes to come back.
        move || s2.len() >= 3 && s2.quiet_for() >= Duration::from_secs(3),
    )
    .await?;
    ensure(summary.dead_lettered == 1 && summary.retried == 0, || {
        format!("{summary:?}")
    })?;
    let dl = h.wait_dead_letters(&q, 1, Duration::from_secs(20)).await;
    ensure(dl.len() == 1, || {
        format!(
            "expected 1 dead letter after the defer limit, found {} (runs {:?})",
            dl.len(),
            seen.of("never ready")
        )
    })?;
    let m = &dl[0].metadata;
    ensure(m.reason == DeadLetterReason::Deferred, || {
        format!("reason {:?}", m.reason)
    })?;
    ensure(m.attempts == 1, || {
        format!("a deferred letter reports {} attempts", m.attempts)
    })?;
    let runs = seen.of("never ready");
    ensure(runs.iter().all(|r| r.0 == 1), || {
        format!("attempt numbers across deferrals: {runs:?}")
    })?;
    ensure((3..=6).contains(&runs.len()), || {
        format!("{} runs in a 3 s limit of 1 s deferrals", runs.len())
    })?;
    Ok(Verdict::Passed)
}
