//! Amazon SQS (or an emulator such as moto): the queue and `<queue>-dlq` are created when
//! missing. A queue that exists with a redrive policy keeps it: dead letters go to the queue
//! the policy names, and a `maxReceiveCount` not above `--max-attempts` ends the start with
//! exit 1. A retry hides the message for its delay (`ChangeMessageVisibility`, whole seconds).

use ackstack::sqs::{Client, SqsConfig, SqsPublisher, SqsSource};
use aws_config::{BehaviorVersion, Region};

use crate::{CONSUMER_NAME, Options, StartError};

/// Connects a source and a publisher to `--queue` at `--sqs-endpoint`.
///
/// The region is `AWS_REGION` (or `AWS_DEFAULT_REGION`), default `us-east-1`. Credentials come
/// from the AWS default chain when `AWS_ACCESS_KEY_ID` or `AWS_PROFILE` is set; otherwise the
/// fixed test credentials that local emulators accept are used.
pub async fn connect(opts: &Options) -> Result<(SqsSource, SqsPublisher), StartError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".to_string());
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region))
        .endpoint_url(&opts.sqs_endpoint);
    if env("AWS_ACCESS_KEY_ID").is_none() && env("AWS_PROFILE").is_none() {
        loader = loader.test_credentials();
    }
    let client = Client::new(&loader.load().await);
    // No dead-letter queue named here: `<queue>-dlq` by default, the redrive policy's queue
    // when the queue has one (as a team's existing queue often does).
    let config = SqsConfig::queue(opts.queue.clone())
        .with_create_queues(true)
        .with_wait_time_seconds(2)
        .with_consumer_name(CONSUMER_NAME);
    let at = &opts.sqs_endpoint;
    // A refusal no retry can fix (access denied, an invalid queue name) ends the start at
    // once; only an unreachable endpoint is waited for.
    let source = SqsSource::from_client(client, config)
        .await
        .map_err(|e| StartError::from_text(e.is_permanent(), format!("SQS at {at}: {e}")))?;
    let dlq = source.dead_letter_queue_url();
    let default = ackstack::sqs::config::default_dead_letter_name(&opts.queue);
    if !dlq.ends_with(&format!("/{default}")) {
        println!("note dead letters go to {dlq}, the queue's redrive target");
    }
    let publisher = SqsPublisher::for_source(&source);
    Ok((source, publisher))
}
