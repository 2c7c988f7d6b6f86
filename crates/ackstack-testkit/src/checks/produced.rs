//! Invariant 12 (observability): each delivery carries when it was produced, which the
//! queue-time histogram is measured from.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ackstack_core::Message;

use super::{CheckResult, LEASE, Verdict, ensure, publish_all, run, test_config};
use crate::Harness;

/// Invariant 12: a delivery's [`produced_at`](ackstack_core::Delivery::produced_at) is the
/// broker's time of the publish (to the second, as AMQP keeps it), not the receive's.
pub async fn deliveries_carry_their_produce_time<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let before = SystemTime::now();
    publish_all(&h.publisher(&q).await, vec![Message::new("stamped")]).await?;
    let after = SystemTime::now();
    // Received a while after the publish: a receive time would be caught.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen: Arc<Mutex<Vec<Option<SystemTime>>>> = Arc::default();
    let (s, s2) = (seen.clone(), seen.clone());
    run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(d.produced_at);
            async { Ok(()) }
        },
        move || !s2.lock().map(|v| v.is_empty()).unwrap_or(true),
    )
    .await?;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(Some(at)) = seen.first().copied() else {
        return Err(format!("the delivery carried no produce time: {seen:?}"));
    };
    // A second of slack below (AMQP's whole seconds) and for clocks read a moment apart.
    let earliest = before - Duration::from_secs(1);
    let latest = after + Duration::from_millis(500);
    ensure(at >= earliest && at <= latest, || {
        format!("produced_at {at:?} is not the publish time (between {before:?} and {after:?})")
    })?;
    Ok(Verdict::Passed)
}
