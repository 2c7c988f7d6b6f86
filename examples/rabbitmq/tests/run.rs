//! Runs the example against the local RabbitMQ (`AMQP_URL`, default 127.0.0.1:5672) and Redis
//! (`REDIS_URL`, default 127.0.0.1:6379), on a queue of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ackstack::Publish;
use ackstack::rabbitmq::{RabbitConfig, RabbitPublisher};
use ackstack_testkit::unique_name;

#[path = "../../support/run.rs"]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_rabbitmq");

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// A publisher on a fresh queue that the broker deletes a while after the test.
async fn publisher() -> RabbitPublisher {
    let mut config = RabbitConfig::new(
        env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        unique_name("example-rabbitmq"),
    );
    config.queue_expires = Some(Duration::from_secs(120));
    RabbitPublisher::connect(config)
        .await
        .expect("RabbitMQ is up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_processed_deduplicated_and_dead_lettered_then_it_exits_when_idle() {
    let publisher = publisher().await;
    let queue = publisher.config().queue.clone();
    for message in support::sample_orders() {
        publisher.publish(message).await.unwrap();
    }

    let redis = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let prefix = format!("{queue}:");
    let env = [
        (
            "AMQP_URL",
            env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ),
        ("REDIS_URL", redis),
        ("APP_RABBITMQ__QUEUE", queue.clone()),
        ("APP_RABBITMQ__QUEUE_EXPIRES", "120s".to_string()),
        ("APP_REDIS__KEY_PREFIX", prefix),
        ("APP_EXIT_WHEN_IDLE", "2s".to_string()),
    ];
    let run =
        tokio::task::spawn_blocking(move || support::run(BIN, &env, Duration::from_secs(120)))
            .await
            .unwrap();

    support::assert_sample_orders_handled(&run);
    let letter = publisher
        .get_dead_letter()
        .await
        .unwrap()
        .expect("one dead letter");
    assert_eq!(&letter.payload[..], b"not an order");
    assert_eq!(publisher.queue_len(&queue).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0() {
    let publisher = publisher().await;
    let queue = publisher.config().queue.clone();
    publisher.publish(support::order("B-1")).await.unwrap();
    publisher.publish(support::order("B-2")).await.unwrap();

    let env = [
        (
            "AMQP_URL",
            env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ),
        ("APP_RABBITMQ__QUEUE", queue.clone()),
        ("APP_RABBITMQ__QUEUE_EXPIRES", "120s".to_string()),
        // Dedup keys of this run only: B-1 and B-2 of an earlier run are done in Redis.
        ("REDIS_URL", env_or("REDIS_URL", "redis://127.0.0.1:6379")),
        ("APP_REDIS__KEY_PREFIX", format!("{queue}:")),
    ];
    let running = support::start(BIN, &env);
    // Wait until both orders were taken off the queue, then stop it as an orchestrator would.
    let started = Instant::now();
    while publisher.queue_len(&queue).await.unwrap() > 0
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.terminate();
    let run = tokio::task::spawn_blocking(move || running.finish(Duration::from_secs(60)))
        .await
        .unwrap();

    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.lines_with(&["SIGTERM: shutting down"]), 1, "{run:?}");
    assert_eq!(
        run.lines_with(&["consumer stopped", "succeeded=2"]),
        1,
        "{run:?}"
    );
}
