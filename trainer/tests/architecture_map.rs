//! `ARCHITECTURE.md` is the one map of the code: every `.rs` file under the theory crate's
//! `src/` and the trainer's `trainer/src/` must be named in it, so that a file added without a
//! place in the map fails here, naming it.
//!
//! The rule, per source root `R` (`src` and `trainer/src`, relative to the workspace):
//!
//! 1. **The crate's section** is the text from the `## ` heading that contains `` (`R/`) ``
//!    (e.g. ``## The trainer (`trainer/src/`)``) to the next `## ` heading.
//! 2. **Entries**: in that section, a line that begins at column 0 starts an entry; the lines
//!    below it that begin with whitespace belong to it (the indented continuation lines of a
//!    map's code block). An entry whose first word ends in `/` (`fused/`, `data/`,
//!    `data/parquet_file/`) is the entry of that folder; any other entry (a file's
//!    line, a line of prose) belongs to the crate's root.
//! 3. **A file is on the map** when, for its path `P` relative to `R` (`lora.rs`,
//!    `fused/gemm.rs`, `data/parquet_file/thrift.rs`) and some folder `D` above it (the root
//!    included), an entry of `D` names the rest of `P` below `D` (`gemm.rs` in the `fused/`
//!    entry, `parquet_file/thrift.rs` in the `data/` entry, `fused/gemm.rs` in any root
//!    line) as a whole word: the character before it is not a letter, digit, `_`, `.`, `-` or
//!    `/`, and the one after it is not a letter, digit or `_`.
//!
//! So `lm_head.rs` in the `fused/` entry maps `fused/lm_head.rs` and not the root's
//! `lm_head.rs`, which needs a root line of its own, and the two crates' `main.rs` are told
//! apart by their sections.

use std::path::{Path, PathBuf};

/// The `.rs` files under `dir`, as paths relative to `dir` with `/` separators, sorted.
fn rust_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("under the root");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The section of `map` whose `## ` heading contains `` (`root/`) ``.
fn section<'a>(map: &'a str, root: &str) -> &'a str {
    let marker = format!("(`{root}/`)");
    let mut start = None;
    let mut offset = 0;
    for line in map.split_inclusive('\n') {
        if line.starts_with("## ") {
            if let Some(s) = start {
                return &map[s..offset];
            }
            if line.contains(&marker) {
                start = Some(offset);
            }
        }
        offset += line.len();
    }
    match start {
        Some(s) => &map[s..],
        None => panic!("ARCHITECTURE.md has no `## ` heading containing {marker}"),
    }
}

/// The section's entries as (folder, text): the folder is `""` for the root, else the first
/// word's path without its trailing `/` (`fused`, `data/parquet_file`).
fn entries(section: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in section.lines() {
        let indented = line.starts_with(char::is_whitespace);
        match out.last_mut() {
            Some((_, text)) if indented => {
                text.push('\n');
                text.push_str(line);
            }
            _ => {
                let first = line
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches(|c| c == '`' || c == ',' || c == ';');
                let folder = if first.ends_with('/') && first.len() > 1 {
                    first.trim_end_matches('/').to_string()
                } else {
                    String::new()
                };
                out.push((folder, line.to_string()));
            }
        }
    }
    out
}

/// Whether `word` occurs in `text` with the boundaries of the module doc's rule 3.
fn names(text: &str, word: &str) -> bool {
    let before_ok = |c: char| !(c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    let after_ok = |c: char| !(c.is_alphanumeric() || c == '_');
    text.match_indices(word).any(|(i, _)| {
        text[..i].chars().next_back().is_none_or(before_ok)
            && text[i + word.len()..].chars().next().is_none_or(after_ok)
    })
}

/// Whether the file at `rel` (relative to the crate's source root) is on the section's map.
fn mapped(entries: &[(String, String)], rel: &str) -> bool {
    // The folders above the file, the root ("") first: for `a/b/c.rs`, "", "a", "a/b".
    let mut folders = vec![String::new()];
    let parts: Vec<&str> = rel.split('/').collect();
    for k in 1..parts.len() {
        folders.push(parts[..k].join("/"));
    }
    folders.iter().any(|d| {
        let rest = if d.is_empty() {
            rel
        } else {
            &rel[d.len() + 1..]
        };
        entries
            .iter()
            .any(|(folder, text)| folder == d && names(text, rest))
    })
}

#[test]
fn every_source_file_is_on_the_architecture_map() {
    let trainer = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let workspace = trainer.parent().expect("the trainer is a workspace member");
    let map_path = workspace.join("ARCHITECTURE.md");
    let map = std::fs::read_to_string(&map_path)
        .unwrap_or_else(|e| panic!("{}: {e}", map_path.display()));
    let mut missing = Vec::new();
    let mut counted = 0;
    for root in ["src", "trainer/src"] {
        let files = rust_files(&workspace.join(root));
        assert!(!files.is_empty(), "no .rs files under {root}/");
        let entries = entries(section(&map, root));
        for rel in files {
            counted += 1;
            if !mapped(&entries, &rel) {
                missing.push(format!("{root}/{rel}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {counted} source files are missing from ARCHITECTURE.md (name each in its \
         crate's map, in its folder's entry or by its path; rule in trainer/tests/architecture_map.rs):\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}

#[test]
fn the_rule_tells_folders_and_roots_apart() {
    let section = "## The trainer (`trainer/src/`)\n\
                   ```text\n\
                   lm_head.rs         the plain head\n\
                   fused/             kernels: gemm.rs,\n\
                   \x20                  lm_head.rs\n\
                   data/              parquet_file/thrift.rs\n\
                   ```\n\
                   Prose naming `train/optim/adamw.rs` and `xgemm.rs`.\n";
    let e = entries(section);
    assert!(mapped(&e, "lm_head.rs"));
    assert!(mapped(&e, "fused/gemm.rs"));
    assert!(mapped(&e, "fused/lm_head.rs"));
    assert!(mapped(&e, "data/parquet_file/thrift.rs"));
    assert!(mapped(&e, "train/optim/adamw.rs"));
    // Named only inside another folder's entry, or inside a longer word: not on the map.
    assert!(!mapped(&e, "gemm.rs"));
    assert!(!mapped(&e, "fused/thrift.rs"));
    assert!(!mapped(&e, "adamw.rs"));
    assert!(!mapped(&e, "fused/data.rs"));
    let map = format!("# Map\n## The theory crate (`src/`)\nmain.rs x\n{section}");
    assert!(section_has(&map, "src", "main.rs"));
    assert!(!section_has(&map, "trainer/src", "main.rs"));
}

/// Whether `rel` is on the map of root `root` in `map`.
fn section_has(map: &str, root: &str, rel: &str) -> bool {
    mapped(&entries(section(map, root)), rel)
}
