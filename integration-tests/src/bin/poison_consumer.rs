//! A consumer written as a user would, for the poison-message suites
//! (`tests/poison.rs`): concurrency 4, at most 3 attempts, default prefetch; its handler
//! aborts the whole process on the payload `poison` (as an out-of-memory kill or a segfault
//! in a native library would) and appends every other payload it handled to a file. It exits
//! once idle for 6 s (on Kafka 15 s: a restarted member gets its partitions only once the
//! crashed one's session of 6 s timed out).
//!
//! Usage:
//! - `poison_consumer sqs QUEUE_URL DLQ_URL HANDLED_FILE` (endpoint from `SQS_ENDPOINT`,
//!   visibility timeout 2 s);
//! - `poison_consumer rabbitmq AMQP_URL QUEUE classic|quorum HANDLED_FILE` (the queues
//!   declared with [`rabbitmq_config`]: default prefetch and delay buckets, deleted 300 s
//!   after their last use);
//! - `poison_consumer kafka BROKERS TOPIC HANDLED_FILE` (group `TOPIC-poison`, dead letters
//!   to `TOPIC-dlq`);
//! - `poison_consumer nats URL STREAM HANDLED_FILE` (the stream, its dead-letter stream and
//!   the consumer created when missing, `ack_wait` 2 s);
//! - `poison_consumer redis-streams URL STREAM HANDLED_FILE` (group `ackstack`, lease 2 s).

use std::io::Write;
use std::time::Duration;

use ackstack::adapter::Source;
use ackstack::kafka::{KafkaConfig, KafkaSource};
use ackstack::nats::{NatsConfig, NatsSource};
use ackstack::rabbitmq::{QueueType, RabbitSource};
use ackstack::redis_streams::{RedisStreamsConfig, RedisStreamsSource};
use ackstack::sqs::{SqsConfig, SqsSource};
use ackstack::{Backoff, Consumer, handler_fn};
use integration_tests::rabbitmq_config;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [broker, queue, dlq, handled] if broker == "sqs" => {
            let endpoint = std::env::var("SQS_ENDPOINT")
                .unwrap_or_else(|_| "http://127.0.0.1:4566".to_string());
            let mut config = SqsConfig::queue_url(queue.clone())
                .with_dead_letter_queue(dlq.clone())
                .with_endpoint(endpoint)
                .with_wait_time_seconds(1)
                .with_visibility_timeout(Duration::from_secs(2));
            config.region = Some("us-east-1".to_string());
            run(SqsSource::connect(config).await?, handled, IDLE).await
        }
        [broker, url, queue, queue_type, handled] if broker == "rabbitmq" => {
            let queue_type = match queue_type.as_str() {
                "quorum" => QueueType::Quorum,
                _ => QueueType::Classic,
            };
            let config = rabbitmq_config(url, queue, queue_type);
            run(RabbitSource::connect(config).await?, handled, IDLE).await
        }
        [broker, brokers, topic, handled] if broker == "kafka" => {
            let mut config = KafkaConfig::new(brokers.clone(), format!("{topic}-poison"), topic)
                .property("fetch.wait.max.ms", "100")
                .property("heartbeat.interval.ms", "500");
            config.session_timeout = Duration::from_secs(6);
            run(KafkaSource::new(&config)?, handled, Duration::from_secs(15)).await
        }
        [broker, url, stream, handled] if broker == "nats" => {
            let mut config = NatsConfig::new(url.clone(), stream.clone());
            config.ack_wait = Duration::from_secs(2);
            config.fetch_wait = Duration::from_millis(500);
            run(NatsSource::connect(config).await?, handled, IDLE).await
        }
        [broker, url, stream, handled] if broker == "redis-streams" => {
            let mut config = RedisStreamsConfig::new(url.clone(), stream.clone());
            config.lease = Duration::from_secs(2);
            config.block = Duration::from_millis(500);
            run(RedisStreamsSource::connect(config).await?, handled, IDLE).await
        }
        _ => Err(
            "usage: poison_consumer sqs QUEUE_URL DLQ_URL HANDLED_FILE | \
                  poison_consumer rabbitmq AMQP_URL QUEUE classic|quorum HANDLED_FILE | \
                  poison_consumer kafka BROKERS TOPIC HANDLED_FILE | \
                  poison_consumer nats|redis-streams URL STREAM HANDLED_FILE"
                .into(),
        ),
    }
}

/// How long the consumer runs idle before it exits.
const IDLE: Duration = Duration::from_secs(6);

async fn run<S: Source>(source: S, handled: &str, idle: Duration) -> Result<(), Error> {
    let handled = handled.to_string();
    let consumer = Consumer::new(source)
        .concurrency(4)
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(50), Duration::from_millis(200)).no_jitter(),
        );
    let status = consumer.status();
    let summary = consumer
        .run_until(
            handler_fn(move |d, _cx| {
                let handled = handled.clone();
                async move {
                    if &d.payload[..] == b"poison" {
                        std::process::abort();
                    }
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&handled)?;
                    // One write per line: handlers run at once, and an appending write is
                    // atomic, so lines never interleave.
                    let mut line = d.payload.to_vec();
                    line.push(b'\n');
                    file.write_all(&line)?;
                    Ok(())
                }
            }),
            async move { status.idle(idle).await },
        )
        .await?;
    println!("summary {summary:?}");
    Ok(())
}
