//! The README stays what it promises: short, its quick start the code of
//! `examples/quickstart.rs` (which `cargo test` runs), its quoted failure pointing at the lines
//! of that code, and every link to a file of the repository resolving; the data-parallel step
//! of `docs/distributed.md` is lines of `examples/ddp.rs`, and the expansion shown in
//! `docs/internals.md` is lines of its snapshot.
//!
//! The quick start is kept as a copy checked here rather than included: a Markdown file
//! cannot include another, and the README must read on its own (on GitHub, on crates.io).

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The body of the first fenced block of `lang` after the heading `heading`.
fn block_after(text: &str, heading: &str, lang: &str) -> String {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let rest = &text[start..];
    let open = format!("```{lang}\n");
    let from = rest.find(&open).expect("a fenced block") + open.len();
    let len = rest[from..].find("\n```").expect("a closed block");
    rest[from..from + len].to_string()
}

/// `examples/quickstart.rs` without its tests.
fn quickstart_program() -> String {
    let src = read("examples/quickstart.rs");
    let end = src.find("#[cfg(test)]").expect("the example has its test");
    src[..end].trim_end().to_string()
}

/// 1-based number of the first line of `text` whose trimmed form starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
        + 1
}

#[test]
fn readme_is_at_most_250_lines() {
    let n = read("README.md").lines().count();
    assert!(n <= 250, "README.md has {n} lines");
}

#[test]
fn readme_quick_start_is_the_example() {
    let shown = block_after(&read("README.md"), "## Quick start", "rust");
    assert_eq!(
        shown,
        quickstart_program(),
        "README.md's quick start must be examples/quickstart.rs up to its #[cfg(test)] module"
    );
}

#[test]
fn readme_failure_points_at_the_quick_start_lines() {
    let text = block_after(&read("README.md"), "## Reading a failure", "text");
    let program = quickstart_program();
    let site = format!(
        "examples/quickstart.rs:{})",
        line_of(&program, "fn train_step(")
    );
    assert!(text.contains(&site), "expected {site} in:\n{text}");
    let check = format!("(line {})", line_of(&program, "loss.backward()"));
    assert!(text.contains(&check), "expected {check} in:\n{text}");
}

#[test]
fn distributed_step_is_lines_of_the_ddp_example() {
    let shown = block_after(
        &read("docs/distributed.md"),
        "## A data-parallel step",
        "rust",
    );
    let example = read("examples/ddp.rs");
    let mut lines = example.lines();
    for l in shown
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != "// ...")
    {
        assert!(
            lines.any(|e| e == l),
            "docs/distributed.md: {l:?} is not a line of examples/ddp.rs (after the lines before it)"
        );
    }
}

/// `shown` without its comments and elisions (`/* .. */`), line by line and trimmed, is a
/// subsequence of `source`'s trimmed lines.
fn abridged_from(shown: &str, source: &str, what: &str) {
    let mut lines = source.lines().map(str::trim);
    for l in shown.lines().map(str::trim) {
        if l.is_empty() || l.starts_with("//") || l.contains("/*") {
            continue;
        }
        assert!(
            lines.any(|e| e == l),
            "{what}: {l:?} is not a line of the source (after the lines before it)"
        );
    }
}

#[test]
fn internals_expansion_is_the_snapshot() {
    let doc = read("docs/internals.md");
    let snap = read(
        "macros/src/tests/snapshots/stepguard_macros__tests__explicit_step_with_clipping.snap",
    );
    let listing = block_after(
        &doc,
        "the function becomes (comments added, the loss's expression left out):",
        "rust",
    );
    abridged_from(&listing, &snap, "docs/internals.md's expansion");
    let log = block_after(
        &doc,
        "Inside the loss's expression, `.log()` becomes",
        "rust",
    );
    abridged_from(&log, &snap, "docs/internals.md's protected log");
}

/// Relative link targets (`](path)` or `](path#anchor)`) in a Markdown file.
fn relative_links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .map(|s| s.split('#').next().unwrap_or_default().to_string())
        .filter(|s| !s.is_empty() && !s.contains("://"))
        .collect()
}

#[test]
fn links_to_files_resolve() {
    let mut pages = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).expect("docs/") {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    assert!(pages.len() > 1, "docs/ has pages");
    for page in &pages {
        let dir = Path::new(ROOT).join(page);
        let dir = dir.parent().unwrap();
        for link in relative_links(&read(page)) {
            assert!(dir.join(&link).exists(), "{page}: broken link {link}");
        }
    }
}
