//! Runs the example against the local SQS endpoint (`SQS_ENDPOINT`, default moto on
//! 127.0.0.1:4566) and Redis (`REDIS_URL`, default 127.0.0.1:6379), on a queue of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack::Publish;
use ackstack::sqs::SqsPublisher;
use ackstack::sqs::testing::{self, TestQueue};

#[path = "../../support/run.rs"]
mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_processed_deduplicated_and_dead_lettered_then_it_exits_when_idle() {
    let client = testing::client().await;
    let queue = TestQueue::create(&client, "example-sqs", false)
        .await
        .expect("SQS is up");
    let publisher = SqsPublisher::new(client.clone(), queue.url.clone());
    for message in support::sample_orders() {
        publisher.publish(message).await.unwrap();
    }

    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let env = [
        // The AWS SDK's default chain reads these, as it would in a deployment.
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("SQS_ENDPOINT", testing::endpoint()),
        ("REDIS_URL", redis),
        ("APP_SQS__QUEUE_NAME", queue.name.clone()),
        ("APP_SQS__WAIT_TIME_SECONDS", "1".to_string()),
        ("APP_REDIS__KEY_PREFIX", format!("{}:", queue.name)),
        ("APP_EXIT_WHEN_IDLE", "3s".to_string()),
    ];
    let bin = env!("CARGO_BIN_EXE_sqs");
    let run =
        tokio::task::spawn_blocking(move || support::run(bin, &env, Duration::from_secs(120)))
            .await
            .unwrap();

    support::assert_sample_orders_handled(&run);
    let letters = queue
        .read_dead_letters(&client, 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body(), Some("not an order"));
    assert_eq!(queue.approximate_count(&client).await.unwrap(), 0);
    queue.delete(&client).await;
}
