//! Invariant 5 (deduplication marks after success).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{DedupKey, HandlerError, Message};

use super::{CheckResult, LEASE, Verdict, drain, ensure, publish_all, run, test_config};
use crate::Harness;

/// Invariant 5: duplicates run the handler once; a message whose first attempt fails is still
/// processed (the key is marked only after success).
pub async fn dedup_marks_after_success<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let prefix = crate::unique_name("key");
    let key = |k: &str| format!("{prefix}-{k}");
    let mut messages: Vec<Message> = (0..3)
        .map(|_| Message::new("dup").header("idempotency-key", key("dup")))
        .collect();
    messages.push(Message::new("flaky").header("idempotency-key", key("flaky")));
    publish_all(&h.publisher(&q).await, messages).await?;
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (e, c, c2) = (effects.clone(), calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        Some(DedupKey::Header("idempotency-key".into())),
        move |d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            let e = e.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let body = String::from_utf8_lossy(&d.payload).into_owned();
                if body == "flaky" && d.attempt == 1 {
                    return Err(HandlerError::transient("first attempt fails"));
                }
                *e.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(body)
                    .or_default() += 1;
                Ok(())
            }
        },
        {
            let e = effects.clone();
            move || {
                e.lock().map(|m| m.len() == 2).unwrap_or(false) && c2.load(Ordering::SeqCst) >= 3
            }
        },
    )
    .await?;
    let effects = effects.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure(effects.get("dup") == Some(&1), || {
        format!("duplicate effects: {effects:?}")
    })?;
    ensure(effects.get("flaky") == Some(&1), || {
        format!("a failed first attempt lost or repeated the message: {effects:?}")
    })?;
    ensure(summary.dead_lettered == 0, || format!("{summary:?}"))?;
    let left = drain(&*h, &q, Duration::from_secs(3)).await?;
    ensure(left.iter().all(|(p, _)| p == "dup"), || {
        format!("unexpected leftovers {left:?}")
    })?;
    ensure(summary.deduplicated + left.len() as u64 >= 2, || {
        format!("duplicates neither deduplicated nor pending: {summary:?}")
    })?;
    Ok(Verdict::Passed)
}
