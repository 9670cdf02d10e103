//! Citations that a contributor can follow. Comments, tests and docs cite the repository's
//! own notes (`docs/*.md#anchor`), RFCs and the providers' public sources; this test fails
//! if a citation of a document outside the repository comes back, or if a
//! `docs/<file>.md#<anchor>` cited anywhere (or a `#anchor` link inside `docs/`) names a
//! file or an anchor that does not exist.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Names of documents that are not in the repository (spelled in pieces, so that this file
/// does not cite them itself).
const OUTSIDE: [&str; 5] = [
    concat!("PROTOCOLS", ".md"),
    concat!("DESIGN", ".md"),
    concat!("STYLE", ".md"),
    concat!("../", "shared"),
    concat!("/work", "/shared"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every text file of the repository that may hold a citation (target/ and .git/ left out).
fn text_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if name != "target" && name != ".git" {
                    walk(&path, out);
                }
            } else if [
                ".rs", ".md", ".py", ".sh", ".toml", ".json", ".yml", ".yaml",
            ]
            .iter()
            .any(|ext| name.ends_with(ext))
                || path.ends_with(".ci/run")
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &mut out);
    assert!(
        out.len() > 50,
        "the walk found only {} files: wrong root?",
        out.len()
    );
    out
}

/// The anchors a markdown file defines: explicit `<a id="…">` and GitHub's heading slugs.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut rest = markdown;
    while let Some(i) = rest.find("id=\"") {
        rest = &rest[i + 4..];
        if let Some(end) = rest.find('"') {
            set.insert(rest[..end].to_string());
        }
    }
    for line in markdown.lines() {
        if let Some(heading) = line.trim_start().strip_prefix('#') {
            let text = heading.trim_start_matches('#').trim();
            let slug: String = text
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect();
            set.insert(slug);
        }
    }
    set
}

/// `(file, anchor)` for every `docs/<file>.md#<anchor>` in `text`.
fn cited_anchors(text: &str) -> Vec<(String, String)> {
    let is_path = |c: char| c.is_ascii_alphanumeric() || "_-./".contains(c);
    let is_anchor = |c: char| c.is_ascii_alphanumeric() || "_-".contains(c);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("docs/") {
        let start = from + i;
        from = start + 5;
        // `docs/` must start the path (not `foo-docs/` or a URL's `/docs/`).
        if text[..start].ends_with(|c: char| is_path(c) || c == ':') {
            continue;
        }
        let path_len = text[start..]
            .find(|c| !is_path(c))
            .unwrap_or(text.len() - start);
        let path = &text[start..start + path_len];
        let Some(path) = path.strip_suffix(".md").map(|p| format!("{p}.md")) else {
            continue;
        };
        let after = &text[start + path_len..];
        if let Some(anchor) = after.strip_prefix('#') {
            let len = anchor.find(|c| !is_anchor(c)).unwrap_or(anchor.len());
            out.push((path, anchor[..len].to_string()));
        } else {
            out.push((path, String::new()));
        }
    }
    out
}

#[test]
fn nothing_cites_a_document_outside_the_repository() {
    let mut found = Vec::new();
    for file in text_files() {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for name in OUTSIDE {
                if line.contains(name) {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "cite docs/protocols.md (or the public source) instead:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_cited_docs_anchor_exists() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in text_files() {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for (doc, anchor) in cited_anchors(&text) {
            checked += 1;
            let Ok(target) = fs::read_to_string(root().join(&doc)) else {
                broken.push(format!("{}: {doc} does not exist", file.display()));
                continue;
            };
            if !anchor.is_empty() && !anchors(&target).contains(&anchor) {
                broken.push(format!("{}: {doc} has no anchor #{anchor}", file.display()));
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} citations found: is the scan broken?"
    );
    assert!(
        broken.is_empty(),
        "broken citations:\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_link_inside_docs_points_at_an_anchor_of_its_file() {
    let mut broken = Vec::new();
    for entry in fs::read_dir(root().join("docs")).expect("docs/ exists") {
        let path = entry.expect("a readable docs/ entry").path();
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let defined = anchors(&text);
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](#") {
            rest = &rest[i + 3..];
            let anchor = &rest[..rest.find(')').unwrap_or(rest.len())];
            if !defined.contains(anchor) {
                broken.push(format!("{}: #{anchor}", path.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to missing anchors:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_scanner_finds_citations_and_rejects_wrong_ones() {
    // The checks above can fail: a made-up anchor is not among the defined ones.
    let text = concat!(
        "see docs/protocols.md#openai-errors and (docs/protocols.md#",
        "no-such-anchor)."
    );
    let cited = cited_anchors(text);
    assert_eq!(
        cited,
        [
            ("docs/protocols.md".to_string(), "openai-errors".to_string()),
            (
                "docs/protocols.md".to_string(),
                "no-such-anchor".to_string()
            ),
        ]
    );
    let defined = anchors(&fs::read_to_string(root().join("docs/protocols.md")).unwrap());
    assert!(defined.contains("openai-errors"));
    assert!(!defined.contains("no-such-anchor"));
    // A URL's /docs/ path is not a citation of this repository's docs.
    assert!(cited_anchors("https://ai.google.dev/gemini-api/docs/rate-limits.md#x").is_empty());
}
