//! The real-host fault injector (`tools/nemesis/nemesis.py`) against this build: three fixed
//! seeds, 34 faults each (102 in all), one after the other, each on its own network
//! namespaces. Every run must end with exit 0 (nothing acknowledged lost, no split brain, no
//! panic, status always answering, memory bounded, the copies identical), and the three
//! together must take under 6 minutes. Needs root and `ip`/`iptables` (as CI has); without
//! them it fails and says why. A failing run keeps its directory and prints the command that
//! replays its plan.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SEEDS: [u64; 3] = [11, 12, 13];
const FAULTS_PER_SEED: u32 = 34;
const BUDGET: Duration = Duration::from_secs(360);

fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/nemesis.rs needs root: it creates network namespaces, veth pairs, a bridge and \
         iptables rules (run `cargo test --test nemesis` as root)"
    );
    for tool in ["ip", "iptables", "ss"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        assert!(
            found,
            "tests/nemesis.rs needs `{tool}` (Debian: iproute2 / iptables)"
        );
    }
    let nbd = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .expect("tests/nemesis.rs needs /usr/bin/python3");
    assert!(
        nbd.status.success(),
        "tests/nemesis.rs needs the system python's libnbd bindings (apt-get install \
         python3-libnbd): {}",
        String::from_utf8_lossy(&nbd.stderr)
    );
}

#[test]
fn nemesis_three_seeds_find_nothing() {
    require_root_and_tools();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/nemesis/nemesis.py");
    let started = Instant::now();
    let mut summaries = Vec::new();
    let mut failures = Vec::new();
    for seed in SEEDS {
        let t = Instant::now();
        let out = Command::new("/usr/bin/python3")
            .arg(&script)
            .args(["--seed", &seed.to_string()])
            .args(["--faults", &FAULTS_PER_SEED.to_string()])
            .args(["--bin", env!("CARGO_BIN_EXE_tandem")])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .expect("run nemesis.py");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let last = |what: &str| {
            text.lines()
                .rev()
                .find(|l| l.contains(what))
                .unwrap_or("(none)")
                .to_owned()
        };
        let (summary, verdict) = (last("faults: "), last("verdict: "));
        let line = format!(
            "seed {seed}: {:.1} s, exit {:?}: {summary} / {verdict}",
            t.elapsed().as_secs_f64(),
            out.status.code()
        );
        eprintln!("{line}");
        summaries.push(line.clone());
        if !out.status.success() {
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            failures.push(format!("{line}\n{}", tail.join("\n")));
        }
        // Every namespace a run made is gone afterwards.
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        for l in text.lines().filter(|l| l.contains("cluster: namespaces ")) {
            let names = l.split("cluster: namespaces ").nth(1).unwrap_or("");
            for ns in names.split(" (").next().unwrap_or("").split(", ") {
                assert!(
                    !ns.is_empty() && !list.contains(ns),
                    "seed {seed} left namespace {ns:?} behind:\n{list}"
                );
            }
        }
    }
    let took = started.elapsed();
    eprintln!(
        "nemesis: {} seeds, {} faults, {:.1} s in all",
        SEEDS.len(),
        SEEDS.len() as u32 * FAULTS_PER_SEED,
        took.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "nemesis found failures:\n{}",
        failures.join("\n\n")
    );
    assert!(
        took < BUDGET,
        "three nemesis runs took {:.1} s (budget {} s):\n{}",
        took.as_secs_f64(),
        BUDGET.as_secs(),
        summaries.join("\n")
    );
}
