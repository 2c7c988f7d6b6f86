//! Integration and conformance tests against real brokers; see tests/.
//!
//! The README's Rust blocks are compiled here as doc tests (the struct below exists only when
//! rustdoc collects doc tests), so that the front door cannot drift from the API.

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
