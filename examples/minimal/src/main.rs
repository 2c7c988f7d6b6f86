//! The smallest consumer: the in-memory broker, a handler, retries with backoff, dead letters.
//! Run it with `cargo run -p example-minimal`; it exits once the queue has been idle for 0.5 s.
use std::time::Duration;

use ackstack::{Backoff, Consumer, HandlerError, MemoryBroker, Message, ResultExt, handler_fn};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    for job in ["resize 1.png", "resize 2.png", "explode"] {
        broker.publish("jobs", Message::new(job));
    }

    let consumer = Consumer::new(broker.source("jobs"))
        .backoff(Backoff::exponential(
            Duration::from_millis(20),
            Duration::from_secs(1),
        ))
        .max_attempts(3); // then the message goes to the dead-letter queue
    let status = consumer.status();
    let handler = handler_fn(|delivery, _cx| async move {
        let job = std::str::from_utf8(&delivery.payload).permanent()?; // never retried
        if job == "explode" {
            return Err(HandlerError::transient(format!(
                "attempt {} failed",
                delivery.attempt
            )));
        }
        println!("done: {job}");
        Ok(()) // the message is acked only now
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
    for letter in broker.dead_letters("jobs") {
        println!("dead letter: {}", String::from_utf8_lossy(&letter.payload));
    }
    Ok(())
}
