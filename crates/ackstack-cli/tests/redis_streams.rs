//! `ackstack dlq` on Redis Streams (`REDIS_URL`, default the local Redis).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;
use std::time::Duration;

use ackstack_core::{Headers, Message, Publish};
use ackstack_redis_streams::redis::{self, Value};
use ackstack_redis_streams::{RedisStreamsConfig, RedisStreamsPublisher, RedisStreamsSource};
use ackstack_testkit::unique_name;
use bytes::Bytes;
use common::Fixture;

struct Streams {
    url: String,
    stream: String,
    conn: redis::aio::ConnectionManager,
    /// The last entry of the work stream already read (replays come after it).
    read_up_to: Mutex<String>,
}

impl Streams {
    async fn new() -> Streams {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        Streams {
            url,
            stream: unique_name("cli"),
            conn,
            read_up_to: Mutex::new("0-0".into()),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.conn.clone()).await.unwrap()
    }
}

/// `[[id, [field, value, ...]], ...]` as (id, payload, other fields as headers).
fn entries(value: Value) -> Vec<(String, Bytes, Headers)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let (Value::BulkString(id), Value::Array(flat)) = (&parts[0], &parts[1]) else {
                return None;
            };
            let mut payload = Bytes::new();
            let mut headers = Headers::new();
            for pair in flat.chunks(2) {
                if let [Value::BulkString(n), Value::BulkString(v)] = pair {
                    if n == b"payload" {
                        payload = Bytes::from(v.clone());
                    } else {
                        headers.append(String::from_utf8_lossy(n).into_owned(), v.clone());
                    }
                }
            }
            Some((String::from_utf8_lossy(id).into_owned(), payload, headers))
        })
        .collect()
}

impl Fixture for Streams {
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "redis-streams".into(),
            "--queue".into(),
            self.stream.clone(),
            "--redis-url".into(),
            self.url.clone(),
        ]
    }

    async fn dead_letter(&self, messages: Vec<Message>) {
        let want = self.dead_letters().await + messages.len();
        let batch = messages.iter().map(|m| m.payload.clone()).collect();
        let mut config = RedisStreamsConfig::new(self.url.clone(), self.stream.clone());
        config.block = Duration::from_millis(200);
        let source = RedisStreamsSource::connect(config).await.unwrap();
        let publisher = RedisStreamsPublisher::new(self.conn.clone(), self.stream.clone());
        for m in messages {
            publisher.publish(m).await.unwrap();
        }
        // What was published is not a replay.
        let last = entries(
            self.query(
                redis::cmd("XREVRANGE")
                    .arg(&self.stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await,
        );
        *self.read_up_to.lock().unwrap() = last[0].0.clone();
        common::fail_batch(self, source, batch, want).await;
    }

    async fn drain_work(&self, expected: usize) -> Vec<(Bytes, Headers)> {
        let after = self.read_up_to.lock().unwrap().clone();
        let got = entries(
            self.query(
                redis::cmd("XRANGE")
                    .arg(&self.stream)
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(expected),
            )
            .await,
        );
        if let Some((id, _, _)) = got.last() {
            *self.read_up_to.lock().unwrap() = id.clone();
        }
        got.into_iter().map(|(_, p, h)| (p, h)).collect()
    }

    async fn dead_letters(&self) -> usize {
        let n: usize = self
            .query(redis::cmd("XLEN").arg(format!("{}-dlq", self.stream)))
            .await;
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_list_show_and_filters() {
    common::list_show_and_filters(&Streams::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_groups_replay_and_purge() {
    common::groups_replay_and_purge(&Streams::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_replay_loop_guard_and_purge() {
    common::replay_loop_guard_and_purge(&Streams::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_replay_of_1000_survives_sigkill() {
    common::replay_survives_sigkill(&Streams::new().await, 1000, 500, None).await;
}

/// A replay whose destination cannot take it (a key of another type) fails and leaves the
/// letter where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_a_replay_that_fails_keeps_the_letter() {
    let fx = Streams::new().await;
    fx.dead_letter(vec![common::message("order E")]).await;
    let wrong = format!("{}-not-a-stream", fx.stream);
    let _: () = fx.query(redis::cmd("SET").arg(&wrong).arg("text")).await;
    let run = common::ackstack(&fx, &["dlq", "replay", "--to", &wrong]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(fx.dead_letters().await, 1, "the letter stays: {run:?}");
}

/// A consumer configured with another payload field: the command reads it from the
/// `[redis_streams]` table of its config file, and shows the payload byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_the_payload_field_comes_from_the_config_file() {
    let fx = Streams::new().await;
    let mut config = RedisStreamsConfig::new(fx.url.clone(), fx.stream.clone());
    config.payload_field = "body".into();
    config.block = Duration::from_millis(200);
    let source = RedisStreamsSource::connect(config).await.unwrap();
    let _: String = fx
        .query(
            redis::cmd("XADD")
                .arg(&fx.stream)
                .arg("*")
                .arg("body")
                .arg("order G")
                .arg("message-id")
                .arg("g-1"),
        )
        .await;
    common::fail_batch(&fx, source, [Bytes::from("order G")].into(), 1).await;
    let file = std::env::temp_dir().join(format!("{}.toml", fx.stream));
    std::fs::write(
        &file,
        format!(
            "[redis_streams]\nstream = \"{}\"\npayload_field = \"body\"\n",
            fx.stream
        ),
    )
    .unwrap();
    let config_path = file.to_string_lossy().into_owned();
    let shown = common::ackstack(
        &fx,
        &["dlq", "show", "g-1", "--raw", "--config", &config_path],
    );
    let _ = std::fs::remove_file(&file);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    assert_eq!(shown.stdout, b"order G".to_vec());
}
