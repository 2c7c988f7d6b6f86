//! `ackstack dlq` on NATS JetStream (`NATS_URL`, default the local server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ackstack_core::{Headers, Message, Publish};
use ackstack_nats::async_nats::jetstream::{self, consumer::pull};
use ackstack_nats::{NatsConfig, NatsPublisher, NatsSource, async_nats};
use ackstack_testkit::unique_name;
use bytes::Bytes;
use common::Fixture;
use futures::StreamExt;

struct Nats {
    url: String,
    stream: String,
    client: async_nats::Client,
    /// Reads the work stream across calls (a durable consumer of its own, no acks).
    drain: jetstream::consumer::PullConsumer,
}

impl Nats {
    async fn new() -> Nats {
        Nats::with_subjects(|_| Vec::new()).await
    }

    /// With the work stream's subjects (`subjects` of its name; none: the name itself).
    async fn with_subjects(subjects: impl Fn(&str) -> Vec<String>) -> Nats {
        let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let client = async_nats::connect(&url).await.unwrap();
        let stream = unique_name("cli").replace('.', "_");
        let mut config = Nats::config(&url, &stream);
        config.subjects = subjects(&stream);
        // The work stream, its dead-letter stream and the consumer, as a service creates them.
        NatsSource::from_client(client.clone(), config)
            .await
            .unwrap();
        let drain = jetstream::new(client.clone())
            .get_stream(&stream)
            .await
            .unwrap()
            .create_consumer(pull::Config {
                durable_name: Some("drain".into()),
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        Nats {
            url,
            stream,
            client,
            drain,
        }
    }

    fn config(url: &str, stream: &str) -> NatsConfig {
        let mut config = NatsConfig::new(url, stream);
        config.ack_wait = Duration::from_secs(5);
        config.fetch_wait = Duration::from_millis(500);
        config
    }
}

impl Fixture for Nats {
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "nats".into(),
            "--queue".into(),
            self.stream.clone(),
            "--nats-url".into(),
            self.url.clone(),
        ]
    }

    fn shown_error(&self, error: String) -> String {
        error.replace('\r', "\\r").replace('\n', "\\n")
    }

    async fn dead_letter(&self, messages: Vec<Message>) {
        let want = self.dead_letters().await + messages.len();
        let batch = messages.iter().map(|m| m.payload.clone()).collect();
        let published = messages.len();
        let publisher = NatsPublisher::new(self.client.clone(), self.stream.clone());
        for m in messages {
            publisher.publish(m).await.unwrap();
        }
        // The stream keeps what was published: read past it, so that only replays are
        // drained later.
        let mut skipped = 0;
        while skipped < published {
            let got = self.drain_work(published - skipped).await.len();
            assert!(got > 0, "the published messages can be read back");
            skipped += got;
        }
        let source =
            NatsSource::from_client(self.client.clone(), Nats::config(&self.url, &self.stream))
                .await
                .unwrap();
        common::fail_batch(self, source, batch, want).await;
    }

    async fn drain_work(&self, expected: usize) -> Vec<(Bytes, Headers)> {
        let mut out = Vec::new();
        while out.len() < expected {
            let mut batch = self
                .drain
                .fetch()
                .max_messages((expected - out.len()).min(500))
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .unwrap();
            let before = out.len();
            while let Some(Ok(m)) = batch.next().await {
                let mut headers = Headers::new();
                for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
                    for value in values {
                        headers.append(name.to_string(), value.as_str().to_string());
                    }
                }
                out.push((m.payload.clone(), headers));
            }
            if out.len() == before {
                break;
            }
        }
        out
    }

    async fn dead_letters(&self) -> usize {
        let mut dlq = jetstream::new(self.client.clone())
            .get_stream(format!("{}-dlq", self.stream))
            .await
            .unwrap();
        let n = dlq.info().await.unwrap().state.messages;
        usize::try_from(n).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_list_show_and_filters() {
    common::list_show_and_filters(&Nats::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_groups_replay_and_purge() {
    common::groups_replay_and_purge(&Nats::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_replay_loop_guard_and_purge() {
    common::replay_loop_guard_and_purge(&Nats::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_replay_of_1000_survives_sigkill() {
    common::replay_survives_sigkill(&Nats::new().await, 1000, 500, None).await;
}

/// A stream of other subjects than its name: a replay goes back to the subject the message
/// was published to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_replay_goes_back_to_its_subject() {
    let fx = Nats::with_subjects(|stream| vec![format!("{stream}.in.>")]).await;
    let subject = format!("{}.in.eu", fx.stream);
    let publisher = NatsPublisher::new(fx.client.clone(), subject.clone());
    publisher.publish(common::message("order F")).await.unwrap();
    let source = NatsSource::from_client(fx.client.clone(), Nats::config(&fx.url, &fx.stream))
        .await
        .unwrap();
    common::fail_batch(&fx, source, [bytes::Bytes::from("order F")].into(), 1).await;
    fx.drain_work(1).await;
    let run = common::ackstack(&fx, &["dlq", "replay"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let js = jetstream::new(fx.client.clone());
    let mut stream = js.get_stream(&fx.stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let replayed = stream.get_raw_message(last).await.unwrap();
    assert_eq!(replayed.subject.as_str(), subject);
    assert_eq!(replayed.payload.as_ref(), b"order F");
}
