//! Reliable message consumption for RabbitMQ, SQS, Kafka and in-memory brokers.
