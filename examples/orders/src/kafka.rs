//! Kafka: `--queue` is the topic and `<queue>-dlq` the dead-letter topic. Without
//! `KAFKA_BROKERS` (or `--kafka-brokers`), an rdkafka mock cluster is started in this process.
//! `KAFKA_PROPERTIES` carries a cluster's own settings (TLS, SASL), `KAFKA_GROUP` the group to
//! join (a group with committed offsets continues from them).
//!
//! Kafka retries in place: the record holds its partition while the runner waits out the delay
//! and runs the handler again, so a retried order shows up as one outcome with a higher attempt
//! number rather than as `retried` lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ackstack::kafka::{KafkaConfig, KafkaPublisher, KafkaSource};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::{CONNECT_TIMEOUT, CONSUMER_NAME, Fatal, Options};

/// How long CreateTopics may take before the topics are used as they are.
const CREATE_TOPICS_WAIT: Duration = Duration::from_secs(5);
/// Partitions of the work topic when this example creates it.
const PARTITIONS: i32 = 3;

/// A connected source and publisher, and the mock cluster when one was started (keep it alive
/// until the consumer is done).
pub struct Connected {
    /// The consumer-group member.
    pub source: KafkaSource,
    /// Produces to the work topic.
    pub publisher: KafkaPublisher,
    /// The in-process mock cluster, if any.
    pub mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// Creates the topics if needed, joins the group `<queue>-example-orders`, and waits (up to
/// 15 s) for a partition assignment so that the idle timer does not run during the join.
pub async fn connect(opts: &Options) -> Result<Connected, Fatal> {
    let dlq = opts.dlq();
    let (brokers, mock) = match &opts.kafka_brokers {
        Some(brokers) => {
            create_topics(brokers, &opts.kafka_properties, &opts.queue, &dlq).await?;
            (brokers.clone(), None)
        }
        None => {
            let mock = MockCluster::new(1).map_err(|e| format!("Kafka mock cluster: {e}"))?;
            mock.create_topic(&opts.queue, PARTITIONS, 1)?;
            mock.create_topic(&dlq, 1, 1)?;
            let brokers = mock.bootstrap_servers();
            println!(
                "note KAFKA_BROKERS is not set: started an in-process Kafka mock cluster at {brokers} \
                 (its topics live as long as this process)"
            );
            (brokers, Some(mock))
        }
    };
    let group = opts
        .kafka_group
        .clone()
        .unwrap_or_else(|| format!("{}-{CONSUMER_NAME}", opts.queue));
    let mut config = KafkaConfig::new(brokers, group, opts.queue.clone())
        .property("fetch.wait.max.ms", "100")
        .property("heartbeat.interval.ms", "500");
    // The cluster's own settings (TLS, SASL) win over the example's tuning.
    for (name, value) in &opts.kafka_properties {
        config = config.property(name, value);
    }
    config.session_timeout = Duration::from_secs(6);
    config.dlq_topic = Some(dlq);
    config.consumer_name = Some(CONSUMER_NAME.to_string());
    let publisher = KafkaPublisher::from_config(&config, &opts.queue)?;
    let source = KafkaSource::new(&config)?;
    let started = Instant::now();
    while source.assigned_partitions() == 0 {
        if started.elapsed() > CONNECT_TIMEOUT {
            tracing::warn!(
                "no partition assigned after {CONNECT_TIMEOUT:?}; consuming anyway \
                 (is the topic there, or do other members hold every partition?)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Connected {
        source,
        publisher,
        mock,
    })
}

/// Creates the work and dead-letter topics on a real cluster (with its `properties`: TLS,
/// SASL); existing topics are fine.
pub async fn create_topics(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    dlq: &str,
) -> Result<(), Fatal> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (name, value) in properties {
        config.set(name, value);
    }
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topics = [
        NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(dlq, 1, TopicReplication::Fixed(1)),
    ];
    let options = AdminOptions::new().operation_timeout(Some(CREATE_TOPICS_WAIT));
    let results = match tokio::time::timeout(
        CREATE_TOPICS_WAIT,
        admin.create_topics(&topics, &options),
    )
    .await
    {
        Ok(results) => results.map_err(|e| format!("Kafka at {brokers}: {e}"))?,
        Err(_) => {
            // Some clusters (librdkafka's mock among them) never answer CreateTopics; topics
            // may still be there, or be created on first use.
            tracing::warn!(
                "Kafka at {brokers}: no answer to CreateTopics within {CREATE_TOPICS_WAIT:?}; \
                 using the topics as they are"
            );
            return Ok(());
        }
    };
    for result in results {
        if let Err((name, code)) = result
            && code != RDKafkaErrorCode::TopicAlreadyExists
        {
            tracing::warn!(topic = %name, error = %code, "could not create the topic; using it as it is");
        }
    }
    Ok(())
}
