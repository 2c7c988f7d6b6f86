//! Opening a Redis connection the way every ackstack crate does: `redis://` or `rediss://`
//! URLs (TLS with the `tls` feature, with the system's roots or a private CA), and a
//! [`ConnectionManager`] that reconnects by itself after Redis restarts.

use std::time::Duration;

use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How to reach Redis: the URL, an optional private CA for `rediss://`, and the bounds on
/// connecting and on each answer.
#[derive(Clone, Debug)]
pub struct ConnectionSettings<'a> {
    /// `redis://` or `rediss://` URL.
    pub url: &'a str,
    /// A PEM file with the CA that signed the server's certificate (`rediss://` only).
    pub tls_ca_file: Option<&'a str>,
    /// The bound on establishing a connection.
    pub connect_timeout: Duration,
    /// The bound on each answer (must exceed any `BLOCK` a command on it asks for).
    pub response_timeout: Duration,
}

/// A lazily connected [`ConnectionManager`] for `settings`: nothing is contacted until the
/// first command, and a dropped connection is remade on the next one. The error is a
/// sentence for a configuration error (a bad URL, an unreadable CA file, TLS asked for
/// without the `tls` feature). Must be called within a Tokio runtime.
pub fn connection_manager(settings: &ConnectionSettings<'_>) -> Result<ConnectionManager, String> {
    let client = open_client(settings)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout))
        // Few, quick reconnect attempts per wave: a call waiting on a reconnect fails within
        // the timeout, and the next call starts a new wave.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, manager_config)
        .map_err(|e| format!("cannot create connection: {e}"))
}

/// The redis-rs client for the URL, with the configured CA for `rediss://`.
fn open_client(settings: &ConnectionSettings<'_>) -> Result<Client, String> {
    let url = settings.url;
    #[cfg(feature = "tls")]
    if url.starts_with("rediss://") {
        // redis-rs builds its rustls config with the process-wide crypto provider; install
        // aws-lc-rs unless the application installed one already (then this is a no-op).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let bad_url =
        |e: redis::RedisError| format!("cannot use redis url {}: {e}", crate::redact_url(url));
    let Some(ca_file) = settings.tls_ca_file else {
        return Client::open(url).map_err(bad_url);
    };
    #[cfg(feature = "tls")]
    {
        let pem = std::fs::read(ca_file)
            .map_err(|e| format!("cannot read tls_ca_file {ca_file:?}: {e}"))?;
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        Client::build_with_tls(url, certs).map_err(bad_url)
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = bad_url;
        Err(format!(
            "tls_ca_file {ca_file:?} is set but ackstack-redis was built without the `tls` feature"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> ConnectionSettings<'_> {
        ConnectionSettings {
            url,
            tls_ca_file: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn plaintext_urls_need_no_tls_feature() {
        assert!(open_client(&settings("redis://127.0.0.1:6379")).is_ok());
    }

    /// Built without the `tls` feature (the facade's default `redis`), `rediss://` is refused
    /// when the client is made, with a sentence that names TLS, never tried in plaintext.
    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_the_tls_feature_rediss_is_refused_at_once() {
        let error = open_client(&settings("rediss://u:secret@127.0.0.1:6380")).unwrap_err();
        assert!(error.to_lowercase().contains("tls"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }
}
