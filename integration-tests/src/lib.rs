//! Integration and conformance tests against real brokers; see tests/.
