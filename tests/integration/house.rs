//! The layout's rule, checked: no import circle between the files of `src/` (ARCHITECTURE.md,
//! "Code map": each part depends only on parts below it).

use std::collections::{BTreeMap, BTreeSet};

/// Module -> the modules it names (`crate::name`), from the source, test modules left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "rs") || name == "lib" || name == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests may reach anywhere: only the code above `#[cfg(test)]` counts.
        // Comments (doc links included) are not imports.
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut deps = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let dep: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !dep.is_empty() && dep != name {
                deps.insert(dep);
            }
        }
        graph.insert(name, deps);
    }
    graph
}

/// A circle through `start`, if any (depth-first).
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
    for node in graph.keys() {
        if let Some(c) = visit(graph, node, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_import_circle_between_the_files_of_src() {
    let graph = imports();
    assert!(graph.len() > 20, "{graph:?}");
    // The ground floor stays the ground floor: the wire model and the clock import nothing
    // of ours but the clock; the store only those.
    assert!(graph["clock"].is_empty(), "{:?}", graph["clock"]);
    let allowed = |m: &str, ok: &[&str]| {
        let extra: Vec<&String> = graph[m]
            .iter()
            .filter(|d| !ok.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "{m} imports {extra:?}");
    };
    allowed("wire", &["clock"]);
    allowed("store", &["clock", "wire"]);
    if let Some(c) = circle(&graph) {
        panic!("import circle: {}", c.join(" -> "));
    }
    // The check itself finds a circle when there is one.
    let mut g = graph.clone();
    g.get_mut("clock").unwrap().insert("store".into());
    assert!(circle(&g).is_some());
}
