//! An Amazon SQS consumer service: settings from a TOML file with environment overrides, logs
//! to stdout, graceful shutdown on SIGTERM and Ctrl-C, and deduplication in Redis when
//! `REDIS_URL` is set.
//!
//! ```text
//! cargo run -p example-sqs                              # settings: examples/sqs/config.toml
//! SQS_ENDPOINT=http://127.0.0.1:4566 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test cargo run -p example-sqs
//! APP_SQS__QUEUE_NAME=payments REDIS_URL=redis://127.0.0.1:6379 cargo run -p example-sqs
//! ```
//!
//! Credentials and region come from aws-config's default chain (environment, profile, IMDS);
//! `SQS_ENDPOINT` points the client at an emulator such as moto.
//!
//! It consumes JSON orders (`{"order_id":"A-1","amount_cents":1250}`) from the queue `orders`:
//! a good order is logged and acked (deleted in batches of ten), a malformed one goes to
//! `orders-dlq` at once, and a failure of the (here imaginary) payment call would be retried by
//! hiding the message for the backoff's delay (`ChangeMessageVisibility`).

use std::time::Duration;

use ackstack::redis::{RedisDedupConfig, RedisDedupStore};
use ackstack::sqs::{SqsConfig, SqsSource};
use ackstack::{Consumer, ConsumerConfig, DedupKey, Delivery, HandlerError, handler_fn};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// What the service reads at start-up: the file, then the environment over it.
#[derive(Deserialize)]
struct Settings {
    /// The runner: concurrency, retry policy, shutdown deadline, ...
    #[serde(default)]
    consumer: ConsumerConfig,
    /// The queue, its dead-letter queue, long polling and the visibility timeout.
    sqs: SqsConfig,
    /// Deduplication by the `idempotency-key` header; off when absent.
    redis: Option<RedisDedupConfig>,
    /// Stop after this long with nothing to do (batch jobs, tests); unset: run until stopped.
    #[serde(default, with = "ackstack::adapter::duration::option")]
    exit_when_idle: Option<Duration>,
}

fn settings() -> Result<Settings, Box<figment::Error>> {
    let file = std::env::var("CONFIG")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml").to_string());
    Figment::new()
        .merge(Toml::file(file))
        .merge(Env::prefixed("APP_").split("__"))
        .merge(Env::raw().only(&["REDIS_URL"]).map(|_| "redis.url".into()))
        .extract()
        .map_err(Box::new)
}

#[derive(Deserialize)]
struct Order {
    order_id: String,
    amount_cents: i64,
}

async fn handle(delivery: Delivery) -> Result<(), HandlerError> {
    let order: Order = ackstack::decode::json(&delivery)?; // malformed: dead-lettered at once
    if order.amount_cents <= 0 {
        return Err(HandlerError::permanent("the amount must be positive"));
    }
    // A payment call would go here; `?` on its error retries it with backoff.
    tracing::info!(order_id = %order.order_id, amount_cents = order.amount_cents, "order processed");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let settings = settings()?;

    // Unreachable at start: exit non-zero and let the orchestrator restart the service. Once
    // connected, the source rides out broker outages by itself.
    let source = SqsSource::connect(settings.sqs).await?;
    let mut consumer = Consumer::new(source)
        .config(settings.consumer)
        .name("example-sqs");
    if let Some(redis) = settings.redis {
        let store = RedisDedupStore::connect(redis).await?;
        consumer = consumer.dedup(store, DedupKey::Header("idempotency-key".into()));
    }

    let status = consumer.status();
    let stop = async move {
        match settings.exit_when_idle {
            Some(idle) => tokio::select! {
                () = status.idle(idle) => tracing::info!("idle; stopping"),
                () = ackstack::shutdown_signal() => {}
            },
            None => ackstack::shutdown_signal().await,
        }
    };
    let summary = consumer
        .run_until(handler_fn(|delivery, _cx| handle(delivery)), stop)
        .await?;
    tracing::info!(
        received = summary.received,
        succeeded = summary.succeeded,
        retried = summary.retried,
        dead_lettered = summary.dead_lettered,
        deduplicated = summary.deduplicated,
        "consumer stopped"
    );
    Ok(())
}
