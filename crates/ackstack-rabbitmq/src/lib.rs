//! RabbitMQ (lapin) adapter for ackstack.
