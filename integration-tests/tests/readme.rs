//! The README's JSON configuration blocks parse as the `ConsumerConfig`s they claim to be, and
//! none of its blocks escapes compilation. (The README's Rust blocks are compiled as doc tests:
//! `src/lib.rs`; the examples' TOML files are read by the examples in their own tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ackstack_core::ConsumerConfig;
use integration_tests::blocks;

#[test]
fn the_readme_configuration_blocks_are_valid_consumer_configs() {
    let readme = include_str!("../../README.md");
    let json = blocks(readme, "json");
    assert!(json.len() >= 2, "the Configuration and kill-switch blocks");
    for block in &json {
        let config: ConsumerConfig = serde_json::from_str(block).expect("a ConsumerConfig");
        config.validate().expect("settings that work");
        // Every field it names is a real one: parsing denies unknown fields.
        let mut value: serde_json::Value = serde_json::from_str(block).unwrap();
        value["not_a_setting"] = serde_json::Value::Bool(true);
        assert!(serde_json::from_value::<ConsumerConfig>(value).is_err());
    }
    let full: ConsumerConfig = serde_json::from_str(json.last().unwrap()).unwrap();
    assert_eq!((full.concurrency, full.retry.max_attempts), (64, 8));
    let switch: ConsumerConfig = serde_json::from_str(json[0]).unwrap();
    assert_eq!(switch.kill_switch.map(|k| k.activation), Some(20));
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

#[test]
fn every_rust_block_of_the_migration_guide_is_compiled() {
    // integration-tests/src/lib.rs includes docs/MIGRATING.md as doc tests: a before and an
    // after block per broker.
    let guide = include_str!("../../docs/MIGRATING.md");
    assert!(!guide.contains("```rust,ignore") && !guide.contains("```rust\n"));
    assert_eq!(blocks(guide, "rust,no_run").len(), 6);
}
