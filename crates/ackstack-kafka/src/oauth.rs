//! SASL/OAUTHBEARER tokens that the application supplies (Amazon MSK with IAM, a company's own
//! token service).
//!
//! librdkafka asks for a token when a client starts and again before the current one expires
//! (at 80% of its lifetime). With `sasl.mechanism=OAUTHBEARER` in the properties and a
//! [`TokenProvider`] given to [`KafkaConfig::token_provider`](crate::KafkaConfig::token_provider),
//! both the consumer and the dead-letter producer (and a
//! [`KafkaPublisher::from_config`](crate::KafkaPublisher::from_config)) call it from the thread
//! that polls their librdkafka events: the consumer's poll thread, the producer's polling
//! thread (and, rarely, the thread that drops a client while a refresh is pending). Keep it
//! quick: the consumer's records and commits wait while it runs. Signing a token is quick;
//! anything slow (a call to a token service) belongs in a task of yours that refreshes a
//! cached token ahead of its expiry, which the provider then returns.
//!
//! A provider that fails or panics fails that refresh: librdkafka logs the error, reports the
//! brokers down meanwhile and asks again later. Without a provider, an OAUTHBEARER client
//! fails each refresh with an error that names `KafkaConfig::token_provider`, instead of
//! waiting for a token that never comes. (This build of librdkafka has no OIDC client of its
//! own: it is built without libcurl.)

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::client::OAuthToken;

/// The error a [`TokenProvider`] returns; librdkafka logs it and tries again later.
pub type TokenError = Box<dyn Error + Send + Sync>;

/// A SASL/OAUTHBEARER token: its value, the Kafka principal it stands for, and when it expires.
///
/// `Debug` never prints the value.
#[derive(Clone)]
pub struct BearerToken {
    value: String,
    principal: String,
    expires_at: SystemTime,
}

impl BearerToken {
    /// A token `value` for `principal` that expires at `expires_at`.
    pub fn new(
        value: impl Into<String>,
        principal: impl Into<String>,
        expires_at: SystemTime,
    ) -> Self {
        BearerToken {
            value: value.into(),
            principal: principal.into(),
            expires_at,
        }
    }

    /// The Kafka principal the token stands for.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// When the token expires.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("value", &"<redacted>")
            .field("principal", &self.principal)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Supplies SASL/OAUTHBEARER tokens (see the [module docs](self)).
///
/// `config` is the `sasl.oauthbearer.config` property, when set. Any
/// `Fn(Option<&str>) -> Result<BearerToken, TokenError>` that is `Send + Sync` is a provider.
pub trait TokenProvider: Send + Sync + 'static {
    /// A fresh token.
    fn token(&self, config: Option<&str>) -> Result<BearerToken, TokenError>;
}

impl<F> TokenProvider for F
where
    F: Fn(Option<&str>) -> Result<BearerToken, TokenError> + Send + Sync + 'static,
{
    fn token(&self, config: Option<&str>) -> Result<BearerToken, TokenError> {
        self(config)
    }
}

/// The provider a configuration carries, if any.
#[derive(Clone, Default)]
pub(crate) struct Tokens(Option<Arc<dyn TokenProvider>>);

impl Tokens {
    pub(crate) fn new(provider: impl TokenProvider) -> Self {
        Tokens(Some(Arc::new(provider)))
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The token librdkafka asked for, in its form.
    pub(crate) fn generate(&self, config: Option<&str>) -> Result<OAuthToken, Box<dyn Error>> {
        let Some(provider) = &self.0 else {
            return Err(
                "sasl.mechanism OAUTHBEARER needs a token provider (KafkaConfig::token_provider)"
                    .into(),
            );
        };
        // A panic must not take the poll thread (and with it the consumer) down.
        let asked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| provider.token(config)));
        let token = match asked {
            Ok(Ok(token)) => token,
            Ok(Err(e)) => return Err(format!("the token provider failed: {e}").into()),
            Err(_) => return Err("the token provider panicked".into()),
        };
        // librdkafka refuses other characters and then logs the whole value: refuse them here,
        // without printing it.
        let printable = |text: &str| text.bytes().all(|b| (0x20..0x7f).contains(&b));
        if !printable(&token.value) || !printable(&token.principal) {
            return Err(
                "the token provider returned a token or principal with a character \
                        outside printable ASCII"
                    .into(),
            );
        }
        let lifetime_ms = token
            .expires_at
            .duration_since(UNIX_EPOCH)
            .map_err(|_| -> Box<dyn Error> { "the token expires before 1970".into() })?
            .as_millis();
        Ok(OAuthToken {
            token: token.value,
            principal_name: token.principal,
            lifetime_ms: i64::try_from(lifetime_ms).unwrap_or(i64::MAX),
        })
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() { "Some(..)" } else { "None" })
    }
}

/// The client context of ackstack's producers: librdkafka's log through `tracing`, and tokens
/// from the configuration's provider.
#[derive(Clone, Default)]
pub(crate) struct ProducerContext {
    pub(crate) tokens: Tokens,
}

impl rdkafka::ClientContext for ProducerContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::poller::log(level, fac, log_message);
    }

    fn generate_oauth_token(&self, config: Option<&str>) -> Result<OAuthToken, Box<dyn Error>> {
        self.tokens.generate(config)
    }
}

/// A producer of ackstack's (dead letters, [`KafkaPublisher`](crate::KafkaPublisher)).
pub(crate) type Producer = rdkafka::producer::FutureProducer<ProducerContext>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_token_becomes_librdkafkas_with_its_expiry_in_milliseconds() {
        let expires = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let tokens = Tokens::new(move |config: Option<&str>| {
            assert_eq!(config, Some("region=eu-west-1"));
            Ok(BearerToken::new("t0ken", "orders", expires))
        });
        let token = tokens.generate(Some("region=eu-west-1")).unwrap();
        assert_eq!(token.token, "t0ken");
        assert_eq!(token.principal_name, "orders");
        assert_eq!(token.lifetime_ms, 1_700_000_000_123);
    }

    #[test]
    fn without_a_provider_or_with_a_failing_one_the_error_says_what_to_do() {
        let error = |tokens: &Tokens| match tokens.generate(None) {
            Ok(_) => panic!("a token"),
            Err(e) => e.to_string(),
        };
        let missing = error(&Tokens::default());
        assert!(missing.contains("KafkaConfig::token_provider"), "{missing}");
        let failing = Tokens::new(|_: Option<&str>| Err("no credentials".into()));
        assert_eq!(error(&failing), "the token provider failed: no credentials");
    }

    #[test]
    fn a_panicking_provider_or_a_token_librdkafka_would_refuse_fails_the_refresh_only() {
        let error = |tokens: &Tokens| match tokens.generate(None) {
            Ok(_) => panic!("a token"),
            Err(e) => e.to_string(),
        };
        let panicking = Tokens::new(|_: Option<&str>| -> Result<BearerToken, TokenError> {
            panic!("no credentials")
        });
        assert_eq!(error(&panicking), "the token provider panicked");
        let unprintable = Tokens::new(|_: Option<&str>| {
            Ok(BearerToken::new("s3cret\n", "orders", SystemTime::now()))
        });
        let text = error(&unprintable);
        assert!(
            text.contains("printable ASCII") && !text.contains("s3cret"),
            "{text}"
        );
    }

    #[test]
    fn debug_never_prints_the_token() {
        let token = BearerToken::new("s3cret", "orders", SystemTime::now());
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
