//! TLS to PostgreSQL (feature `postgres-tls`): `sslmode` and `sslrootcert` in the URL are
//! honoured as libpq reads them, against the local server (Debian's PostgreSQL serves TLS
//! with its "snakeoil" certificate, issued to `localhost`), and a server without TLS is
//! refused with a clear error when the URL requires it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ackstack::postgres::{InboxError, PgInbox, PgInboxConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn url(host: &str, params: &str) -> String {
    format!("postgres://postgres@{host}:5432/test?{params}")
}

fn inbox(url: &str) -> PgInbox {
    PgInbox::new(url, PgInboxConfig::new("tls")).unwrap()
}

/// Whether the connection the inbox gets is encrypted, or why TLS failed (as
/// [`InboxError::Tls`] tells it).
async fn encrypted(url: &str) -> Result<bool, String> {
    let inbox = inbox(url);
    match inbox.migrate().await {
        Ok(()) => {}
        Err(InboxError::Tls(why)) => return Err(why),
        Err(other) => panic!("{other:?}"),
    }
    let client = inbox.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

/// The server's certificate file, read over a plaintext connection.
async fn server_certificate() -> String {
    let inbox = inbox(&url("127.0.0.1", "sslmode=disable"));
    let client = inbox.pool().get().await.unwrap();
    let on: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        on, "on",
        "these tests need a PostgreSQL serving TLS (ssl = on)"
    );
    client
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0)
}

/// The first certificate of the system's CA bundle: a root that did not issue the local
/// server's self-signed certificate.
fn unrelated_root_certificate() -> String {
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap();
    let end = "-----END CERTIFICATE-----";
    let first = bundle.find(end).unwrap() + end.len();
    let start = bundle.find("-----BEGIN CERTIFICATE-----").unwrap();
    format!("{}\n", &bundle[start..first])
}

#[tokio::test]
async fn sslmode_is_honoured_from_the_url() {
    assert_eq!(
        encrypted(&url("127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    assert_eq!(
        encrypted(&url("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    // libpq's default, `prefer`: encrypted when the server offers it.
    assert_eq!(encrypted(&url("127.0.0.1", "")).await, Ok(true));
}

#[tokio::test]
async fn verify_modes_check_the_certificate_against_sslrootcert() {
    let cert = server_certificate().await;
    let root = format!("sslrootcert={cert}");
    let full = format!("sslmode=verify-full&{root}");
    assert_eq!(encrypted(&url("localhost", &full)).await, Ok(true));

    // The certificate names `localhost`, not 127.0.0.1: verify-full refuses, verify-ca
    // (the chain only) accepts.
    let refused = encrypted(&url("127.0.0.1", &full)).await.unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    let ca = format!("sslmode=verify-ca&{root}");
    assert_eq!(encrypted(&url("127.0.0.1", &ca)).await, Ok(true));

    // A root that did not issue the server's certificate: refused.
    let other = std::env::temp_dir().join(format!("ackstack-other-ca-{}.pem", std::process::id()));
    std::fs::write(&other, unrelated_root_certificate()).unwrap();
    let wrong = format!("sslmode=verify-ca&sslrootcert={}", other.display());
    let unknown = encrypted(&url("localhost", &wrong)).await.unwrap_err();
    let _ = std::fs::remove_file(&other);
    assert!(unknown.contains("certificate"), "{unknown}");

    // An unreadable sslrootcert is a configuration error, before any connection.
    match PgInbox::new(
        &url(
            "localhost",
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
        PgInboxConfig::new("tls"),
    ) {
        Err(InboxError::Config(why)) => assert!(why.contains("/nonexistent/ca.pem"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_the_url_requires_it() {
    // A server that answers PostgreSQL's SSLRequest with "N" (no TLS), as one with
    // `ssl = off` does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"N").await;
                    let mut rest = [0u8; 64];
                    let _ = socket.read(&mut rest).await;
                }
            });
        }
    });
    let inbox = inbox(&format!(
        "postgres://postgres@127.0.0.1:{port}/test?sslmode=require"
    ));
    match inbox.migrate().await {
        Err(InboxError::Tls(why)) => {
            assert!(why.contains("server does not support TLS"), "{why}")
        }
        other => panic!("{other:?}"),
    }
}
