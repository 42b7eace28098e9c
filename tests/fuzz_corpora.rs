//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and the inputs that once
//! crashed a target (`fuzz/regressions/<target>/`) through the same `tandem::fuzzing`
//! functions the cargo-fuzz targets call, on stable Rust. See `fuzz/README.md`.
//!
//! `cargo run --example fuzz_seeds` rewrites the seed inputs (`fuzz/corpus/<target>/seed-*`)
//! from the crate's own encoders.

use std::path::{Path, PathBuf};

use tandem::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file in `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Run `f` on every file; report every file that panics, not just the first.
fn replay(target: &str, f: fn(&[u8]), paths: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for p in paths {
        let data = std::fs::read(p).unwrap();
        if std::panic::catch_unwind(|| f(&data)).is_err() {
            failed.push(format!("{target}: {}", p.display()));
        }
    }
    failed
}

#[test]
fn corpora_and_regressions_replay_cleanly() {
    let dir = fuzz_dir();
    let mut failed = Vec::new();
    let mut total = 0;
    for &target in fuzzing::TARGETS {
        let f = fuzzing::target(target).unwrap();
        assert!(
            dir.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "no fuzz target file for {target}"
        );
        let corpus = files(&dir.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target}/ is empty or missing"
        );
        let regressions = files(&dir.join("regressions").join(target));
        total += corpus.len() + regressions.len();
        failed.extend(replay(target, f, &corpus));
        failed.extend(replay(target, f, &regressions));
    }
    assert!(
        failed.is_empty(),
        "{} of {total} inputs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn seeds_pass_their_targets() {
    let seeds = fuzzing::seeds();
    for &target in fuzzing::TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| *t == target),
            "no seeds for {target}"
        );
    }
    for (target, name, data) in &seeds {
        let f = fuzzing::target(target).unwrap();
        if std::panic::catch_unwind(|| f(data)).is_err() {
            panic!("seed {target}/{name} fails its target");
        }
    }
}
