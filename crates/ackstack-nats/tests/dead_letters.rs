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
    let reader = js
        .get_stream(format!("{stream}-dlq"))
        .await
        .unwrap()
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut batch = reader
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let letter = batch.next().await.unwrap().unwrap();
    let mut headers = ackstack_core::Headers::new();
    for (name, values) in letter.headers.iter().flat_map(|h| h.iter()) {
        for value in values {
            headers.append(name.to_string(), value.as_str().to_string());
        }
    }
    let metadata = DeadLetterMetadata::from_headers(&headers).unwrap();
    assert_eq!(metadata.reason, DeadLetterReason::Permanent, "{metadata:?}");
    assert_eq!(
        metadata.error_message,
        "card declined\\r\\ncaused by: no funds"
    );
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}-dlq")).await;
}
