//! Every relative link and image in README.md and docs/*.md resolves to a committed file, so a
//! fresh clone shows every chart and screenshot.

use std::path::{Path, PathBuf};

/// The targets of `[text](target)` and `![alt](target)` in `md`.
fn link_targets(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            out.push(target.to_owned());
            rest = &rest[end..];
        }
    }
    out
}

fn documents() -> Vec<PathBuf> {
    let mut docs = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir("docs").expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    docs
}

#[test]
fn every_relative_link_and_image_resolves() {
    let mut broken = Vec::new();
    let mut images = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read");
        let dir = doc.parent().unwrap_or(Path::new("."));
        for target in link_targets(&text) {
            if target.is_empty()
                || target.starts_with('#')
                || target.contains("://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let file = target.split('#').next().unwrap_or("");
            if [".svg", ".png"].iter().any(|e| file.ends_with(e)) {
                images += 1;
            }
            if !dir.join(file).exists() {
                broken.push(format!("{}: {target}", doc.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to files that do not exist:\n{}",
        broken.join("\n")
    );
    assert!(
        images >= 7,
        "the docs show the charts and the operator page ({images} images)"
    );
}

#[test]
fn targets_are_found() {
    assert_eq!(
        link_targets("a ![x](img/a.svg) and [b](api.md#guard \"t\") [c](https://x)"),
        ["img/a.svg", "api.md#guard", "https://x"]
    );
}
