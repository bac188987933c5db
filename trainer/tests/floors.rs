//! The house has floors: a room (a top-level file or folder of a crate's source root) imports
//! only rooms below it, so no two rooms import each other, directly or around a circle.
//!
//! - **Both crates**: no import circle among the rooms of `src/` and of `trainer/src/`; a
//!   failure prints the circle.
//! - **The trainer**: `ARCHITECTURE.md` lists its rooms top to bottom (one entry per room, as
//!   `architecture_map.rs` reads entries: the first word of a line at column 0), and every
//!   import goes to a room listed below the importer; a failure names the import, its file and
//!   line.
//!
//! An import is a path `crate::room…` (or a `crate::{room, …}` group) in code: comment lines
//! and the `#[cfg(test)]` module at a file's end are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A room's name and its `.rs` files.
type Rooms = BTreeMap<String, Vec<PathBuf>>;

/// The rooms under `root`: each top-level `x.rs` and each folder `x/` (with `x.rs`, if any, in
/// the same room); `lib.rs` and `main.rs` are the crate itself, not rooms.
fn rooms(root: &Path) -> Rooms {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("a readable source folder") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Rooms::new();
    for e in std::fs::read_dir(root).expect("a readable source root") {
        let p = e.expect("a directory entry").path();
        let name = p
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if p.is_dir() {
            walk(&p, out.entry(name).or_default());
        } else if p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            out.entry(name).or_default().push(p);
        }
    }
    out
}

/// The rooms `file` imports, each with the first line (1-based) that imports it.
fn imports(file: &Path, rooms: &Rooms) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(file).expect("a readable source file");
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        if line.trim_start().starts_with("//") {
            continue;
        }
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first word of each item.
                Some(group) => group
                    .split(['}', ','])
                    .map(|item| item.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")],
            };
            for n in names {
                if rooms.contains_key(n) {
                    out.entry(n.to_string()).or_insert(i + 1);
                }
            }
        }
    }
    out
}

/// Room → (imported room → (file, line)) for every room under `root`.
fn graph(root: &Path) -> BTreeMap<String, BTreeMap<String, (PathBuf, usize)>> {
    let rooms = rooms(root);
    let mut g = BTreeMap::new();
    for (room, files) in &rooms {
        let mut edges: BTreeMap<String, (PathBuf, usize)> = BTreeMap::new();
        for f in files {
            for (to, line) in imports(f, &rooms) {
                if &to != room {
                    edges.entry(to).or_insert_with(|| (f.clone(), line));
                }
            }
        }
        g.insert(room.clone(), edges);
    }
    g
}

/// A circle of imports, if any: the rooms around it, the first repeated at the end.
fn circle(g: &BTreeMap<String, BTreeMap<String, (PathBuf, usize)>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeMap<String, (PathBuf, usize)>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(k) = path.iter().position(|p| p == v) {
            let mut c = path[k..].to_vec();
            c.push(v.to_string());
            return Some(c);
        }
        if done.contains(v) {
            return None;
        }
        path.push(v.to_string());
        for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(w, g, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(v.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|v| visit(v, g, &mut done, &mut Vec::new()))
}

fn workspace() -> PathBuf {
    let trainer = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    trainer
        .parent()
        .expect("the trainer is a workspace member")
        .to_path_buf()
}

#[test]
fn no_import_circle_in_either_crate() {
    for root in ["src", "trainer/src"] {
        let g = graph(&workspace().join(root));
        assert!(g.len() > 10, "{root}: only {} rooms found", g.len());
        if let Some(c) = circle(&g) {
            panic!("{root}/: an import circle: {}", c.join(" → "));
        }
    }
}

#[test]
fn each_trainer_room_imports_only_rooms_listed_below_it() {
    let ws = workspace();
    let map = std::fs::read_to_string(ws.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = map
        .find("## The trainer (`trainer/src/`)")
        .expect("the trainer's section");
    let section = &map[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |k| k + 3);
    // The rooms in the map's order, top to bottom: the first word of each line at column 0.
    let mut order: Vec<String> = Vec::new();
    for line in section[..end].lines() {
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        let room = first.trim_end_matches('/').trim_end_matches(".rs");
        if !room.is_empty() && !order.iter().any(|r| r == room) {
            order.push(room.to_string());
        }
    }
    let g = graph(&ws.join("trainer/src"));
    let pos = |r: &str| order.iter().position(|o| o == r);
    let mut wrong = Vec::new();
    for (room, edges) in &g {
        let Some(here) = pos(room) else {
            wrong.push(format!(
                "room `{room}` is not an entry of the trainer's map"
            ));
            continue;
        };
        for (to, (file, line)) in edges {
            if pos(to).is_none_or(|there| there <= here) {
                wrong.push(format!(
                    "{}:{line}: `{room}` imports `{to}`, which the map lists above it",
                    file.strip_prefix(&ws).unwrap_or(file).display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that go up a floor:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_circle_is_found_and_printed() {
    // The checker itself: a → b → c → a is a circle, a → b, a → c, b → c is not.
    let e = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeMap<String, (PathBuf, usize)>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string())
                .or_default()
                .insert(b.to_string(), (PathBuf::new(), 1));
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let c = circle(&e(&[("a", "b"), ("b", "c"), ("c", "a")])).expect("a circle");
    assert_eq!(c.first(), c.last());
    assert_eq!(c.len(), 4);
    assert!(circle(&e(&[("a", "b"), ("a", "c"), ("b", "c")])).is_none());
}
