//! `ackstack dlq` on SQS (`SQS_ENDPOINT`, default the local moto server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ackstack_core::{Consumer, Headers, Message, Publish, handler_fn};
use ackstack_sqs::attrs::attribute_bytes;
use ackstack_sqs::testing::{self, TestQueue};
use ackstack_sqs::{SqsPublisher, SqsSource};
use aws_sdk_sqs::Client;
use bytes::Bytes;
use common::Fixture;

struct Sqs {
    client: Client,
    queue: TestQueue,
}

impl Sqs {
    async fn new() -> Sqs {
        Sqs::create(false).await
    }

    async fn create(fifo: bool) -> Sqs {
        let client = testing::client().await;
        let queue = TestQueue::create(&client, "cli", fifo).await.unwrap();
        Sqs { client, queue }
    }
}

impl Fixture for Sqs {
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "sqs".into(),
            "--queue".into(),
            self.queue.name.clone(),
            "--sqs-endpoint".into(),
            testing::endpoint(),
            "--region".into(),
            "us-east-1".into(),
        ]
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ]
    }

    fn binary_payloads(&self) -> bool {
        false
    }

    async fn dead_letter(&self, messages: Vec<Message>) {
        let want = self.dead_letters().await + messages.len();
        let publisher = SqsPublisher::new(self.client.clone(), self.queue.url.clone());
        for m in messages {
            publisher.publish(m).await.unwrap();
        }
        let mut config = self.queue.config(Duration::from_secs(30));
        config.wait_time_seconds = 1;
        let source = SqsSource::from_client(self.client.clone(), config)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let summary = Consumer::new(source)
            .max_attempts(1)
            .concurrency(32)
            .run_until(handler_fn(|d, _cx| common::fail(d)), async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while self.dead_letters().await < want && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .unwrap();
        let got = self.dead_letters().await;
        assert!(got >= want, "{got} of {want} dead-lettered: {summary:?}");
        if got > want {
            // At least once: SendMessage to the dead-letter queue landed but its answer did
            // not (the SDK or the runner sent it again), or a lease ran out before the delete.
            eprintln!(
                "{} dead letters more than messages after {:?}: {summary:?}",
                got - want,
                started.elapsed()
            );
        }
    }

    /// Receives and deletes until `expected` arrived or two receives in a row came back empty.
    async fn drain_work(&self, expected: usize) -> Vec<(Bytes, Headers)> {
        let mut got = Vec::new();
        let mut empty = 0;
        while got.len() < expected && empty < 2 {
            let want = (expected - got.len()).min(10);
            let batch = testing::drain(&self.client, &self.queue.url, want, Duration::from_secs(1))
                .await
                .unwrap();
            empty = if batch.is_empty() { empty + 1 } else { 0 };
            got.extend(batch);
        }
        got.into_iter()
            .map(|m| {
                let headers: Headers = m
                    .message_attributes()
                    .map(|attrs| {
                        attrs
                            .iter()
                            .map(|(k, v)| (k.clone(), attribute_bytes(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    Bytes::from(m.body.unwrap_or_default().into_bytes()),
                    headers,
                )
            })
            .collect()
    }

    async fn dead_letters(&self) -> usize {
        let dlq = TestQueue {
            url: self.queue.dlq_url.clone(),
            ..self.queue.clone()
        };
        dlq.approximate_count(&self.client).await.unwrap() as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_list_show_and_filters() {
    common::list_show_and_filters(&Sqs::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_replay_loop_guard_and_purge() {
    common::replay_loop_guard_and_purge(&Sqs::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_replay_of_1000_survives_sigkill() {
    common::replay_survives_sigkill(&Sqs::new().await, 1000, 100, Some(5)).await;
}

/// A FIFO dead-letter queue hands out nothing more of a message group while one of its
/// letters is held: a listing of twelve letters in one group reaches ten, and says so (exit
/// code 3); a purge, removing each, reaches them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_fifo_letters_out_of_reach_are_reported() {
    let fx = Sqs::create(true).await;
    let messages = (0..12)
        .map(|i| common::message(format!("fifo {i:02}")).key("one-group"))
        .collect();
    fx.dead_letter(messages).await;
    assert_eq!(fx.dead_letters().await, 12);
    let listed = common::ackstack(&fx, &["dlq", "list", "--json"]);
    assert_eq!(listed.code, Some(3), "{listed:?}");
    let shown = listed.json_lines().len();
    assert!(shown < 12, "the group's head blocks the rest: {listed:?}");
    assert!(
        listed
            .stderr
            .contains(&format!("{} letter(s) in", 12 - shown)),
        "{listed:?}"
    );
    let purged = common::ackstack(&fx, &["dlq", "purge", "--yes"]);
    assert_eq!(purged.code, Some(0), "{purged:?}");
    assert!(purged.text().contains("purged 12"), "{purged:?}");
    assert_eq!(fx.dead_letters().await, 0);
}
