//! Dead letters on NATS whose metadata NATS headers cannot carry as it is, against the server
//! at `NATS_URL` (default the local one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::{
    Consumer, DeadLetterMetadata, DeadLetterReason, HandlerError, Message, Publish, handler_fn,
};
use ackstack_nats::async_nats::jetstream::{self, consumer::pull};
use ackstack_nats::{NatsConfig, NatsPublisher, NatsSource};
use ackstack_testkit::unique_name;
use futures::StreamExt;

/// An error message with line breaks (a multi-line error chain) is dead-lettered with the
/// permanent failure it was, its line breaks written as `\r` and `\n`, not refused by NATS
/// and redelivered until it ran out of attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_message_with_line_breaks_is_kept() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = ackstack_nats::async_nats::connect(&url).await.unwrap();
    let stream = unique_name("multiline").replace('.', "_");
    let mut config = NatsConfig::new(url, stream.clone());
    config.ack_wait = Duration::from_secs(2);
    config.fetch_wait = Duration::from_millis(300);
    let source = NatsSource::from_client(client.clone(), config)
        .await
        .unwrap();
    NatsPublisher::new(client.clone(), stream.clone())
        .publish(Message::new("order"))
        .await
        .unwrap();
    let summary = Consumer::new(source)
        .max_attempts(3)
        .run_until(
            handler_fn(|_d, _cx| async {
                Err::<(), _>(HandlerError::permanent(
                    "card declined\r\ncaused by: no funds",
                ))
            }),
            async { tokio::time::sleep(Duration::from_secs(4)).await },
        )
        .await
        .unwrap();
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    assert_eq!(
        summary.received, 1,
        "dead-lettered at the first try: {summary:?}"
    );

    let js = jetstream::new(client);
    let copies = read_all(&js, &format!("{stream}-dlq")).await;
    let headers = &copies[0].1;
    let metadata = DeadLetterMetadata::from_headers(headers).unwrap();
    assert_eq!(metadata.reason, DeadLetterReason::Permanent, "{metadata:?}");
    assert_eq!(
        metadata.error_message,
        "card declined\\r\\ncaused by: no funds"
    );
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}-dlq")).await;
}

/// Reads every message of the stream `name` from its start.
async fn read_all(
    js: &jetstream::Context,
    name: &str,
) -> Vec<(bytes::Bytes, ackstack_core::Headers)> {
    let reader = js
        .get_stream(name)
        .await
        .unwrap()
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut batch = reader
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        let mut headers = ackstack_core::Headers::new();
        for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
            for value in values {
                headers.append(name.to_string(), value.as_str().to_string());
            }
        }
        out.push((m.payload.clone(), headers));
    }
    out
}

/// Dead-letters everything on `stream` through the durable consumer `consumer`.
async fn dead_letter_all(client: &ackstack_nats::async_nats::Client, stream: &str, consumer: &str) {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut config = NatsConfig::new(url, stream);
    config.consumer = consumer.into();
    config.ack_wait = Duration::from_secs(2);
    config.fetch_wait = Duration::from_millis(300);
    let source = NatsSource::from_client(client.clone(), config)
        .await
        .unwrap();
    Consumer::new(source)
        .run_until(
            handler_fn(|_d, _cx| async { Err::<(), _>(HandlerError::permanent("no")) }),
            async { tokio::time::sleep(Duration::from_secs(2)).await },
        )
        .await
        .unwrap();
}

/// A message's own server-control headers (here `Nats-Expected-Stream`, which the
/// dead-letter stream would refuse) do not act on its dead-letter copy: they are kept under
/// another name, with the subject it was published to; and two consumers of one stream
/// that share a dead-letter stream each get their copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_carry_no_server_controls_and_one_per_consumer() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = ackstack_nats::async_nats::connect(&url).await.unwrap();
    let stream = unique_name("controls").replace('.', "_");
    let mut headers = ackstack_nats::async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Stream", stream.as_str());
    let js = jetstream::new(client.clone());
    // The streams first, then the message.
    NatsSource::from_client(client.clone(), NatsConfig::new(url, stream.clone()))
        .await
        .unwrap();
    js.publish_with_headers(stream.clone(), headers, "order".into())
        .await
        .unwrap()
        .await
        .unwrap();
    dead_letter_all(&client, &stream, "billing").await;
    dead_letter_all(&client, &stream, "audit").await;
    let copies = read_all(&js, &format!("{stream}-dlq")).await;
    assert_eq!(copies.len(), 2, "one copy per consumer: {copies:?}");
    for (payload, headers) in &copies {
        assert_eq!(payload.as_ref(), b"order");
        assert_eq!(headers.get_str("Nats-Expected-Stream"), None);
        assert_eq!(
            headers.get_str("x-ackstack-orig-Nats-Expected-Stream"),
            Some(stream.as_str())
        );
        assert_eq!(
            headers.get_str("x-ackstack-nats-subject"),
            Some(stream.as_str())
        );
    }
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}-dlq")).await;
}
