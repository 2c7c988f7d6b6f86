//! One rule for durations in every config source (JSON, TOML, environment overrides through
//! figment, as the examples load them): a unit is required, and a bare number is refused with
//! an error that names the key and shows the fix.
// figment's own API (Jail's closures, extract) returns its large error by value.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use std::time::Duration;

use ackstack_core::ConsumerConfig;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// The examples' settings, reduced to the consumer section.
#[derive(Debug, Deserialize)]
struct Settings {
    #[serde(default)]
    consumer: ConsumerConfig,
}

fn load(toml: &str) -> Result<Settings, figment::Error> {
    Figment::new()
        .merge(Toml::string(toml))
        .merge(Env::prefixed("APP_").split("__"))
        .extract()
}

#[test]
fn json_refuses_a_bare_number() {
    let ok: ConsumerConfig = serde_json::from_str(r#"{"shutdown_deadline": "30s"}"#).unwrap();
    assert_eq!(ok.shutdown_deadline, Duration::from_secs(30));
    for bare in [
        r#"{"shutdown_deadline": 30}"#,
        r#"{"shutdown_deadline": "30"}"#,
    ] {
        let why = serde_json::from_str::<ConsumerConfig>(bare)
            .unwrap_err()
            .to_string();
        assert!(
            why.contains(r#"write "30s" for seconds or "30ms""#),
            "{why}"
        );
    }
}

#[test]
fn toml_refuses_a_bare_number_and_names_the_key() {
    // In a jail: the environment test's variables are not seen here.
    figment::Jail::expect_with(|_| {
        let ok = load("[consumer.retry]\nbase = \"250ms\"\n").unwrap();
        assert_eq!(ok.consumer.retry.backoff.base, Duration::from_millis(250));
        let why = load("[consumer.retry]\nbase = 250\n")
            .unwrap_err()
            .to_string();
        assert!(why.contains("consumer.retry.base"), "{why}");
        assert!(why.contains(r#""250ms""#), "{why}");
        Ok(())
    });
}

#[test]
fn an_environment_override_without_a_unit_is_refused_and_names_the_key() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("APP_CONSUMER__SHUTDOWN_DEADLINE", "30");
        let why = load("").unwrap_err().to_string();
        // figment names an environment key as written there.
        assert!(why.contains("CONSUMER.SHUTDOWN_DEADLINE"), "{why}");
        assert!(why.contains(r#""30s""#), "{why}");
        jail.set_env("APP_CONSUMER__SHUTDOWN_DEADLINE", "30s");
        let ok = load("").unwrap();
        assert_eq!(ok.consumer.shutdown_deadline, Duration::from_secs(30));
        Ok(())
    });
}
