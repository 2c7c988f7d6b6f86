//! A handler that runs longer than its lease: the lease is extended while it works, and when
//! the lease is lost the handler is cancelled and the message is not acked.
//!
//! ```text
//! cargo run -p example-long-running
//! ```
//!
//! The queue's lease (visibility timeout) is 1 s. ackstack extends it at 70% of its length for
//! as long as the handler runs, up to `lease.max_total` (here 4 s; in production, the longest
//! a job may take). The job `report-1` takes 2.5 s: its lease is extended a few times and it is
//! acked. The job `report-2` takes 6 s on its first run: after 4 s the lease is no longer
//! extended and lapses, the handler's `cx.cancelled()` fires, and the delivery is not acked,
//! because another worker may already have received it. Redelivered, it picks up from its
//! checkpoint and finishes.
//!
//! What the logs say (`RUST_LOG=info,ackstack=debug` shows each extension):
//!
//! ```text
//! INFO delivery{.. message_id="report-2" attempt=1 ..}: working on it need_ms=6000
//! DEBUG lease extended by=1s
//! INFO lease held for its longest allowed time; it will not be extended again max_total=4s
//! WARN lease lost; the delivery's work is cancelled and it will not be acked
//! WARN delivery{.. message_id="report-2" attempt=1 ..}: cancelled: stopping at the checkpoint
//! INFO delivery{.. message_id="report-2" attempt=2 ..}: working on it need_ms=1500
//! ```

use std::time::Duration;

use ackstack::{
    Consumer, ConsumerConfig, Context, Delivery, HandlerError, MemoryBroker, Message, handler_fn,
};

/// How long a job takes: `report-2` is slow the first time, and resumes from a checkpoint.
fn work_needed(delivery: &Delivery) -> Duration {
    match (&delivery.payload[..], delivery.attempt) {
        (b"report-2", 1) => Duration::from_secs(6),
        (b"report-2", _) => Duration::from_millis(1500),
        _ => Duration::from_millis(2500),
    }
}

async fn handle(delivery: Delivery, cx: Context) -> Result<(), HandlerError> {
    let need = work_needed(&delivery);
    tracing::info!(need_ms = need.as_millis() as u64, "working on it");
    tokio::select! {
        () = tokio::time::sleep(need) => {
            tracing::info!("done");
            Ok(())
        }
        // The lease was lost (or shutdown passed its deadline): whatever we return now, the
        // delivery is not acked. Stop cleanly instead of finishing work someone else may redo.
        () = cx.cancelled() => {
            tracing::warn!("cancelled: stopping at the checkpoint");
            Err(HandlerError::transient("cancelled"))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,ackstack=debug".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let broker = MemoryBroker::new();
    broker.publish("reports", Message::new("report-1").message_id("report-1"));
    broker.publish("reports", Message::new("report-2").message_id("report-2"));

    let mut config = ConsumerConfig::default();
    config.lease.extend_at = 0.7;
    config.lease.max_total = Duration::from_secs(4);
    let source = broker
        .source("reports")
        .visibility_timeout(Duration::from_secs(1));
    let consumer = Consumer::new(source).config(config);
    let status = consumer.status();
    let summary = consumer
        .run_until(handler_fn(handle), async move {
            status.idle(Duration::from_secs(2)).await
        })
        .await?;
    println!(
        "succeeded={} leases_lost={} dead_lettered={}",
        summary.succeeded, summary.leases_lost, summary.dead_lettered
    );
    Ok(())
}
