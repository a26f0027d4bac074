//! The crate's layering, checked from its sources: dependencies point one
//! way (messages → queues, streams, exchanges, duplicate windows → consumers
//! and idempotent consumers → broker → patterns
//! → test kit), no import cycle spans more than one folder, and nothing below
//! the broker names `Broker`.
//!
//! A module depends on another when its code (comments aside) names a path
//! into it: `crate::a::b`, `super::x`, or an item of a `use crate::{..}` group.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of each top-level module: a module may depend on modules of its
/// own layer or below, never above.
fn layer(top: &str) -> usize {
    match top {
        "envelope" | "codec" | "name" | "spare" | "supervision" | "partition" | "secret" => 0,
        "store" => 1,
        "error" | "dedup" | "queue" | "stream" | "exchange" => 2,
        "consumer" | "idempotency" | "amqp" => 3,
        "broker" => 4,
        "subscription" | "transaction" | "rpc" | "rate" | "monitor" => 5,
        "admin" | "testkit" => 6,
        "" => 7, // lib.rs
        other => panic!("module {other:?} has no layer: add it to this test"),
    }
}

type Module = Vec<String>;

fn modules(root: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<Module, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Code without comments (line comments and doc comments).
fn code(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands `prefix{a, b::{c, d}}` use-trees into full paths.
fn expand(prefix: &[String], tree: &str, out: &mut Vec<Module>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let mut path = prefix.to_vec();
        path.extend(
            tree[..open]
                .split("::")
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().to_string()),
        );
        let inner = &tree[open + 1..tree.rfind('}').unwrap()];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&path, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&path, &inner[start..], out);
    } else {
        let mut path = prefix.to_vec();
        path.extend(
            tree.split(" as ")
                .next()
                .unwrap()
                .split("::")
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().to_string()),
        );
        out.push(path);
    }
}

/// The paths a module's code names, as absolute module paths.
fn paths(module: &Module, code: &str) -> Vec<Module> {
    let mut out = Vec::new();
    // `super` is the parent module, for a file module (`a/b.rs`, module
    // `a::b`) as for a directory one (`a/b/mod.rs`, also `a::b`).
    let parent: Module = module[..module.len().saturating_sub(1)].to_vec();
    for (keyword, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code;
        while let Some(i) = rest.find(keyword) {
            let before = rest[..i].chars().last();
            rest = &rest[i + keyword.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if rest.starts_with('{') {
                let mut depth = 0;
                let end = rest
                    .char_indices()
                    .find(|&(_, c)| {
                        match c {
                            '{' => depth += 1,
                            '}' => depth -= 1,
                            _ => {}
                        }
                        depth == 0
                    })
                    .map_or(rest.len(), |(i, _)| i + 1);
                expand(&base, &rest[..end], &mut out);
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{'))
                    .unwrap_or(rest.len());
                let path = rest[..end].trim_end_matches(':');
                if path.ends_with('{') || path.contains("::{") {
                    // A use-tree: read it whole.
                    let open = rest.find('{').unwrap();
                    let mut depth = 0;
                    let close = rest[open..]
                        .char_indices()
                        .find(|&(_, c)| {
                            match c {
                                '{' => depth += 1,
                                '}' => depth -= 1,
                                _ => {}
                            }
                            depth == 0
                        })
                        .map_or(rest.len(), |(i, _)| open + i + 1);
                    expand(&base, &rest[..close], &mut out);
                } else {
                    expand(&base, path, &mut out);
                }
            }
        }
    }
    out
}

#[test]
fn dependencies_point_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&root);
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (module, file) in &modules {
        let source = std::fs::read_to_string(file).unwrap();
        let code = code(&source);
        for path in paths(module, &code) {
            // The longest prefix that is a module of this crate.
            let Some(target) = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains_key(p))
            else {
                continue;
            };
            if &target == module || target.is_empty() {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
        let top = module.first().map_or("", String::as_str);
        if layer(top) < layer("broker")
            && code.match_indices("Broker").any(|(i, _)| {
                !code[i + 6..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                    && !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            })
        {
            problems.push(format!(
                "{} names `Broker`, below the broker",
                module.join("::")
            ));
        }
    }
    // Every edge goes to the same layer or below.
    for (from, tos) in &edges {
        let from_layer = layer(from.first().map_or("", String::as_str));
        for to in tos {
            let to_layer = layer(to.first().map_or("", String::as_str));
            if to_layer > from_layer {
                problems.push(format!(
                    "{} (layer {from_layer}) depends on {} (layer {to_layer})",
                    from.join("::"),
                    to.join("::")
                ));
            }
        }
    }
    // No cycle spans more than one folder.
    for scc in strongly_connected(&modules.keys().cloned().collect::<Vec<_>>(), &edges) {
        if scc.len() < 2 {
            continue;
        }
        let folders: BTreeSet<PathBuf> = scc
            .iter()
            .map(|m| modules[m].parent().unwrap().to_path_buf())
            .collect();
        if folders.len() > 1 {
            problems.push(format!(
                "an import cycle spans folders: {}",
                scc.iter()
                    .map(|m| m.join("::"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
    // The checker sees what it should: a few known edges.
    let has = |from: &[&str], to: &[&str]| {
        let from: Module = from.iter().map(|s| s.to_string()).collect();
        let to: Module = to.iter().map(|s| s.to_string()).collect();
        edges.get(&from).is_some_and(|t| t.contains(&to))
    };
    assert!(has(&["broker", "queues"], &["queue", "actor"]));
    assert!(has(&["queue", "state"], &["envelope"]));
    assert!(has(&["rpc", "requester"], &["broker"]));
}

/// Tarjan's strongly connected components.
fn strongly_connected(
    nodes: &[Module],
    edges: &BTreeMap<Module, BTreeSet<Module>>,
) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on_stack: BTreeSet<Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit(s: &mut State<'_>, v: &Module) {
        s.index.insert(v.clone(), s.next);
        s.low.insert(v.clone(), s.next);
        s.next += 1;
        s.stack.push(v.clone());
        s.on_stack.insert(v.clone());
        for w in s.edges.get(v).cloned().unwrap_or_default() {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let low = s.low[v].min(s.low[&w]);
                s.low.insert(v.clone(), low);
            } else if s.on_stack.contains(&w) {
                let low = s.low[v].min(s.index[&w]);
                s.low.insert(v.clone(), low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(&w);
                let done = &w == v;
                scc.push(w);
                if done {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}
