//! Dependencies point one way: every `crate::<module>` path in `src/**/*.rs` must name the
//! module itself or a layer below it, so no cycle can form between top-level modules.
use std::path::Path;

/// Top-level modules by layer (a module may use only lower layers, never a sibling).
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("crypto", 1),
    ("m365", 1),
    ("sandbox", 1),
    ("store", 1),
    ("queue", 2),
    ("webhooks", 3),
    ("config", 4),
    ("telemetry", 5),
    ("provisioning", 6),
    ("auth", 7),
    ("jobs", 7),
    ("api", 8),
    ("app", 9),
    ("cli", 10),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level modules a source text names through `crate::` (also `crate::{a, b}`).
fn imports(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|p| p.trim().split("::").next().unwrap_or(""))
                .collect()
        } else {
            vec![rest]
        };
        for n in names {
            let name: String = n
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer(&top) else {
            problems.push(format!(
                "{}: module `{top}` has no layer in LAYERS",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        for used in imports(&text) {
            if used == top {
                continue;
            }
            match layer(&used) {
                Some(l) if l < own => {}
                Some(_) => problems.push(format!(
                    "{}: `{top}` uses `crate::{used}`, which is not below it",
                    rel.display()
                )),
                None => problems.push(format!(
                    "{}: `crate::{used}` is not a known module",
                    rel.display()
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_nested_paths() {
    assert_eq!(
        imports("use crate::{api::X, store};\nlet x = crate::jobs::y();"),
        vec!["api", "store", "jobs"]
    );
}

/// The sandbox judges access with its own reading of Microsoft's rules (`sandbox/rules.rs`), never
/// with mailscope's: otherwise a rule mailscope misreads would be reproduced by the sandbox and no
/// test could catch it (`tests/api/documented_access.rs` checks both against one table).
#[test]
fn the_sandbox_never_uses_mailscopes_access_rules() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sandbox");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let mut problems = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Comments may name the modules (to say why they are not used); code may not.
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let flat: String = code.split_whitespace().collect();
        for (i, _) in flat.match_indices("domain::") {
            let rest = &flat[i + "domain::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(g) => g[..g.find('}').unwrap_or(g.len())]
                    .split(',')
                    .map(|p| p.split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or(""),
                ],
            };
            for n in names {
                if n == "access" || n == "rbac" {
                    problems.push(format!("{}: uses crate::domain::{n}", f.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
