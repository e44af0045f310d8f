//! The layout's rules, checked (ARCHITECTURE.md, "Code map"): each part depends only on parts
//! below it. No import circle between the files of `src/`, none between its folders, and the
//! ground floor (the wire model, the clock, the store) reaches no higher.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of the crate (`edge::webhook`, `store`, ...) and its source, unit tests and
/// comments left out.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let mut p = prefix.to_vec();
            if name != "mod" {
                p.push(name);
            }
            if p == ["lib"] || p == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(p.join("::"), code);
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut out,
    );
    out
}

/// Module -> the modules it names: for `crate::a::b::c`, the longest of `a::b::c`, `a::b`,
/// `a` that is a module.
fn file_graph(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (name, code) in mods {
        let mut deps = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let path: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let target = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| mods.contains_key(m));
            if let Some(t) = target
                && t != *name
            {
                deps.insert(t);
            }
        }
        // A module declared here (`mod ingest;`) and used by its own name (`ingest::run`).
        for line in code.lines() {
            let decl = line.trim_start();
            let decl = decl
                .strip_prefix("pub(crate) ")
                .or_else(|| decl.strip_prefix("pub "))
                .unwrap_or(decl);
            let Some(child) = decl.strip_prefix("mod ").and_then(|d| d.strip_suffix(';')) else {
                continue;
            };
            let full = if name.is_empty() {
                child.to_owned()
            } else {
                format!("{name}::{child}")
            };
            let used = code.match_indices(&format!("{child}::")).any(|(i, _)| {
                let before = code[..i].chars().last();
                !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            });
            if used && mods.contains_key(&full) {
                deps.insert(full);
            }
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

/// The same graph between folders (a top-level file is its own folder).
fn folder_graph(files: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap().to_owned();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in files {
        let entry = graph.entry(top(m)).or_default();
        for d in deps {
            if top(d) != top(m) {
                entry.insert(top(d));
            }
        }
    }
    graph
}

/// A circle, if any (depth-first).
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut c = path[at..].to_vec();
            c.push(node.to_owned());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(graph, dep, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_circle_between_files_or_folders_and_the_ground_floor_stays_down() {
    let mods = modules();
    assert!(mods.len() > 25, "{:?}", mods.keys());
    let files = file_graph(&mods);
    let folders = folder_graph(&files);
    let only = |m: &str, ok: &[&str]| {
        let extra: Vec<&String> = folders[m]
            .iter()
            .filter(|d| !ok.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "{m} imports {extra:?}");
    };
    only("clock", &[]);
    only("wire", &["clock"]);
    only("store", &["clock", "wire"]);
    if let Some(c) = circle(&files) {
        panic!("import circle between files: {}", c.join(" -> "));
    }
    if let Some(c) = circle(&folders) {
        panic!("import circle between folders: {}", c.join(" -> "));
    }
    // Nothing below the top imports the command line, the bench or the demo.
    for (m, deps) in &files {
        let part = m.split("::").next().unwrap();
        if !["cli", "bench", "demo"].contains(&part) {
            for top in ["cli", "bench", "demo"] {
                assert!(!deps.contains(top), "{m} imports {top}");
            }
        }
    }
    // The check finds a circle when there is one.
    let mut g = folders.clone();
    g.get_mut("clock").unwrap().insert("service".into());
    assert!(circle(&g).is_some());
}

/// Rooms of a readable size: no file of `src/` holds more than 600 lines before its unit tests.
#[test]
fn no_source_file_is_longer_than_six_hundred_lines_tests_aside() {
    fn walk(dir: &Path, out: &mut Vec<(String, usize)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap().lines().count();
                out.push((path.display().to_string(), code));
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 25);
    let long: Vec<_> = files.iter().filter(|(_, n)| *n > 600).collect();
    assert!(long.is_empty(), "longer than 600 lines: {long:?}");
}
