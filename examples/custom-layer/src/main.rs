//! Layers of your own around the handler: a per-attempt timeout and an audit log.
//!
//! ```text
//! cargo run -p example-custom-layer
//! ```
//!
//! A [`Layer`] wraps a [`Process`] (anything that turns a delivery into an [`Outcome`]) in
//! another, like `tower::Layer`. `Consumer::layer` adds yours inside the fixed part of the
//! stack, so the order is always:
//!
//! ```text
//! receive → retry → dedup → Audit → Timeout → handler
//! ```
//!
//! Retry is outermost: the `Outcome::Retry` that `Timeout` returns is an attempt like any
//! handler failure, delayed by the backoff and dead-lettered after the last attempt, and a
//! panic in a layer of yours is caught and counted the same way. Dedup sits outside your
//! layers, so a duplicate never reaches them. The `.layer(..)` calls read from the outside in,
//! as with `tower::ServiceBuilder`: the first one added runs first.

use std::time::{Duration, Instant};

use ackstack::layer::Process;
use ackstack::{
    Backoff, Consumer, Context, Delivery, ErrorKind, Failure, Layer, MemoryBroker, Message,
    Outcome, handler_fn,
};

/// Gives each attempt at most `limit`; a slower one fails transiently (and is retried).
#[derive(Clone, Copy)]
struct TimeoutLayer {
    limit: Duration,
}

impl<P: Process> Layer<P> for TimeoutLayer {
    type Process = Timeout<P>;
    fn layer(&self, inner: P) -> Timeout<P> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

struct Timeout<P> {
    inner: P,
    limit: Duration,
}

impl<P: Process> Process for Timeout<P> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        match tokio::time::timeout(self.limit, self.inner.process(delivery, cx)).await {
            Ok(outcome) => outcome,
            // The retry layer outside chooses the delay; `after` is not ours to set.
            Err(_) => Outcome::Retry {
                after: Duration::ZERO,
                failure: Failure::new(
                    ErrorKind::Transient,
                    format!("timed out after {:?}", self.limit),
                ),
            },
        }
    }
}

/// Logs each attempt's outcome and how long it took.
#[derive(Clone, Copy)]
struct AuditLayer;

impl<P: Process> Layer<P> for AuditLayer {
    type Process = Audit<P>;
    fn layer(&self, inner: P) -> Audit<P> {
        Audit { inner }
    }
}

struct Audit<P> {
    inner: P,
}

impl<P: Process> Process for Audit<P> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        let started = Instant::now();
        let outcome = self.inner.process(delivery, cx).await;
        // The delivery's span already carries its message id and attempt.
        tracing::info!(
            outcome = outcome.as_str(),
            took_ms = started.elapsed().as_millis() as u64,
            "audit"
        );
        outcome
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let broker = MemoryBroker::new();
    broker.publish("reports", Message::new("quick").message_id("r-1"));
    broker.publish("reports", Message::new("slow once").message_id("r-2"));
    broker.publish("reports", Message::new("always slow").message_id("r-3"));

    let consumer = Consumer::new(broker.source("reports"))
        .backoff(Backoff::exponential(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
        .max_attempts(3)
        .layer(AuditLayer) // added first: outside the timeout, so it sees the timeout's outcome
        .layer(TimeoutLayer {
            limit: Duration::from_millis(100),
        });
    let status = consumer.status();
    let handler = handler_fn(|delivery, _cx| async move {
        let slow = match &delivery.payload[..] {
            b"slow once" => delivery.attempt == 1,
            b"always slow" => true,
            _ => false,
        };
        if slow {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    });
    let summary = consumer
        .run_until(handler, async move {
            status.idle(Duration::from_millis(500)).await
        })
        .await?;
    println!(
        "succeeded={} retried={} dead_lettered={}",
        summary.succeeded, summary.retried, summary.dead_lettered
    );
    Ok(())
}
