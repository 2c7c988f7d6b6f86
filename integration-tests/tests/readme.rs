//! The docs' JSON configuration blocks parse as the `ConsumerConfig`s they claim to be, and no
//! block of the README or docs/ escapes its test. (The Rust blocks of the README and
//! docs/MIGRATING.md are compiled as doc tests: `src/lib.rs`; the examples' TOML files are read
//! by the examples in their own tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ackstack_core::ConsumerConfig;
use integration_tests::blocks;

/// The pages of docs/ whose blocks the tests below read.
const PAGES: [(&str, &str); 9] = [
    ("docs/GUIDE.md", include_str!("../../docs/GUIDE.md")),
    (
        "docs/OPERATIONS.md",
        include_str!("../../docs/OPERATIONS.md"),
    ),
    ("docs/DLQ.md", include_str!("../../docs/DLQ.md")),
    ("docs/TESTING.md", include_str!("../../docs/TESTING.md")),
    (
        "docs/PERFORMANCE.md",
        include_str!("../../docs/PERFORMANCE.md"),
    ),
    ("docs/MIGRATING.md", include_str!("../../docs/MIGRATING.md")),
    ("docs/DESIGN.md", include_str!("../../docs/DESIGN.md")),
    ("docs/CONTRACT.md", include_str!("../../docs/CONTRACT.md")),
    (
        "docs/KAFKA_SECURITY.md",
        include_str!("../../docs/KAFKA_SECURITY.md"),
    ),
];

#[test]
fn the_configuration_blocks_of_the_docs_are_valid_consumer_configs() {
    let guide = include_str!("../../docs/GUIDE.md");
    let operations = include_str!("../../docs/OPERATIONS.md");
    let json: Vec<&str> = blocks(guide, "json")
        .into_iter()
        .chain(blocks(operations, "json"))
        .collect();
    assert_eq!(json.len(), 2, "the Configuration and kill-switch blocks");
    for block in &json {
        let config: ConsumerConfig = serde_json::from_str(block).expect("a ConsumerConfig");
        config.validate().expect("settings that work");
        // Every field it names is a real one: parsing denies unknown fields.
        let mut value: serde_json::Value = serde_json::from_str(block).unwrap();
        value["not_a_setting"] = serde_json::Value::Bool(true);
        assert!(serde_json::from_value::<ConsumerConfig>(value).is_err());
    }
    let full: ConsumerConfig = serde_json::from_str(json[0]).unwrap();
    assert_eq!((full.concurrency, full.retry.max_attempts), (64, 8));
    let switch: ConsumerConfig = serde_json::from_str(json[1]).unwrap();
    assert_eq!(switch.kill_switch.map(|k| k.activation), Some(20));
}

/// The language of each fenced block of `page` (the tag up to its first comma; empty for an
/// untagged block).
fn block_languages(page: &str) -> Vec<&str> {
    let mut open = false;
    let mut languages = Vec::new();
    for line in page.lines() {
        let Some(tag) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        if !open {
            languages.push(tag.split(',').next().unwrap_or(""));
        }
        open = !open;
    }
    languages
}

#[test]
fn no_page_of_the_docs_holds_a_block_that_escapes_its_test() {
    // Every block of code or configuration, by page and language, and the test that compiles
    // or parses it. A new block anywhere fails here until its test exists and it is listed.
    // `sh` and `text` blocks are commands and their output, not code or configuration.
    let checked: [(&str, &str, usize); 7] = [
        // Doc tests: src/lib.rs includes these pages.
        ("README.md", "rust", 2),
        ("docs/MIGRATING.md", "rust", 6),
        ("docs/KAFKA_SECURITY.md", "rust", 1),
        // the_configuration_blocks_of_the_docs_are_valid_consumer_configs, below.
        ("docs/GUIDE.md", "json", 1),
        ("docs/OPERATIONS.md", "json", 1),
        // kafka_tls.rs: the_security_guide_blocks_are_configs_librdkafka_accepts.
        ("docs/KAFKA_SECURITY.md", "json", 3),
        ("docs/KAFKA_SECURITY.md", "toml", 1),
    ];
    let readme = ("README.md", include_str!("../../README.md"));
    for (name, page) in PAGES.into_iter().chain([readme]) {
        assert!(
            !page.contains("```rust,ignore"),
            "{name}: a block is not compiled"
        );
        let languages = block_languages(page);
        let mut seen: Vec<&str> = languages.clone();
        seen.sort_unstable();
        seen.dedup();
        for language in seen {
            if language == "sh" || language == "text" {
                continue;
            }
            let found = languages.iter().filter(|l| **l == language).count();
            let listed = checked
                .iter()
                .find(|(page, l, _)| *page == name && *l == language)
                .map(|(_, _, n)| *n);
            assert_eq!(
                listed,
                Some(found),
                "{name}: {found} block(s) of {language:?}; each needs a test that compiles or \
                 parses it, and its count listed here"
            );
        }
    }
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
    // Each block is a whole program as shown: no lines hidden from the reader that rustdoc
    // would compile (GitHub and crates.io show them as written).
    let rust = blocks(readme, "rust")
        .into_iter()
        .chain(blocks(readme, "rust,no_run"));
    for block in rust {
        assert!(
            block.contains("fn main()"),
            "a README block is not a program:\n{block}"
        );
        for line in block.lines() {
            let hidden = line.trim_start() == "#" || line.trim_start().starts_with("# ");
            assert!(!hidden, "a hidden line in a README block: {line}");
        }
    }
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
    // The in-memory consumer runs as a doc test (not only compiles).
    assert_eq!(blocks(readme, "rust").len(), 1);
}

#[test]
fn every_rust_block_of_the_migration_guide_is_compiled() {
    // integration-tests/src/lib.rs includes docs/MIGRATING.md as doc tests: a before and an
    // after block per broker.
    let guide = include_str!("../../docs/MIGRATING.md");
    assert!(!guide.contains("```rust,ignore") && !guide.contains("```rust\n"));
    assert_eq!(blocks(guide, "rust,no_run").len(), 6);
}
