//! The picture of the dashboard in docs/OPERATIONS.md (`docs/dashboard.svg`, drawn by the
//! `dashboard` binary from a real run) renders: the page links it, it is well-formed SVG, every panel
//! it draws is a panel of `deploy/grafana/ackstack-dashboard.json`, and every line has a point
//! per scrape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tags of `svg` nest and close; text holds no raw `<` or `&` that is not an entity.
fn well_formed(svg: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let text = &rest[..start];
        if let Some(i) = text.find('&')
            && !["&amp;", "&lt;", "&gt;", "&quot;", "&#"]
                .iter()
                .any(|e| text[i..].starts_with(e))
        {
            return Err(format!("a raw & in text: {text:?}"));
        }
        let end = rest[start..].find('>').ok_or("a tag that never ends")? + start;
        let tag = &rest[start + 1..end];
        if tag.contains('<') {
            return Err(format!("a < inside a tag: {tag:?}"));
        }
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(o) if o == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().ok_or("an empty tag")?;
            open.push(name);
        }
        rest = &rest[end + 1..];
    }
    if !rest.trim().is_empty() {
        return Err(format!("text after the last tag: {rest:?}"));
    }
    if open.is_empty() {
        Ok(())
    } else {
        Err(format!("never closed: {open:?}"))
    }
}

/// What the text elements of a given font size say.
fn texts(svg: &str, size: &str) -> Vec<String> {
    let marker = format!("font-size=\"{size}\">");
    svg.split("<text ")
        .skip(1)
        .filter_map(|t| {
            let (_, after) = t.split_once(&marker)?;
            Some(after.split_once("</text>")?.0.to_string())
        })
        .collect()
}

#[test]
fn the_dashboard_picture_in_the_operations_guide_renders() {
    let page = std::fs::read_to_string(root().join("docs/OPERATIONS.md")).unwrap();
    assert!(
        page.contains("](dashboard.svg)"),
        "docs/OPERATIONS.md shows docs/dashboard.svg"
    );
    let svg = std::fs::read_to_string(root().join("docs/dashboard.svg")).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.contains("viewBox="), "scales in an <img>");
    well_formed(&svg).unwrap();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/ackstack-dashboard.json")).unwrap(),
    )
    .unwrap();
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    let drawn = texts(&svg, "13");
    assert!(drawn.len() >= 6, "the main panels: {drawn:?}");
    for title in &drawn {
        assert!(
            titles.contains(&title.as_str()),
            "{title:?} is not a panel of the dashboard ({titles:?})"
        );
    }

    let lines: Vec<usize> = svg
        .split("points=\"")
        .skip(1)
        .map(|p| p.split('"').next().unwrap().split_whitespace().count())
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|n| *n == lines[0] && *n > 30),
        "a point per scrape on every line: {lines:?}"
    );
}

#[test]
fn the_well_formedness_check_finds_what_it_looks_for() {
    assert!(well_formed("<svg><g><text>a</text></g></svg>").is_ok());
    assert!(well_formed("<svg><g></svg>").is_err());
    assert!(well_formed("<svg><text>a & b</text></svg>").is_err());
    assert!(well_formed("<svg><rect/>").is_err());
}
