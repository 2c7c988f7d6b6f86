//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` describe it.
//!
//! tokio-postgres reads only `sslmode=disable|prefer|require` and refuses the parameters
//! managed services print in their connection strings (`sslmode=verify-full`,
//! `sslrootcert=...`). [`TlsParams::take`] removes both from the connection string before
//! tokio-postgres parses the rest, and the connector is chosen from them:
//!
//! | `sslmode` | without the `tls` feature | with it |
//! |---|---|---|
//! | `disable` | plaintext | plaintext |
//! | `allow`, `prefer` (the default) | plaintext | TLS when the server offers it, certificate not checked |
//! | `require` | refused: a [`InboxError::Config`] names the feature | TLS, certificate not checked (checked as `verify-ca` when `sslrootcert` is given) |
//! | `verify-ca` | refused | TLS, the chain checked against `sslrootcert` (else the system's roots) |
//! | `verify-full` | refused | the same, and the host name too |

use std::path::PathBuf;

use crate::error::InboxError;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, InboxError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(InboxError::Config(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, \
                     verify-ca, verify-full"
                )));
            }
        })
    }

    /// Whether the connection must be encrypted.
    #[cfg(not(feature = "tls"))]
    pub(crate) fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// The mode tokio-postgres is given: it only distinguishes these three.
    pub(crate) fn for_client(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Client;
        match self {
            SslMode::Disable => Client::Disable,
            SslMode::Allow | SslMode::Prefer => Client::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Client::Require,
        }
    }
}

/// The TLS parameters of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsParams {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
}

impl TlsParams {
    /// Splits `sslmode` and `sslrootcert` off a connection string, in either of its forms
    /// (`postgres://...?sslmode=...` or `host=... sslmode=...`); the rest is returned for
    /// tokio-postgres to parse. The error never quotes the string (it may hold a password).
    pub(crate) fn take(url: &str) -> Result<(String, TlsParams), InboxError> {
        let mut params = TlsParams::default();
        let mut take = |key: &str, value: &str| -> Result<bool, InboxError> {
            match key {
                "sslmode" => params.mode = SslMode::parse(value)?,
                "sslrootcert" => params.root_cert = Some(PathBuf::from(value)),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (base, query) = url.split_once('?').unwrap_or((url, ""));
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if !take(key, &percent_decode(value)?)? {
                    kept.push(pair);
                }
            }
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        } else {
            let mut kept = Vec::new();
            for (pair, key, value) in key_values(url)? {
                if !take(key, &value)? {
                    kept.push(pair);
                }
            }
            kept.join(" ")
        };
        Ok((rest, params))
    }
}

/// `%XX` escapes of a URL query value decoded.
fn percent_decode(value: &str) -> Result<String, InboxError> {
    let bad = || InboxError::Config("a percent escape in the database URL is malformed".into());
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// The `key=value` pairs of a libpq key/value string: each as written, its key, and its
/// value unquoted (`'...'` with `\'` and `\\` escapes).
fn key_values(text: &str) -> Result<Vec<(&str, &str, String)>, InboxError> {
    let bad = || InboxError::Config("the database connection string does not parse".into());
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=').ok_or_else(bad)?;
        let key = rest[..eq].trim_end();
        let after = rest[eq + 1..].trim_start();
        let mut value = String::new();
        let end = if let Some(quoted) = after.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut closed = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next().ok_or_else(bad)?.1),
                    '\'' => {
                        closed = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            text.len() - after.len() + 1 + closed.ok_or_else(bad)?
        } else {
            let len = after.find(char::is_whitespace).unwrap_or(after.len());
            value.push_str(&after[..len]);
            text.len() - after.len() + len
        };
        let start = text.len() - rest.len();
        pairs.push((&text[start..end], key, value));
        rest = text[end..].trim_start();
    }
    Ok(pairs)
}

#[cfg(feature = "tls")]
pub(crate) use connector::connector;

#[cfg(feature = "tls")]
mod connector {
    //! A rustls connector for tokio-postgres (aws-lc-rs provider).

    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

    use super::{SslMode, TlsParams};
    use crate::error::InboxError;

    /// The connector for these parameters.
    pub(crate) fn connector(params: &TlsParams) -> Result<MakeRustls, InboxError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let check = match (params.mode, &params.root_cert) {
            (SslMode::VerifyFull, _) => Check::Full,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| InboxError::Config(format!("TLS: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Nothing => Arc::new(Unchecked(provider.signature_verification_algorithms)),
            Check::Chain | Check::Full => {
                let roots = Arc::new(roots(params)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| InboxError::Config(format!("TLS: {e}")))?;
                if check == Check::Full {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustls(tokio_rustls::TlsConnector::from(Arc::new(
            config,
        ))))
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Check {
        Nothing,
        Chain,
        Full,
    }

    /// `sslrootcert`'s certificates, else the system's.
    fn roots(params: &TlsParams) -> Result<RootCertStore, InboxError> {
        let mut roots = RootCertStore::empty();
        match &params.root_cert {
            Some(path) => {
                let unreadable = |e: &dyn std::fmt::Display| {
                    InboxError::Config(format!("sslrootcert {}: {e}", path.display()))
                };
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
                    let cert = cert.map_err(|e| unreadable(&e))?;
                    roots.add(cert).map_err(|e| unreadable(&e))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for error in &found.errors {
                    tracing::warn!(%error, "a system root certificate could not be read");
                }
                roots.add_parsable_certificates(found.certs);
            }
        }
        if roots.is_empty() {
            return Err(InboxError::Config(
                "TLS: no root certificates to check the server against (set sslrootcert)".into(),
            ));
        }
        Ok(roots)
    }

    /// `sslmode=prefer` and `require`: encrypted, any certificate accepted (libpq's meaning).
    /// The handshake's signatures are still checked.
    #[derive(Debug)]
    struct Unchecked(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for Unchecked {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    /// `sslmode=verify-ca`: the chain is checked, the host name is not.
    #[derive(Debug)]
    struct ChainOnly(Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let checked =
                self.0
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
            match checked {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }

    /// tokio-postgres's connector factory over rustls.
    #[derive(Clone)]
    pub(crate) struct MakeRustls(tokio_rustls::TlsConnector);

    impl<S> MakeTlsConnect<S> for MakeRustls
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type TlsConnect = Connect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Ok(Connect(self.0.clone(), name))
        }
    }

    /// One connection's handshake.
    pub(crate) struct Connect(tokio_rustls::TlsConnector, ServerName<'static>);

    impl<S> TlsConnect<S> for Connect
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            let Connect(connector, name) = self;
            Box::pin(async move { Ok(Stream(connector.connect(name, stream).await?)) })
        }
    }

    /// An encrypted connection (no channel binding: SCRAM runs without `-PLUS`).
    pub(crate) struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_from_urls_and_key_value_strings() {
        let (rest, params) = TlsParams::take(
            "postgres://u:p@db:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=x");
        assert_eq!(params.mode, SslMode::VerifyFull);
        assert_eq!(params.root_cert, Some(PathBuf::from("/etc/ca.pem")));

        let (rest, params) = TlsParams::take("postgres://db/app?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), params.mode),
            ("postgres://db/app", SslMode::Require)
        );

        let (rest, params) = TlsParams::take(
            "host=db user=app sslmode=verify-ca sslrootcert='/my certs/ca.pem' password='a\\'b'",
        )
        .unwrap();
        assert_eq!(rest, "host=db user=app password='a\\'b'");
        assert_eq!(params.mode, SslMode::VerifyCa);
        assert_eq!(params.root_cert, Some(PathBuf::from("/my certs/ca.pem")));

        let (rest, params) = TlsParams::take("postgres://db/app").unwrap();
        assert_eq!(
            (rest.as_str(), params.mode),
            ("postgres://db/app", SslMode::Prefer)
        );

        for bad in [
            "postgres://db/app?sslmode=always",
            "host=db sslmode=",
            "host=db sslrootcert='unterminated",
            "postgres://db/app?sslrootcert=%zz",
        ] {
            assert!(TlsParams::take(bad).is_err(), "{bad}");
        }
    }
}
