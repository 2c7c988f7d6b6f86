//! Redis-backed deduplication store for ackstack.
