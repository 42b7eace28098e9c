//! `tandem demo --drill`: the embedded default ends with exit 0 and a PASS verdict, and leaves
//! nothing behind.

mod common;

use std::process::Command;

#[test]
fn demo_drill_passes_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(common::tandem_bin())
        .args(["demo", "--drill", "--size", "64M"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for phase in [
        "promoted",
        "first write acknowledged",
        "resynced as secondary",
        "failback",
        "verdict: PASS",
    ] {
        assert!(text.contains(phase), "missing {phase:?}:\n{text}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn demo_stops_everything_and_cleans_up_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::tandem_bin())
        .args(["demo", "--size", "64M"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen += &line;
        seen.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    assert!(seen.contains("tandem attach"), "{seen}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let ps = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ps -eo args | grep -v grep | grep -c '{}' || true",
            tmp.path().display()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().starts_with('0'),
        "processes left: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}
