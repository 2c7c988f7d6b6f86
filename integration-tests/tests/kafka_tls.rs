//! Kafka clusters that need TLS or SASL (invariant 14): with the facade's `kafka-ssl` feature
//! a consumer configured with `security.protocol` SSL or SASL_SSL is created (librdkafka was
//! built with them), its secrets are never printed, and against a plaintext broker it reports
//! the cluster unreachable instead of consuming or hanging in silence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ackstack::adapter::{Source, SourceError};
use ackstack::kafka::{KafkaConfig, KafkaSource};
use integration_tests::blocks;

mod common;

/// Receives until the source reports an error, for at most 60 s.
async fn first_error(source: &mut KafkaSource) -> SourceError {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no error reported within 60 s");
        match source.receive(1).await {
            Err(error) => return error,
            Ok(records) => assert!(records.is_empty(), "consumed over a failed handshake"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_consumer_is_created_and_reports_a_plaintext_broker_unreachable() {
    let topic = ackstack_sqs::testing::unique_name("tls");
    let (brokers, _cluster) = common::mock_cluster(&topic, 1);
    for protocol in ["SSL", "SASL_SSL"] {
        let mut config = KafkaConfig::new(brokers.clone(), format!("{topic}-g"), topic.clone())
            .property("security.protocol", protocol)
            .property("socket.timeout.ms", "2000");
        if protocol == "SASL_SSL" {
            config = config
                .property("sasl.mechanism", "SCRAM-SHA-512")
                .property("sasl.username", "orders-service")
                .property("sasl.password", "hunter2");
        }
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("orders-service"), "{printed}");
        let mut source = match KafkaSource::new(&config) {
            Ok(source) => source,
            Err(error) => panic!("{protocol}: not built with TLS/SASL? {error}"),
        };
        let error = first_error(&mut source).await;
        assert!(
            matches!(error, SourceError::Disconnected(_)),
            "{protocol}: {error:?}"
        );
        // What the operator reads (the handshake's own failure is in librdkafka's warn log).
        let text = error.to_string();
        assert!(
            text.contains("Kafka cluster unreachable") && text.contains("brokers are down"),
            "{protocol}: {text}"
        );
    }
}

#[test]
fn the_security_guide_blocks_are_configs_librdkafka_accepts() {
    let guide = include_str!("../../docs/KAFKA_SECURITY.md");
    let facade = include_str!("../../crates/ackstack/Cargo.toml");
    let toml = blocks(guide, "toml");
    assert_eq!(toml.len(), 1, "the dependency line");
    for block in toml {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let features: Vec<String> = Figment::from(Toml::string(block))
            .extract_inner("dependencies.ackstack.features")
            .expect("a Cargo.toml dependency with features");
        assert!(!features.is_empty());
        for feature in features {
            assert!(facade.contains(&format!("\n{feature} = ")), "{feature}");
        }
    }
    let json = blocks(guide, "json");
    assert_eq!(json.len(), 3, "MSK, Confluent Cloud, Aiven");
    for block in json {
        let config: KafkaConfig = serde_json::from_str(block).expect("a KafkaConfig");
        config.validate().unwrap();
        let printed = format!("{config:?}");
        for secret in ["from-secrets-manager", "API_SECRET", "API_KEY"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        let created = config
            .consumer_config()
            .create::<rdkafka::consumer::BaseConsumer>();
        if block.contains("ssl.ca.location") {
            // The certificate files are not on this machine: refused at creation, naming it.
            let error = created.err().expect("missing certificate files refused");
            assert!(error.to_string().contains("ssl"), "{error}");
        } else {
            created.unwrap_or_else(|e| panic!("{block}: {e}"));
        }
    }
}

/// MSK with IAM and other token services (invariant 14): with `sasl.mechanism=OAUTHBEARER`,
/// the consumer, its dead-letter producer and a publisher made from the same configuration
/// each ask the configuration's token provider for a token, with `sasl.oauthbearer.config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_clients_take_their_tokens_from_the_configured_provider() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    use ackstack::kafka::KafkaPublisher;
    use ackstack::kafka::oauth::{BearerToken, TokenError};

    let topic = ackstack_sqs::testing::unique_name("oauth");
    let (brokers, _cluster) = common::mock_cluster(&topic, 1);
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let provider = move |config: Option<&str>| -> Result<BearerToken, TokenError> {
        assert_eq!(config, Some("region=eu-west-1"));
        counter.fetch_add(1, Ordering::SeqCst);
        let expires = SystemTime::now() + Duration::from_secs(900);
        Ok(BearerToken::new("signed-token", "orders-service", expires))
    };
    let config = KafkaConfig::new(brokers, format!("{topic}-g"), topic.clone())
        .property("security.protocol", "SASL_PLAINTEXT")
        .property("sasl.mechanism", "OAUTHBEARER")
        .property("sasl.oauthbearer.config", "region=eu-west-1")
        .token_provider(provider);
    assert!(
        !format!("{config:?}").contains("eu-west-1"),
        "sasl.* redacted"
    );

    // The consumer and its dead-letter producer: two clients, two tokens at least.
    let mut source = KafkaSource::new(&config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while asked.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the provider was not asked by both clients"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), source.receive(1)).await;
    }
    let before = asked.load(Ordering::SeqCst);
    let _publisher = KafkaPublisher::from_config(&config, &format!("{topic}-out")).unwrap();
    while asked.load(Ordering::SeqCst) == before {
        assert!(
            Instant::now() < deadline,
            "the publisher did not ask the provider"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
