//! Redis-backed deduplication store for ackstack.
//!
//! [`RedisDedupStore`] implements [`ackstack_core::dedup::DedupStore`], the protocol of
//! invariant 5 of docs/CONTRACT.md (mark done only after success):
//!
//! | call       | Redis                                                                  |
//! |------------|------------------------------------------------------------------------|
//! | `claim`    | `SET key token NX PX lease`; if the key exists, `GET` (+ `PTTL`): the done marker gives [`Claim::Done`](ackstack_core::dedup::Claim::Done), another token [`Claim::Busy`](ackstack_core::dedup::Claim::Busy) with the time its lease has left |
//! | `complete` | if `GET key == token`: `SET key "ackstack:done" PX ttl`                |
//! | `release`  | if `GET key == token`: `DEL key`                                       |
//! | `extend`   | if `GET key == token`: `PEXPIRE key lease`                             |
//!
//! Each row is one Lua script (so one atomic step and one command), run with `EVALSHA` and
//! reloaded automatically when Redis answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//! A claim goes first as the plain `SET key token NX PX lease`, which Redis runs at about
//! twice the rate of a script; only when the key exists (a duplicate, a retried claim) does
//! the claim script follow, in a second round trip.
//! Claiming again with the token that already holds the claim refreshes it and answers
//! `Acquired`, so a claim whose reply was lost can be retried safely.
//!
//! # Keys
//!
//! Every key lives under [`RedisDedupConfig::key_prefix`] (default `"ackstack:dedup:"`). Short
//! printable keys are stored as `prefix + "k:" + key`; keys longer than 100 bytes or with bytes
//! outside printable ASCII as `prefix + "h:" + hex(SHA-256(key))`. SHA-256 keeps the mapping
//! identical across processes and versions (see [`redis_key`]).
//!
//! # Pipelining
//!
//! Calls are not sent one by one: a background task takes the calls queued by all in-flight
//! deliveries and sends up to [`PipelineConfig::max_batch`] of them as one pipeline, answering
//! each caller through a oneshot channel. While a pipeline is on the wire, new calls queue up
//! and leave together in the next one, so at high concurrency a call costs well under one round
//! trip. [`RedisDedupStore::stats`] counts calls, round trips and commands.
//!
//! # Failures
//!
//! The connection is a redis-rs `ConnectionManager`: when Redis restarts, it reconnects by
//! itself and the same store keeps working; the consumer need not restart. Every call is bounded
//! by [`RedisDedupConfig::timeout`], so while Redis is down calls fail fast with a
//! [`DedupError`](ackstack_core::dedup::DedupError) (wrapping a [`RedisDedupError`]) and the
//! dedup layer applies its policy (fail-closed by default: the delivery is held in process and
//! claimed again with backoff, without calling the handler or using up an attempt). A claim
//! that timed out on our side may still have been applied: the layer claims again with the
//! same token, and the claim script answers "acquired" to the token that already holds the
//! key, so the delivery is not mistaken for a busy one.
//!
//! # TLS
//!
//! With the `tls` feature (this crate's default; the facade's `redis-tls`), `rediss://` URLs
//! connect through rustls (aws-lc-rs provider,
//! installed as the process default unless the application installed one) with the system's
//! root certificates, or only the CA in [`RedisDedupConfig::tls_ca_file`] for a private CA.
//! Without it, a `rediss://` URL is refused as a configuration error that says so.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use ackstack_core::dedup::{Claim, DedupStore};
//! use ackstack_redis::{RedisDedupConfig, RedisDedupStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let config = RedisDedupConfig::new("redis://:secret@127.0.0.1:6379/0")
//!     .key_prefix("orders:dedup:")
//!     .timeout(Duration::from_millis(500));
//! let store: Arc<dyn DedupStore> = Arc::new(RedisDedupStore::connect(config).await?);
//!
//! // What the dedup layer does around a handler:
//! match store.claim(b"order-42", "token-1", Duration::from_secs(30)).await? {
//!     Claim::Acquired => {
//!         // ... run the handler; on success:
//!         store.complete(b"order-42", "token-1", Duration::from_secs(86_400)).await?;
//!         // on failure instead: store.release(b"order-42", "token-1").await?;
//!     }
//!     Claim::Done => { /* already processed: ack without calling the handler */ }
//!     Claim::Busy { expires_in } => { /* another worker has it: claim again after `expires_in` */ }
//!     _ => { /* an answer added in a later version: claim again later */ }
//! }
//! # Ok(())
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
mod config;
pub mod connection;
mod error;
mod key;
mod pipeline;
mod store;

pub use config::{DEFAULT_KEY_PREFIX, PipelineConfig, RedisDedupConfig, redact_url};
pub use error::RedisDedupError;
pub use key::{MAX_RAW_KEY_LEN, redis_key};
pub use pipeline::DONE_MARKER;
pub use store::{RedisDedupStats, RedisDedupStore};
