//! Configuration of the Redis dedup store.

use std::fmt;
use std::time::Duration;

use ackstack_core::config::duration;
use serde::{Deserialize, Serialize};

/// The key prefix used when none is configured.
pub const DEFAULT_KEY_PREFIX: &str = "ackstack:dedup:";

/// Where and how the store talks to Redis.
///
/// Deserializable with serde; durations take a unit: `"250ms"`, `"2s"`.
/// `Debug` never prints the password of the URL.
///
/// ```
/// let config: ackstack_redis::RedisDedupConfig = serde_json::from_str(
///     r#"{ "url": "redis://app:secret@127.0.0.1:6379/0", "timeout": "500ms" }"#,
/// ).unwrap();
/// assert_eq!(config.key_prefix, "ackstack:dedup:");
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisDedupConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, `rediss://…` for TLS (with the default
    /// `tls` feature), or `redis+unix:///path/to/socket`.
    pub url: String,
    /// Prefix of every key the store writes. Defaults to [`DEFAULT_KEY_PREFIX`].
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// The longest a store call may take, queueing and the Redis round trip included. A Redis
    /// that is down or unreachable makes calls fail after at most this long. Default 2 s.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// The longest one attempt to (re)connect may take. Default 1 s.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// How calls are coalesced into pipelines.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// For `rediss://`: a PEM file of the CA certificate(s) to trust instead of the system's
    /// root certificates (a private CA). Unset: the system roots.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
}

/// How concurrent store calls are coalesced into Redis pipelines.
///
/// A background task takes queued calls and sends up to `max_batch` of them as one pipeline
/// (one round trip). While `max_in_flight` pipelines are on the wire, new calls wait in the queue
/// and join the next pipeline, so batches grow with load by themselves.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PipelineConfig {
    /// The most calls sent in one pipeline. Default 128.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How many pipelines may be on the wire at once. Default 1 (the fewest round trips).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How many calls may wait for a pipeline; more wait to be queued (bounded by
    /// [`RedisDedupConfig::timeout`]). Default 4096.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// How long to wait for more calls before sending a pipeline that is not full. Default 0:
    /// send at once (batching then comes only from calls that queued up during the previous
    /// round trip).
    #[serde(default, with = "duration")]
    pub linger: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_batch: default_max_batch(),
            max_in_flight: default_max_in_flight(),
            queue_capacity: default_queue_capacity(),
            linger: Duration::ZERO,
        }
    }
}

impl PipelineConfig {
    /// With at most `n` calls per pipeline.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// With at most `n` pipelines on the wire at once.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// With room for `n` calls waiting for a pipeline.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n;
        self
    }

    /// Waiting `linger` for more calls before sending a pipeline that is not full.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }
}

impl RedisDedupConfig {
    /// A config for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        RedisDedupConfig {
            url: url.into(),
            key_prefix: default_key_prefix(),
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
            pipeline: PipelineConfig::default(),
            tls_ca_file: None,
        }
    }

    /// Trusts the CA certificate(s) in this PEM file for `rediss://`, instead of the system's.
    pub fn tls_ca_file(mut self, path: impl Into<String>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Sets the key prefix.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets the per-call timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the (re)connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the pipeline settings.
    pub fn pipeline(mut self, pipeline: PipelineConfig) -> Self {
        self.pipeline = pipeline;
        self
    }

    /// The URL with its password (and any query string naming a password) replaced by `***`,
    /// safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisDedupConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupConfig")
            .field("url", &self.redacted_url())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pipeline", &self.pipeline)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// Replaces the password in a Redis URL by `***`.
///
/// `scheme://user:password@host` becomes `scheme://user:***@host`; a user part without a colon
/// (which some clients read as a password) is replaced whole; a query string that mentions a
/// password (`redis+unix:///sock?pass=…`) is replaced whole.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL we understand: print nothing of it that could be a secret.
        return "<unparsable url>".to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    match tail.find('?') {
        Some(q) if tail[q..].to_ascii_lowercase().contains("pass") => {
            out.push_str(&tail[..q]);
            out.push_str("?***");
        }
        _ => out.push_str(tail),
    }
    out
}

fn default_key_prefix() -> String {
    DEFAULT_KEY_PREFIX.to_string()
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_max_batch() -> usize {
    128
}

fn default_max_in_flight() -> usize {
    1
}

fn default_queue_capacity() -> usize {
    4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://user:pw@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:pw@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://pw@host"), "redis://***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=1&pass=pw"),
            "redis+unix:///tmp/r.sock?***"
        );
        assert_eq!(redact_url("p@ss:word"), "<unparsable url>");
        // A password containing '@' is still hidden (the last '@' ends the user info).
        let r = redact_url("redis://u:p@ss@host/1");
        assert!(!r.contains("p@ss"), "{r}");
        // The user info ends with the authority: an '@' in the query is the query's.
        assert_eq!(redact_url("redis://a:r@host?:r@"), "redis://a:***@host?:r@");
    }

    #[test]
    fn debug_hides_password_and_defaults_apply() {
        let c: RedisDedupConfig =
            serde_json::from_str(r#"{"url":"redis://u:hunter2@localhost"}"#).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert_eq!(c.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(c.pipeline.max_batch, 128);
        let c: RedisDedupConfig = serde_json::from_str(
            r#"{"url":"redis://x","timeout":"250ms","pipeline":{"max_batch":8,"linger":"1ms"}}"#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.pipeline.max_batch, 8);
        assert_eq!(c.pipeline.linger, Duration::from_millis(1));
    }
}
