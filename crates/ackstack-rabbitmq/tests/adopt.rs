//! Existing queues (invariant 14): under `declare_topology: auto` (the default) a work queue a
//! team declared with its own arguments, or as another queue type, is adopted as it is and
//! consumed; a stream queue is refused with a clear error; `always` refuses a queue with other
//! arguments; `never` names a missing queue. The queues are declared first by a plain lapin
//! client, as a team's existing service would have.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::{ErrorKind, Failure, Message, Publish, Received, Settle, Source};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource, Topology};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};

mod common;
use common::{config, receive_n, retry_and_ack, url};

/// Declares `queue` durable with `args` (plus `x-expires` of 300 s, so that runs leave
/// nothing behind, where the queue type takes it) through a plain client.
async fn declare_as_a_team_would(queue: &str, mut args: Vec<(&'static str, AMQPValue)>) {
    let stream = args.iter().any(|(_, v)| *v == text("stream"));
    if !stream {
        args.push(("x-expires", AMQPValue::LongInt(300_000)));
    }
    let connection = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut table = FieldTable::default();
    for (name, value) in args {
        table.insert(name.into(), value);
    }
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), table)
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// Publishes one message through ackstack's publisher and consumes and acks it through
/// ackstack's source; the queue is then empty.
async fn consumes_through_ackstack(config: &RabbitConfig) {
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    publisher.publish(Message::new("adopted")).await.unwrap();
    let mut source = RabbitSource::connect(config.clone()).await.unwrap();
    let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].delivery.payload[..], b"adopted");
    let settler = source.settler();
    let tokens = got.into_iter().map(|r| r.token).collect();
    assert_eq!(settler.ack(tokens).await.failed.len(), 0);
    settler.flush().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while publisher.queue_len(&config.queue).await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ack never landed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ackstack's own queues are there beside it.
    assert_eq!(publisher.queue_len(&config.dlq_name()).await.unwrap(), 0);
}

#[tokio::test]
async fn auto_adopts_a_classic_queue_declared_with_the_teams_own_arguments() {
    let config = config(url(), "adopt-classic", &[1000]);
    declare_as_a_team_would(
        &config.queue,
        vec![
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("team-dead-letters")),
            ("x-message-ttl", AMQPValue::LongInt(600_000)),
            ("x-max-length", AMQPValue::LongInt(10_000)),
        ],
    )
    .await;
    assert_eq!(config.declare_topology, Topology::Auto, "the default");
    consumes_through_ackstack(&config).await;
}

#[tokio::test]
async fn auto_adopts_a_quorum_queue_declared_without_ackstacks_arguments() {
    let config = config(url(), "adopt-quorum", &[1000]);
    declare_as_a_team_would(&config.queue, vec![("x-queue-type", text("quorum"))]).await;
    consumes_through_ackstack(&config).await;
}

/// The attempt number on an adopted quorum queue: each retry copy carries the next attempt
/// (ackstack's `x-ackstack-attempt` header, through its own delay queues), and a redelivery
/// the broker counts in `x-delivery-count` uses no attempt: it comes back a suspect.
#[tokio::test]
async fn attempts_count_on_an_adopted_quorum_queue() {
    let config = config(url(), "adopt-quorum-attempts", &[100]);
    declare_as_a_team_would(&config.queue, vec![("x-queue-type", text("quorum"))]).await;
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    publisher.publish(Message::new("q1")).await.unwrap();
    let mut source = RabbitSource::connect(config.clone()).await.unwrap();
    let settler = source.settler();
    let failure = Failure::new(ErrorKind::Transient, "not yet");
    for attempt in 1..=3 {
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "attempt {attempt} came");
        assert_eq!(got[0].delivery.payload, "q1");
        assert_eq!(got[0].delivery.attempt, attempt);
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        if attempt == 3 {
            // A redelivery by the broker: counted by it, not as an attempt.
            drop((delivery, token));
            source.disconnect().await;
            let again = receive_n(&mut source, 1, Duration::from_secs(10)).await;
            assert_eq!(again.len(), 1, "redelivered");
            assert_eq!(
                again[0].delivery.attempt, 3,
                "x-delivery-count is no attempt"
            );
            assert!(again[0].suspect);
            assert!(
                settler
                    .ack(vec![again.into_iter().next().unwrap().token])
                    .await
                    .failed
                    .is_empty()
            );
            break;
        }
        retry_and_ack(&settler, token, &delivery, Duration::ZERO, &failure).await;
    }
    settler.flush().await;
}

#[tokio::test]
async fn a_stream_queue_is_refused_with_a_clear_error() {
    let config = config(url(), "adopt-stream", &[1000]);
    declare_as_a_team_would(&config.queue, vec![("x-queue-type", text("stream"))]).await;
    let err = RabbitSource::connect(config.clone()).await.unwrap_err();
    // A stream does not expire by itself.
    let connection = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let options = lapin::options::QueueDeleteOptions::default();
    channel
        .queue_delete(config.queue.as_str().into(), options)
        .await
        .unwrap();
    assert!(err.is_fatal(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&config.queue)
            && message.contains("x-queue-type 'stream'")
            && message.contains("stream queue"),
        "{message}"
    );
}

#[tokio::test]
async fn always_refuses_a_queue_declared_with_other_arguments() {
    let mut config = config(url(), "adopt-always", &[1000]);
    config.declare_topology = Topology::Always;
    declare_as_a_team_would(&config.queue, vec![("x-max-length", AMQPValue::LongInt(5))]).await;
    let err = RabbitSource::connect(config).await.unwrap_err();
    assert!(err.is_fatal(), "{err}");
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");
}

#[tokio::test]
async fn never_names_a_missing_work_queue() {
    let mut config = config(url(), "adopt-never", &[1000]);
    config.declare_topology = Topology::Never;
    let err = RabbitSource::connect(config.clone()).await.unwrap_err();
    assert!(err.is_fatal(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&config.queue) && message.contains("does not exist"),
        "{message}"
    );
}

#[test]
fn the_setting_reads_names_and_the_old_flags() {
    let read = |v: &str| -> Topology {
        let json = format!(r#"{{ "uri": "amqp://h", "queue": "q", "declare_topology": {v} }}"#);
        serde_json::from_str::<RabbitConfig>(&json)
            .unwrap()
            .declare_topology
    };
    assert_eq!(read(r#""auto""#), Topology::Auto);
    assert_eq!(read(r#""always""#), Topology::Always);
    assert_eq!(read(r#""never""#), Topology::Never);
    assert_eq!(read("true"), Topology::Always);
    assert_eq!(read("false"), Topology::Never);
    let json = r#"{ "uri": "amqp://h", "queue": "q", "declare_topology": "sometimes" }"#;
    assert!(serde_json::from_str::<RabbitConfig>(json).is_err());
}
