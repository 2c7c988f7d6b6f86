//! The broker-independent view of one received message.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

/// One message as received, independent of the broker it came from.
///
/// Cloning is cheap: the payload and header values are reference-counted [`Bytes`] and the
/// origin's names are shared.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message body, exactly as the broker returned it.
    pub payload: Bytes,
    /// Application headers: AMQP headers, SQS message attributes or Kafka headers.
    pub headers: Headers,
    /// The ordering key: Kafka record key, SQS `MessageGroupId` or AMQP routing key.
    pub key: Option<Bytes>,
    /// The broker's or publisher's message id, when there is one.
    pub message_id: Option<String>,
    /// Which delivery attempt this is, starting at 1, as counted by the broker (invariant 2 in docs/CONTRACT.md).
    pub attempt: u32,
    /// Where the message came from.
    pub origin: Origin,
    /// When the broker says the message was produced, where it says: the Kafka record
    /// timestamp, SQS `SentTimestamp`, the AMQP `timestamp` property when the publisher set it,
    /// the time JetStream stored it, a Redis stream entry id's time, the in-memory broker's
    /// publish time. A retry that travels as a copy (Kafka retry topics, Redis Streams) carries
    /// the copy's time. The queue-time histogram
    /// ([`QUEUE_SECONDS`](crate::metrics::QUEUE_SECONDS)) is measured from it.
    pub produced_at: Option<SystemTime>,
}

impl Delivery {
    /// A delivery of `payload` with no headers, key or id, attempt 1, from `origin`.
    pub fn new(payload: impl Into<Bytes>, origin: Origin) -> Self {
        Delivery {
            payload: payload.into(),
            headers: Headers::new(),
            key: None,
            message_id: None,
            attempt: 1,
            origin,
            produced_at: None,
        }
    }
}

/// Where a delivery came from: broker, queue or topic, and position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The broker kind: `"memory"`, `"rabbitmq"`, `"sqs"` or `"kafka"`.
    pub broker: &'static str,
    /// The queue or topic name.
    pub queue: Arc<str>,
    /// The Kafka partition, when there is one.
    pub partition: Option<i32>,
    /// The Kafka offset (or another broker's sequence number), when there is one.
    pub offset: Option<i64>,
    /// The name of the consumer that received the delivery.
    pub consumer: Arc<str>,
}

impl Origin {
    /// An origin on `broker`'s `queue`, read by `consumer`, with no position.
    pub fn new(
        broker: &'static str,
        queue: impl Into<Arc<str>>,
        consumer: impl Into<Arc<str>>,
    ) -> Self {
        Origin {
            broker,
            queue: queue.into(),
            partition: None,
            offset: None,
            consumer: consumer.into(),
        }
    }
}

/// Ordered message headers with byte-string values.
///
/// Names may repeat (Kafka allows it); [`Headers::get`] returns the first. Values are kept as
/// bytes so that they pass through unchanged; [`Headers::get_str`] reads one as UTF-8.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, Bytes)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// Appends a header, keeping any earlier one of the same name.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        self.entries.push((name.into(), value.into()));
    }

    /// Sets a header, replacing every earlier one of the same name.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        let name = name.into();
        self.entries.retain(|(n, _)| *n != name);
        self.entries.push((name, value.into()));
    }

    /// Builder form of [`Headers::insert`].
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.insert(name, value);
        self
    }

    /// Removes every header of this name; returns whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| n != name);
        before != self.entries.len()
    }

    /// The first value of this name.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The first value of this name, if it is valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in &self.entries {
            match std::str::from_utf8(value) {
                Ok(text) => map.entry(name, &text),
                Err(_) => map.entry(name, value),
            };
        }
        map.finish()
    }
}

impl<N: Into<String>, V: Into<Bytes>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Headers {
            entries: iter
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_append_keeps() {
        let mut h = Headers::new();
        h.append("a", "1");
        h.append("a", "2");
        assert_eq!(h.get_str("a"), Some("1"));
        h.insert("a", "3");
        assert_eq!(h.len(), 1);
        assert_eq!(h.get_str("a"), Some("3"));
        assert!(h.remove("a"));
        assert!(h.is_empty());
    }

    #[test]
    fn non_utf8_value_is_not_a_str() {
        let h = Headers::new().with("bin", Bytes::from_static(&[0xff, 0x00]));
        assert_eq!(h.get_str("bin"), None);
        assert_eq!(h.get("bin").map(|b| b.len()), Some(2));
    }
}
