//! The fuzz corpus, replayed on stable Rust: every committed input of every target in
//! `tests/fuzz/corpus` (seeds and minimized finds) and `tests/fuzz/regressions` (inputs that
//! once broke an invariant) runs through the same `whippet::fuzz` function the cargo-fuzz
//! target runs.

use std::path::Path;

fn inputs(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn every_corpus_input_keeps_every_invariant() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    for (name, target) in whippet::fuzz::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(
            corpus.len() >= 2,
            "{name}: the corpus has {} inputs",
            corpus.len()
        );
        for input in corpus
            .iter()
            .chain(&inputs(&root.join("regressions").join(name)))
        {
            target(input);
        }
        let target_file = root.join("fuzz_targets").join(format!("{name}.rs"));
        let source = std::fs::read_to_string(&target_file).unwrap();
        assert!(
            source.contains(&format!("whippet::fuzz::{name}(data)")),
            "{} must call whippet::fuzz::{name}",
            target_file.display()
        );
    }
}
