//! Property tests: the adapters' config structs read arbitrary JSON without panicking, and
//! what they accept validates, prints (redacted) and derives its names without panicking.
//! Needs no broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ackstack_kafka::KafkaConfig;
use ackstack_rabbitmq::RabbitConfig;
use ackstack_redis::RedisDedupConfig;
use ackstack_sqs::SqsConfig;
use proptest::prelude::*;
use serde_json::Value;

/// Every field name of the four config structs.
const KEYS: &[&str] = &[
    "auto_offset_reset",
    "brokers",
    "buffer",
    "commit_interval",
    "commit_max_count",
    "confirm_timeout",
    "connect_timeout",
    "connection_name",
    "consumer_name",
    "consumer_tag",
    "create_queues",
    "dead_letter_queue",
    "declare_topology",
    "delay_buckets",
    "delivery_limit",
    "dlq",
    "dlq_topic",
    "endpoint",
    "group_id",
    "key_prefix",
    "linger",
    "max_attempts",
    "max_batch",
    "max_in_flight",
    "max_messages",
    "ownership_check",
    "parallel_acks",
    "pipeline",
    "poll_interval",
    "prefetch",
    "produce_timeout",
    "properties",
    "queue",
    "queue_capacity",
    "queue_expires",
    "queue_name",
    "queue_type",
    "queue_url",
    "redrive",
    "region",
    "session_timeout",
    "system_attribute_headers",
    "timeout",
    "tls_ca_file",
    "topic",
    "uri",
    "url",
    "visibility_timeout",
    "wait_time_seconds",
];

/// Strings that the fields' parsers look into: URLs with and without credentials, queue URLs,
/// durations, enum names.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(amqps?|rediss?|redis\\+unix|https?)://([a-zé:@%]{0,10}@)?[a-z0-9.:/?=#@é]{0,20}",
        "[0-9]{0,22} ?(ms|s|m|h|x)?",
        prop::sample::select(vec!["quorum", "classic", "earliest", "q.fifo", "", "-dlq"])
            .prop_map(str::to_string),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    let key = prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => any::<String>(),
    ];
    leaf.prop_recursive(3, 40, 10, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..12)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Everything a config offers besides connecting; only errors are allowed, never a panic.
fn use_all(text: &str) {
    if let Ok(c) = serde_json::from_str::<RabbitConfig>(text) {
        let _ = c.validate();
        let _ = format!("{c:?}");
        let _ = (c.dlq_name(), c.connection_name(), c.max_delay());
        let _ = (c.alone_queue_name(), c.declared_queues());
        let _ = c.bucket_for(std::time::Duration::from_secs(1));
    }
    if let Ok(c) = serde_json::from_str::<SqsConfig>(text) {
        let _ = c.validate();
        let _ = format!("{c:?}");
        let _ = (c.queue_name(), c.dead_letter_queue_name(), c.is_fifo());
    }
    if let Ok(c) = serde_json::from_str::<KafkaConfig>(text) {
        let _ = c.validate();
        let _ = format!("{c:?}");
        let _ = (c.dlq_topic(), c.consumer_name().len());
        let _ = (c.consumer_config(), c.producer_config());
    }
    if let Ok(c) = serde_json::from_str::<RedisDedupConfig>(text) {
        let _ = format!("{c:?}");
        let _ = c.redacted_url();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn adapter_configs_never_panic_on_arbitrary_json(value in json()) {
        use_all(&value.to_string());
    }

    /// Objects with the required fields present, so the optional ones and the derived
    /// names are reached.
    #[test]
    fn adapter_configs_never_panic_past_their_required_fields(
        required in prop::collection::btree_map(
            prop::sample::select(vec!["uri", "queue", "brokers", "group_id", "topic", "url", "queue_url", "queue_name"]),
            text(),
            0..8,
        ),
        extra in json(),
    ) {
        let mut object: serde_json::Map<String, Value> =
            required.into_iter().map(|(k, v)| (k.to_string(), Value::String(v))).collect();
        if let Value::Object(more) = extra {
            for (k, v) in more {
                object.entry(k).or_insert(v);
            }
        }
        use_all(&Value::Object(object).to_string());
    }

    #[test]
    fn adapter_configs_never_panic_on_arbitrary_text(text in any::<String>()) {
        use_all(&text);
    }

    #[test]
    fn url_redaction_never_panics_and_hides_the_password(
        user in "[a-z]{1,6}",
        password in "[a-zA-Z0-9é!]{1,12}",
        rest in "[a-z0-9.:/?#@é]{0,20}",
        any_url in any::<String>(),
    ) {
        let _ = ackstack_redis::redact_url(&any_url);
        // The probe is `:PASSWORD@`; a tail that spells it itself (`?:r@` with password `r`)
        // would be found after the host, where it is no password.
        prop_assume!(!rest.contains(&format!(":{password}@")));
        let url = format!("redis://{user}:{password}@host{rest}");
        let shown = ackstack_redis::redact_url(&url);
        prop_assert!(!shown.contains(&format!(":{password}@")), "{shown}");
        let rabbit = RabbitConfig::new(format!("amqp://{user}:{password}@host{rest}"), "q");
        let shown = format!("{rabbit:?}");
        prop_assert!(!shown.contains(&format!(":{password}@")), "{shown}");
    }
}
