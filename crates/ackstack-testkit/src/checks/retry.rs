//! Invariants 2 (attempts survive restarts) and 3 (retry with backoff): the attempt number a retry
//! carries, and when it comes back, after the backoff's delay or the one the handler asked for.

use std::sync::Arc;
use std::time::Duration;

use ackstack_core::{Backoff, HandlerError, Message, Source};

use super::{CheckResult, LEASE, Seen, Verdict, drain, ensure, publish_all, run, test_config};
use crate::Harness;

/// Invariant 2: after a retry, a new consumer (a restarted process) sees the next attempt
/// number, because the broker carries it.
pub async fn attempts_survive_restart<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let caps = h.source(&q).await.capabilities();
    if !caps.broker_delay {
        return Ok(Verdict::Skipped(
            "retries happen in place; attempts restart with the process".into(),
        ));
    }
    publish_all(&h.publisher(&q).await, vec![Message::new("flaky")]).await?;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    // A delay long enough that this consumer stops before the retry comes back.
    let mut config = test_config();
    config.retry.backoff =
        Backoff::exponential(Duration::from_secs(2), Duration::from_secs(2)).no_jitter();
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            async { Err(HandlerError::transient("first attempt fails")) }
        },
        move || s2.len() >= 1,
    )
    .await?;
    ensure(summary.retried == 1, || {
        format!("expected one retry: {summary:?}")
    })?;
    let again = drain(&*h, &q, Duration::from_secs(8)).await?;
    ensure(again.len() == 1, || {
        format!("expected the retried message once, got {again:?}")
    })?;
    ensure(again[0].1 == 2, || {
        format!("restarted consumer saw attempt {}, not 2", again[0].1)
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 3: retries come back no sooner than the backoff delay of their attempt.
pub async fn retries_back_off<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(&h.publisher(&q).await, vec![Message::new("twice")]).await?;
    let backoff =
        Backoff::exponential(Duration::from_millis(600), Duration::from_secs(5)).no_jitter();
    let mut config = test_config();
    config.retry.backoff = backoff;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            let attempt = d.attempt;
            async move {
                if attempt <= 2 {
                    Err(HandlerError::transient("not yet"))
                } else {
                    Ok(())
                }
            }
        },
        move || s2.len() >= 3,
    )
    .await?;
    let runs = seen.of("twice");
    ensure(runs.len() == 3, || {
        format!("expected 3 attempts, saw {runs:?}")
    })?;
    let attempts: Vec<u32> = runs.iter().map(|r| r.0).collect();
    ensure(attempts == vec![1, 2, 3], || {
        format!("attempt numbers {attempts:?}")
    })?;
    let tolerance = Duration::from_millis(50);
    for n in 1..=2u32 {
        let gap = runs[n as usize].1 - runs[n as usize - 1].1;
        let min = backoff.delay_with(n, 1.0);
        ensure(gap + tolerance >= min, || {
            format!(
                "attempt {} came {gap:?} after attempt {n}; backoff says at least {min:?}",
                n + 1
            )
        })?;
    }
    ensure(summary.succeeded == 1 && summary.retried == 2, || {
        format!("{summary:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 3: a delay the handler asks for (`HandlerError::retry_after`, a downstream's
/// `Retry-After`) replaces the backoff's, on every broker.
pub async fn handler_chosen_delays_are_honoured<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(&h.publisher(&q).await, vec![Message::new("later")]).await?;
    let asked = Duration::from_millis(1500);
    let mut config = test_config();
    // The backoff alone would retry after 50 ms.
    config.retry.backoff =
        Backoff::exponential(Duration::from_millis(50), Duration::from_secs(5)).no_jitter();
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            let attempt = d.attempt;
            async move {
                if attempt == 1 {
                    Err(HandlerError::transient("429 Too Many Requests").retry_after(asked))
                } else {
                    Ok(())
                }
            }
        },
        move || s2.len() >= 2,
    )
    .await?;
    let runs = seen.of("later");
    let attempts: Vec<u32> = runs.iter().map(|r| r.0).collect();
    ensure(attempts == vec![1, 2], || {
        format!("attempt numbers {attempts:?}")
    })?;
    let gap = runs[1].1 - runs[0].1;
    ensure(gap + Duration::from_millis(50) >= asked, || {
        format!("the retry came {gap:?} after the first attempt; the handler asked for {asked:?}")
    })?;
    ensure(summary.succeeded == 1 && summary.retried == 1, || {
        format!("{summary:?}")
    })?;
    Ok(Verdict::Passed)
}
