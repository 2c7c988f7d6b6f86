//! Conformance suite for ackstack adapters.
