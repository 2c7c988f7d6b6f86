//! Queues with a native redrive policy, created by a plain client as a team's would be
//! (invariant 14): ackstack's dead letters go to the policy's queue, with ackstack's metadata;
//! a `maxReceiveCount` not above `max_attempts` stops the start naming both numbers; with
//! `redrive: trust` ackstack lowers its own `max_attempts` below it. Without a configured
//! visibility timeout, the queue's own is the lease. Needs moto (or SQS) at `SQS_ENDPOINT`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::{
    ConfigError, Consumer, ConsumerError, HandlerError, Message, Publish, Source, handler_fn,
};
use ackstack_sqs::testing::{self, TestQueue, drain, unique_name};
use ackstack_sqs::{DeadLetterRecord, Redrive, SqsConfig, SqsPublisher, SqsSource};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;

/// A work queue whose RedrivePolicy sends to a dead-letter queue of the team's own naming
/// after `max_receive_count` receives; the URLs of both.
async fn team_queues(client: &Client, max_receive_count: u32) -> (String, String) {
    let name = unique_name("team-work");
    let queue = TestQueue::with_redrive_policy(client, &name, max_receive_count)
        .await
        .unwrap();
    (queue.url, queue.dlq_url)
}

fn config(url: &str, redrive: Redrive) -> SqsConfig {
    let mut config = SqsConfig::queue_url(url)
        .with_endpoint(testing::endpoint())
        .with_wait_time_seconds(1)
        .with_visibility_timeout(Duration::from_secs(2));
    config.region = Some("us-east-1".to_string());
    config.redrive = redrive;
    config
}

/// Runs a consumer with `max_attempts` over the queue of `config`, whose handler fails
/// transiently for every message, until it has been idle for 4 s.
async fn run_failing(
    client: &Client,
    config: SqsConfig,
    max_attempts: u32,
) -> Result<ackstack_core::Summary, ConsumerError> {
    let source = SqsSource::from_client(client.clone(), config)
        .await
        .unwrap();
    let consumer = Consumer::new(source).max_attempts(max_attempts).backoff(
        ackstack_core::Backoff::exponential(Duration::from_millis(100), Duration::from_millis(100)),
    );
    let status = consumer.status();
    consumer
        .run_until(
            handler_fn(|_d, _cx| async { Err(HandlerError::transient("not yet")) }),
            async move { status.idle(Duration::from_secs(4)).await },
        )
        .await
}

/// Publishes one message to `url`, runs [`run_failing`] over it, and returns the metadata of
/// the one dead letter found in `dlq_url`.
async fn dead_letter_one(
    client: &Client,
    (url, dlq_url): (&str, &str),
    redrive: Redrive,
    max_attempts: u32,
) -> DeadLetterRecord {
    SqsPublisher::new(client.clone(), url.to_string())
        .publish(Message::new("fails"))
        .await
        .unwrap();
    let summary = run_failing(client, config(url, redrive), max_attempts)
        .await
        .unwrap();
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    let letters = drain(client, dlq_url, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "in the team's dead-letter queue");
    DeadLetterRecord::from_attributes(letters[0].message_attributes().unwrap()).unwrap()
}

#[tokio::test]
async fn dead_letters_go_to_the_queue_the_redrive_policy_names_with_metadata() {
    let client = testing::client().await;
    let (url, dlq_url) = team_queues(&client, 5).await;
    let record = dead_letter_one(&client, (&url, &dlq_url), Redrive::Check, 2).await;
    assert_eq!(record.metadata.attempts, 2, "dead-lettered by ackstack");
    let default_dlq = format!("{}-dlq", url.rsplit('/').next().unwrap());
    let missing = client.get_queue_url().queue_name(default_dlq).send().await;
    assert!(
        missing.is_err(),
        "no queue of ackstack's own naming was made"
    );
}

#[tokio::test]
async fn a_redrive_limit_not_above_max_attempts_stops_the_start_naming_both() {
    let client = testing::client().await;
    let (url, _) = team_queues(&client, 2).await;
    match run_failing(&client, config(&url, Redrive::Check), 5).await {
        Err(ConsumerError::Config(
            error @ ConfigError::BrokerLimit {
                deliveries: 2,
                max_attempts: 5,
            },
        )) => {
            let text = error.to_string();
            for fix in [
                "after 2 deliveries",
                "max_attempts 5",
                "raise maxReceiveCount above 5",
                "lower max_attempts below 2",
                "redrive: trust",
            ] {
                assert!(text.contains(fix), "{fix:?} in {text}");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_dead_letter_queue_in_the_config_wins_over_the_redrive_policy() {
    let client = testing::client().await;
    let (url, team_dlq) = team_queues(&client, 5).await;
    let own_dlq_name = unique_name("own-dead");
    let own_dlq = client
        .create_queue()
        .queue_name(&own_dlq_name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    SqsPublisher::new(client.clone(), url.clone())
        .publish(Message::new("fails"))
        .await
        .unwrap();
    let own = config(&url, Redrive::Check).with_dead_letter_queue(own_dlq_name);
    let summary = run_failing(&client, own, 2).await.unwrap();
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    let letters = drain(&client, &own_dlq, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "in the configured dead-letter queue");
    let record =
        DeadLetterRecord::from_attributes(letters[0].message_attributes().unwrap()).unwrap();
    assert_eq!(record.metadata.attempts, 2);
    let in_team = drain(&client, &team_dlq, 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(in_team.is_empty(), "nothing in the policy's queue");
}

#[tokio::test]
async fn a_trusted_redrive_limit_lowers_max_attempts_below_it() {
    let client = testing::client().await;
    let (url, dlq_url) = team_queues(&client, 3).await;
    let record = dead_letter_one(&client, (&url, &dlq_url), Redrive::Trust, 5).await;
    assert_eq!(record.metadata.attempts, 2, "max_attempts lowered to 3 - 1");
}

#[tokio::test]
async fn without_a_configured_visibility_timeout_the_queues_own_is_the_lease() {
    let client = testing::client().await;
    let url = client
        .create_queue()
        .queue_name(unique_name("team-visibility"))
        .attributes(QueueAttributeName::VisibilityTimeout, "3")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let mut own = config(&url, Redrive::Check).with_create_queues(true);
    own.visibility_timeout = None;
    let mut source = SqsSource::from_client(client.clone(), own).await.unwrap();
    assert_eq!(source.capabilities().lease, Some(Duration::from_secs(3)));

    // The message comes back once the queue's 3 s lapse, not after ackstack's old 30 s.
    SqsPublisher::new(client.clone(), url.clone())
        .publish(Message::new("held"))
        .await
        .unwrap();
    let first = source.receive(1).await.unwrap();
    assert_eq!(first.len(), 1);
    let mut again = Vec::new();
    for _ in 0..10 {
        again = source.receive(1).await.unwrap();
        if !again.is_empty() {
            break;
        }
    }
    assert_eq!(again.len(), 1, "redelivered after the queue's own lease");
    assert_eq!(again[0].delivery.attempt, 2);

    // A configured timeout wins over the queue's.
    let configured = SqsSource::from_client(client.clone(), config(&url, Redrive::Check))
        .await
        .unwrap();
    assert_eq!(
        configured.capabilities().lease,
        Some(Duration::from_secs(2))
    );
}
