//! The README's configuration blocks parse as the types they claim to be, and the examples'
//! TOML files hold the adapters' and the consumer's configs as the examples read them. (The
//! README's Rust blocks are compiled as doc tests: `src/lib.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ackstack_core::ConsumerConfig;

/// The body of each fenced block tagged `lang` in `markdown`.
fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    markdown
        .split(fence.as_str())
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .collect()
}

#[test]
fn the_readme_configuration_block_is_a_valid_consumer_config() {
    let readme = include_str!("../../README.md");
    let json = blocks(readme, "json");
    assert_eq!(json.len(), 1, "one JSON block, under Configuration");
    let config: ConsumerConfig = serde_json::from_str(json[0]).expect("a ConsumerConfig");
    assert_eq!(config.concurrency, 64);
    assert_eq!(config.retry.max_attempts, 8);
    // Every field it names is a real one: parsing denies unknown fields.
    let mut value: serde_json::Value = serde_json::from_str(json[0]).unwrap();
    value["not_a_setting"] = serde_json::Value::Bool(true);
    assert!(serde_json::from_value::<ConsumerConfig>(value).is_err());
}

#[test]
fn every_rust_block_of_the_readme_is_compiled() {
    // rustdoc skips blocks marked `ignore` and compiles untagged ones as Rust; neither may
    // hide an example that no longer builds.
    let readme = include_str!("../../README.md");
    assert!(
        !readme.contains("```rust,ignore"),
        "a README block is not compiled"
    );
    let mut open = false;
    for (n, line) in readme.lines().enumerate() {
        let Some(tag) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        if !open {
            assert!(
                !tag.is_empty(),
                "README line {}: a block without a language",
                n + 1
            );
        }
        open = !open;
    }
    assert!(!open, "an unclosed block");
    assert!(!blocks(readme, "rust,no_run").is_empty());
}
