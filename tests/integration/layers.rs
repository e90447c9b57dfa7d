//! The modules depend on each other one way: as the layers in `src/lib.rs` say.

use std::collections::BTreeMap;
use std::path::Path;

/// The layer of each module, read from the `# Layers` list of `src/lib.rs`.
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let list = lib
        .split("//! # Layers")
        .nth(1)
        .expect("src/lib.rs has a # Layers section");
    let mut out = BTreeMap::new();
    for line in list.lines().skip(1).take_while(|l| l.starts_with("//!")) {
        let line = line.trim_start_matches("//!").trim();
        let Some((n, rest)) = line.split_once(". ") else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else { continue };
        let modules = rest.split(':').next().unwrap_or("");
        for m in modules.split(',') {
            out.insert(m.trim().to_string(), n);
        }
    }
    out
}

/// The top-level modules named by `crate::` paths in `text`, test code left out (test
/// modules come last in a file, after `#[cfg(test)]`).
fn uses(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]\nmod ").next().unwrap_or(text);
    let mut out: Vec<String> = code
        .match_indices("crate::")
        .map(|(at, _)| {
            code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_modules_of_earlier_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(root.join("lib.rs")).unwrap();
    let layers = layers(&lib);
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    let mut listed: Vec<&str> = layers.keys().map(String::as_str).collect();
    let mut modules = declared.clone();
    listed.sort_unstable();
    modules.sort_unstable();
    assert_eq!(listed, modules, "every module has a layer in src/lib.rs");

    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(&own) = layers.get(&top) else {
            continue; // lib.rs and the binaries
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for used in uses(&text) {
            match layers.get(&used) {
                Some(&layer) if used != top && layer >= own => wrong.push(format!(
                    "{}: {top} (layer {own}) uses {used} (layer {layer})",
                    rel.display()
                )),
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_layer_check_sees_paths_and_leaves_test_code_out() {
    let text = "use crate::packet::Batch;\nfn f() { crate::clock::unix_now(); }\n\
                #[cfg(test)]\nmod tests {\n    use crate::daemon::Daemon;\n}\n";
    assert_eq!(uses(text), ["clock", "packet"]);
    let lib = "//! # Layers\n//!\n//! 1. a, b: foundations\n//! 2. c\n\npub mod a;\n";
    let want: BTreeMap<String, usize> = [("a".into(), 1), ("b".into(), 1), ("c".into(), 2)].into();
    assert_eq!(layers(lib), want);
}
