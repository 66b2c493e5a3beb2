//! Replays the committed fuzz corpora on stable: every file of
//! `fuzz/corpus/<target>/` goes through the target body that cargo fuzz runs
//! (`damselfly::fuzzing`), so `cargo test` keeps each input that was ever
//! kept, the crashes that were fixed among them. Fuzzing itself needs
//! nightly: docs/fuzzing.md.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use damselfly::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// File names in `dir` (none for a missing one), without dot files.
fn names(dir: &Path, strip: &str) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| {
            e.expect("read_dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| !n.starts_with('.'))
        .map(|n| n.strip_suffix(strip).unwrap_or(&n).to_owned())
        .collect()
}

#[test]
fn every_corpus_input_passes_its_target() {
    let mut failed = Vec::new();
    for (name, target) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let files = names(&dir, "");
        assert!(!files.is_empty(), "{} holds no inputs", dir.display());
        for file in &files {
            let path = dir.join(file);
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
        println!("{name}: {} inputs", files.len());
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their target:\n{}",
        failed.join("\n")
    );
}

/// A target added to `damselfly::fuzzing` needs its cargo fuzz binary and
/// a seed corpus, and a corpus or binary without a target is left over.
#[test]
fn targets_binaries_and_corpora_match() {
    let targets: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        names(&fuzz_dir().join("fuzz_targets"), ".rs"),
        targets,
        "fuzz/fuzz_targets/"
    );
    assert_eq!(
        names(&fuzz_dir().join("corpus"), ""),
        targets,
        "fuzz/corpus/"
    );
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for t in &targets {
        assert!(
            manifest.contains(&format!("name = \"{t}\"\npath = \"fuzz_targets/{t}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {t}"
        );
    }
}
