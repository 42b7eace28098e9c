//! Rewrite the fuzz seed inputs (`fuzz/corpus/<target>/seed-<name>`) from the crate's own
//! encoders, replacing older seed files: `cargo run --example fuzz_seeds`.

use std::path::Path;

use tandem::fuzzing;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for &target in fuzzing::TARGETS {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let mut n = 0;
    for (target, name, data) in fuzzing::seeds() {
        std::fs::write(dir.join(target).join(format!("seed-{name}")), data).unwrap();
        n += 1;
    }
    println!("wrote {n} seed files under {}", dir.display());
}
