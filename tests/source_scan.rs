//! The runtime never unwraps: every fallible call outside its tests (tch's `f_` forms, host
//! reads, locks) is handled or returned, so bad input is an error, never a panic of ours.
//! Scans the non-test code of `runtime/src` for `.unwrap()` and `.expect(`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("runtime/src is readable") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "tests" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") && name != "tests.rs" {
            out.push(path);
        }
    }
}

/// The code of a file without its comments, and without its `#[cfg(test)]` items (a
/// `mod tests { .. }` block, or any item that follows the attribute, up to its closing brace).
fn non_test_code(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut skipping: Option<i64> = None;
    let mut pending_cfg_test = false;
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim();
        if let Some(depth) = skipping.as_mut() {
            *depth += code.matches('{').count() as i64 - code.matches('}').count() as i64;
            if *depth <= 0 && (code.contains('}') || trimmed.ends_with(';')) {
                skipping = None;
            }
            continue;
        }
        if trimmed == "#[cfg(test)]" {
            pending_cfg_test = true;
            continue;
        }
        if pending_cfg_test {
            pending_cfg_test = false;
            let depth = code.matches('{').count() as i64 - code.matches('}').count() as i64;
            if depth > 0 {
                skipping = Some(depth);
            }
            continue;
        }
        out.push((i + 1, code.to_string()));
    }
    out
}

#[test]
fn the_runtime_has_no_unwrap_or_expect_outside_its_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 40, "found the sources ({})", files.len());
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("a source file");
        for (n, code) in non_test_code(&text) {
            if code.contains(".unwrap()") || code.contains(".expect(") {
                found.push(format!("{}:{n}: {}", f.display(), code.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "unwrap/expect in the runtime:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_sees_what_it_looks_for() {
    let code = "fn a() { x.unwrap(); }\n#[cfg(test)]\nmod tests {\n    fn b() { y.unwrap(); }\n}\nfn c() { z.expect(\"no\"); } // w.unwrap()\n";
    let lines: Vec<String> = non_test_code(code).into_iter().map(|(_, c)| c).collect();
    let hits: Vec<&String> = lines
        .iter()
        .filter(|c| c.contains(".unwrap()") || c.contains(".expect("))
        .collect();
    assert_eq!(hits.len(), 2, "{lines:?}");
    assert!(hits[0].contains("x.unwrap") && hits[1].contains("z.expect"));
}
