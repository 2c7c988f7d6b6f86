//! tower interoperability: a `tower::Service<Delivery>` with tower middleware as the handler,
//! and ackstack's layers applied through `tower::Layer`.
#![cfg(feature = "tower")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ackstack_core::tower::service_handler;
use ackstack_core::{
    Backoff, Consumer, Context, Delivery, HandlerError, MemoryBroker, Message, Origin, Outcome,
    Process, RetryLayer, Summary, Terminal, handler_fn,
};
use tower::ServiceBuilder;

mod common;
use common::fast_retry;

async fn run<H: ackstack_core::Handler>(broker: &MemoryBroker, handler: H) -> Summary {
    let source = broker.source("q").poll_wait(Duration::from_millis(20));
    let consumer = Consumer::new(source)
        .concurrency(8)
        .backoff(fast_retry())
        .max_attempts(3);
    let idle = consumer.status();
    consumer
        .run_until(handler, async move {
            idle.idle(Duration::from_millis(300)).await
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_tower_timeout_is_a_transient_failure_and_the_retry_succeeds() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("slow once"));
    let service = ServiceBuilder::new()
        .timeout(Duration::from_millis(50))
        .service_fn(|delivery: Delivery| async move {
            if delivery.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<(), HandlerError>(())
        });
    let summary = run(&broker, service_handler(service)).await;
    assert_eq!((summary.retried, summary.acked), (1, 1), "{summary:?}");
    assert_eq!(summary.dead_lettered, 0);
}

#[tokio::test]
async fn a_permanent_error_of_the_service_keeps_its_kind() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("poison"));
    let service = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .service_fn(|_delivery: Delivery| async move {
            Err::<(), HandlerError>(HandlerError::permanent("not an order"))
        });
    let summary = run(&broker, service_handler(service)).await;
    assert_eq!(
        summary.retried, 0,
        "a permanent error is not retried: {summary:?}"
    );
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    let dead = broker.dead_letters("q");
    assert_eq!(dead.len(), 1);
}

/// A service's own delay (a downstream's `Retry-After`) survives tower's boxed errors: the
/// retry is scheduled after it, not after the backoff's.
#[tokio::test]
async fn a_delay_the_service_asks_for_survives_the_tower_stack() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("busy downstream"));
    // Above the backoff's 20 ms for a first retry, within its 100 ms cap.
    let asked = Duration::from_millis(80);
    let service = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .service_fn(move |delivery: Delivery| async move {
            if delivery.attempt == 1 {
                return Err(HandlerError::transient("429").retry_after(asked));
            }
            Ok(())
        });
    let retries = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = retries.clone();
    let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)))
        .backoff(fast_retry())
        .max_attempts(3)
        .inspect(move |_d: &Delivery, outcome: &Outcome| {
            if let Outcome::Retry { after, .. } = outcome {
                seen.lock().unwrap().push(*after);
            }
        });
    let idle = consumer.status();
    let summary = consumer
        .run_until(service_handler(service), async move {
            idle.idle(Duration::from_millis(500)).await
        })
        .await
        .unwrap();
    assert_eq!((summary.retried, summary.succeeded), (1, 1), "{summary:?}");
    assert_eq!(*retries.lock().unwrap(), vec![asked], "the service's delay");
}

#[tokio::test]
async fn a_tower_concurrency_limit_holds_across_concurrent_deliveries() {
    let broker = MemoryBroker::new();
    for i in 0..20 {
        broker.publish("q", Message::new(format!("m-{i}")));
    }
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let (r, m) = (running.clone(), most.clone());
    let service =
        ServiceBuilder::new()
            .concurrency_limit(2)
            .service_fn(move |_delivery: Delivery| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            });
    let summary = run(&broker, service_handler(service)).await;
    assert_eq!(summary.acked, 20, "{summary:?}");
    let most = most.load(Ordering::SeqCst);
    assert_eq!(
        most, 2,
        "the consumer runs 8 at once; the service's limit is 2"
    );
}

#[tokio::test]
async fn ackstack_layers_apply_through_tower_layer() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = handler_fn(move |_d, _cx| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err(HandlerError::transient("down")) }
    });
    let retry = RetryLayer::new(Backoff::exponential(
        Duration::from_millis(10),
        Duration::from_secs(1),
    ))
    .max_attempts(2);
    let stack = tower::Layer::layer(&retry, Terminal::new(handler));
    let mut delivery = Delivery::new("x", Origin::new("memory", "q", "test"));
    delivery.attempt = 1;
    let outcome = stack.process(&delivery, &Context::new()).await;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
    delivery.attempt = 2;
    let outcome = stack.process(&delivery, &Context::new()).await;
    assert!(
        matches!(outcome, Outcome::DeadLetter(_)),
        "the attempt limit applies: {outcome:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
