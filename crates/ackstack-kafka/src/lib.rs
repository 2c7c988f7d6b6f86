//! Apache Kafka (rdkafka) adapter for ackstack.
