//! No top-level module of `src/` uses another that uses it back, directly or around a circle
//! (issue 12): a static check of the source, outside `#[cfg(test)]` code. Each module can then
//! be read, tested and replaced from the leaves up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the top-level modules its non-test code names as `crate::NAME`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let tops: BTreeSet<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_owned();
            (p.is_dir() || p.extension().is_some_and(|x| x == "rs")).then_some(name)
        })
        .filter(|n| n != "main" && n != "lib")
        .collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().to_string_lossy().into_owned();
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs");
        if !tops.contains(top) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Test modules come last in a file here; what follows `#[cfg(test)] mod` is not
        // counted (a `#[cfg(test)]` on a statement is).
        let code = text
            .match_indices("#[cfg(test)]")
            .find(|(i, m)| text[i + m.len()..].trim_start().starts_with("mod "))
            .map_or(text.as_str(), |(i, _)| &text[..i]);
        for line in code.lines() {
            let line = line.split("//").next().unwrap();
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name != top && tops.contains(&name) {
                    graph
                        .entry(top.to_owned())
                        .or_default()
                        .entry(name)
                        .or_default()
                        .insert(rel.clone());
                }
            }
        }
    }
    graph
}

/// Every module `from` reaches, with the path that reaches it.
fn reachable(
    graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    from: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut stack = vec![(from.to_owned(), vec![from.to_owned()])];
    while let Some((m, path)) = stack.pop() {
        for next in graph.get(&m).into_iter().flat_map(|e| e.keys()) {
            if !seen.contains_key(next) {
                let mut p = path.clone();
                p.push(next.clone());
                seen.insert(next.clone(), p.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    seen
}

#[test]
fn no_top_level_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    // The check sees real edges: the node uses the peer protocol and the config.
    assert!(graph["node"].contains_key("repl"), "{graph:?}");
    assert!(graph["node"].contains_key("config"), "{graph:?}");
    let mut cycles = Vec::new();
    for m in graph.keys() {
        if let Some(path) = reachable(&graph, m).get(m) {
            let files: Vec<_> = path
                .windows(2)
                .map(|w| format!("{} -> {} in {:?}", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            cycles.push(format!(
                "{}\n    {}",
                path.join(" -> "),
                files.join("\n    ")
            ));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between top-level modules:\n{}",
        cycles.join("\n")
    );
}
