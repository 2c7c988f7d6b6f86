//! `ackstack dlq` on RabbitMQ (`AMQP_URL`, default the local server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ackstack_core::{Consumer, Headers, Message, handler_fn};
use ackstack_rabbitmq::{QueueType, RabbitConfig, RabbitPublisher, RabbitSource};
use ackstack_testkit::unique_name;
use bytes::Bytes;
use common::Fixture;

struct Rabbit {
    config: RabbitConfig,
    publisher: RabbitPublisher,
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

impl Rabbit {
    async fn new() -> Rabbit {
        Rabbit::of(QueueType::Classic).await
    }

    async fn of(queue_type: QueueType) -> Rabbit {
        let mut config = RabbitConfig::new(url(), unique_name("cli"));
        config.queue_type = queue_type;
        config.queue_expires = Some(Duration::from_secs(300));
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        Rabbit { config, publisher }
    }
}

impl Fixture for Rabbit {
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "rabbitmq".into(),
            "--queue".into(),
            self.config.queue.clone(),
            "--amqp-url".into(),
            url(),
        ]
    }

    async fn dead_letter(&self, messages: Vec<Message>) {
        let want = self.dead_letters().await + messages.len();
        for m in messages {
            self.publisher
                .publish_to(&self.config.queue, m)
                .await
                .unwrap();
        }
        let source = RabbitSource::connect(self.config.clone()).await.unwrap();
        let publisher = &self.publisher;
        let dlq = self.config.dlq_name();
        Consumer::new(source)
            .max_attempts(1)
            .run_until(handler_fn(|d, _cx| common::fail(d)), async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while (publisher.queue_len(&dlq).await.unwrap() as usize) < want
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap();
        assert_eq!(self.dead_letters().await, want);
    }

    async fn drain_work(&self, expected: usize) -> Vec<(Bytes, Headers)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while out.len() < expected && tokio::time::Instant::now() < deadline {
            match self.publisher.get(&self.config.queue).await.unwrap() {
                Some(f) => out.push((f.payload, f.headers)),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        out
    }

    async fn dead_letters(&self) -> usize {
        self.publisher
            .queue_len(&self.config.dlq_name())
            .await
            .unwrap() as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_list_show_and_filters() {
    common::list_show_and_filters(&Rabbit::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_groups_replay_and_purge() {
    common::groups_replay_and_purge(&Rabbit::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replay_loop_guard_and_purge() {
    common::replay_loop_guard_and_purge(&Rabbit::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_replay_of_1000_survives_sigkill() {
    common::replay_survives_sigkill(&Rabbit::new().await, 1000, 500, None).await;
}

/// Letters without a message id are named by their content: the same id in every scan,
/// whatever was removed before them, and `show` finds them by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_letters_without_message_ids_keep_their_ids() {
    let fx = Rabbit::new().await;
    fx.dead_letter(vec![Message::new("first"), Message::new("second")])
        .await;
    let ids = || -> Vec<(String, String)> {
        let run = common::ackstack(&fx, &["dlq", "list", "--json"]);
        assert_eq!(run.code, Some(0), "{run:?}");
        run.json_lines()
            .iter()
            .map(|l| {
                (
                    l["metadata"]["error_message"].as_str().unwrap().to_string(),
                    l["id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = ids();
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(
        before.iter().all(|(_, id)| id.starts_with("h-")),
        "{before:?}"
    );
    assert_ne!(before[0].1, before[1].1);
    assert_eq!(ids(), before, "a second scan names them the same");
    let purged = common::ackstack(&fx, &["dlq", "purge", "--grep", "charge first", "--yes"]);
    assert_eq!(purged.code, Some(0), "{purged:?}");
    let second = before
        .iter()
        .find(|(error, _)| error.ends_with("second"))
        .unwrap()
        .clone();
    assert_eq!(ids(), vec![second.clone()], "the other keeps its id");
    let shown = common::ackstack(&fx, &["dlq", "show", &second.1, "--raw"]);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    assert_eq!(shown.stdout, b"second");
}

/// Each scan hands a letter out once more, and RabbitMQ 4 drops a quorum-queue message past
/// its delivery limit: once a letter has been handed out ten times, a scan says so (and how to
/// lift the limit). The letter itself is still there, its id unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_warns_about_letters_a_quorum_queue_handed_out_often() {
    let fx = Rabbit::of(QueueType::Quorum).await;
    fx.dead_letter(vec![Message::new("looked at")]).await;
    let mut ids = Vec::new();
    let mut warned_at = None;
    for scan in 1..=12 {
        let run = common::ackstack(&fx, &["dlq", "list", "--json"]);
        assert_eq!(run.code, Some(0), "{run:?}");
        ids.extend(run.json_lines().iter().map(|l| l["id"].to_string()));
        if warned_at.is_none() && run.stderr.contains("delivery-limit") {
            warned_at = Some(scan);
        }
        // The requeue lands as the command's channel closes.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fx.dead_letters().await != 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let warned_at = warned_at.expect("a scan warned about the delivery limit");
    assert!((10..=12).contains(&warned_at), "warned at scan {warned_at}");
    assert_eq!(ids.len(), 12, "every scan found the letter: {ids:?}");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
}
