//! Invariant 11 (ordering when asked) and the runner's concurrency bound: which handlers may run at
//! once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{Backoff, HandlerError, KeyOrdering, Message};

use super::{CheckResult, LEASE, Verdict, ensure, publish_all, run, test_config};
use crate::Harness;

/// Invariant 11: with per-key ordering, a retrying message holds back later messages of its
/// key, and only of its key.
pub async fn per_key_ordering<H: Harness>(h: Arc<H>) -> CheckResult {
    if !h.preserves_key_order() {
        return Ok(Verdict::Skipped(
            "the broker does not keep publish order per key".into(),
        ));
    }
    let q = h.create(LEASE).await;
    let mut messages = Vec::new();
    for i in 0..3 {
        messages.push(Message::new(format!("a{i}")).key("a"));
        messages.push(Message::new(format!("b{i}")).key("b"));
    }
    publish_all(&h.publisher(&q).await, messages).await?;
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let (o, o2) = (order.clone(), order.clone());
    let mut config = test_config();
    config.ordering = KeyOrdering::PerKey;
    config.retry.backoff =
        Backoff::exponential(Duration::from_millis(300), Duration::from_secs(1)).no_jitter();
    run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            let o = o.clone();
            async move {
                let body = String::from_utf8_lossy(&d.payload).into_owned();
                if body == "a0" && d.attempt < 3 {
                    return Err(HandlerError::transient("a0 not yet"));
                }
                o.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                Ok(())
            }
        },
        move || o2.lock().map(|v| v.len() >= 6).unwrap_or(false),
    )
    .await?;
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let of = |k: char| {
        order
            .iter()
            .filter(|s| s.starts_with(k))
            .cloned()
            .collect::<Vec<_>>()
    };
    ensure(of('a') == ["a0", "a1", "a2"], || {
        format!("key a out of order: {order:?}")
    })?;
    ensure(of('b') == ["b0", "b1", "b2"], || {
        format!("key b out of order: {order:?}")
    })?;
    Ok(Verdict::Passed)
}

/// The runner never runs more handlers at once than its concurrency.
pub async fn concurrency_is_bounded<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let n = 24;
    publish_all(
        &h.publisher(&q).await,
        (0..n).map(|i| Message::new(format!("c{i}"))).collect(),
    )
    .await?;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (nw, pk, dn, dn2) = (now.clone(), peak.clone(), done.clone(), done.clone());
    let mut config = test_config();
    config.concurrency = 4;
    run(
        &*h,
        &q,
        config,
        None,
        move |_d, _cx| {
            let (nw, pk, dn) = (nw.clone(), pk.clone(), dn.clone());
            async move {
                let cur = nw.fetch_add(1, Ordering::SeqCst) + 1;
                pk.fetch_max(cur, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                nw.fetch_sub(1, Ordering::SeqCst);
                dn.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
        move || dn2.load(Ordering::SeqCst) >= n,
    )
    .await?;
    let peak = peak.load(Ordering::SeqCst);
    ensure(peak <= 4, || {
        format!("{peak} handlers ran at once with concurrency 4")
    })?;
    ensure(done.load(Ordering::SeqCst) == n, || {
        format!("handled {} of {n}", done.load(Ordering::SeqCst))
    })?;
    Ok(Verdict::Passed)
}
