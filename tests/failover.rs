//! Automatic failover with real processes on loopback: a witness, two `tandem up` nodes and
//! the acknowledged-write checker (`tools/ackcheck.py`, libnbd) writing through whichever
//! node serves. Every test ends by proving no acknowledged write was lost.

mod common;

use std::time::{Duration, Instant};

use common::failover::{replication_port, witnessed_pair, Checker, LinkCut};
use common::pair::{qemu_io, qemu_io_ok, Pair, M};

use common::failover::NET;

fn uris(p: &Pair) -> Vec<String> {
    vec![p.uri("alpha"), p.uri("beta")]
}

fn is_primary(s: &serde_json::Value) -> bool {
    s["role"] == "primary"
}

/// Wait until `node` is primary; returns how long it took.
fn wait_primary(p: &Pair, node: &str, secs: u64) -> Duration {
    let t = Instant::now();
    p.wait_for(node, "promotion", secs, is_primary);
    t.elapsed()
}

#[test]
fn kill9_of_the_primary_under_load_fails_over_and_loses_nothing() {
    let (mut p, _w) = witnessed_pair(32 * M);
    let epoch_before = p.status("alpha")["epoch"].as_u64().unwrap();
    let checker = Checker::start(p.dir.path(), "kill9", &uris(&p), 2048, 16);
    std::thread::sleep(Duration::from_secs(2));
    p.kill9("alpha");
    let took = wait_primary(&p, "beta", 20);
    eprintln!("beta promoted {} ms after the kill", took.as_millis());
    let s = p.status("beta");
    assert!(s["epoch"].as_u64().unwrap() > epoch_before, "{s}");
    std::thread::sleep(Duration::from_secs(2));
    // The old primary comes back as a secondary, resyncs and ends identical.
    p.up("alpha");
    p.wait_for("alpha", "rejoined as secondary", 30, |s| {
        s["role"] == "secondary" && s["connection"] != "StandAlone"
    });
    let summary = checker.finish();
    assert!(summary["reconnects"].as_u64().unwrap() >= 1, "{summary}");
    p.wait_in_sync(60);
    let a = p.status("alpha");
    assert_eq!(a["split_brain"], false, "{a}");
    assert_eq!(a["epoch"], p.status("beta")["epoch"], "{a}");
    p.assert_identical();
    assert!(
        p.log("alpha").contains("sync handshake") && !p.log("alpha").contains("split brain"),
        "{}",
        p.log("alpha")
    );
}

#[test]
fn a_primary_stopped_longer_than_its_lease_acknowledges_nothing_after_the_takeover() {
    let (p, _w) = witnessed_pair(32 * M);
    let checker = Checker::start(p.dir.path(), "sigstop", &uris(&p), 2048, 16);
    std::thread::sleep(Duration::from_secs(2));
    let alpha = nix::unistd::Pid::from_raw(p.pid("alpha"));
    nix::sys::signal::kill(alpha, nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_primary(&p, "beta", 20);
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(alpha, nix::sys::signal::Signal::SIGCONT).unwrap();
    // The resumed old primary finds its lease gone and rejoins as a secondary.
    p.wait_for("alpha", "demoted and resynced", 30, |s| {
        s["role"] == "secondary" && s["disk"] == "UpToDate" && s["connection"] == "Connected"
    });
    std::thread::sleep(Duration::from_secs(1));
    let summary = checker.finish();
    let last_alpha = summary["last_ack_by_uri"][p.uri("alpha")].as_f64().unwrap();
    let first_beta = summary["first_ack_by_uri"][p.uri("beta")].as_f64().unwrap();
    assert!(
        last_alpha < first_beta,
        "alpha acknowledged a write at {last_alpha} after beta's first at {first_beta}: {summary}"
    );
    let log = p.log("alpha");
    assert!(
        log.contains("demoted to secondary") && !log.contains("split brain"),
        "{log}"
    );
    p.wait_in_sync(60);
    p.assert_identical();
}

#[test]
fn a_cut_replication_link_leaves_exactly_one_primary_and_heals_without_split_brain() {
    let (p, _w) = witnessed_pair(32 * M);
    let checker = Checker::start(p.dir.path(), "cut", &uris(&p), 2048, 16);
    std::thread::sleep(Duration::from_secs(1));
    let cut = LinkCut::cut(replication_port(&p, "beta"));
    // alpha fences beta through the witness and goes on; beta is refused and outdated.
    p.wait_for("beta", "outdated by the witness", 20, |s| {
        s["disk"] == "Outdated"
    });
    p.wait_for("alpha", "degraded primary", 10, |s| {
        s["failover"]["fence"]["state"] == "peer-outdated"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(is_primary(&p.status("alpha")));
    let b = p.status("beta");
    assert_eq!(b["role"], "secondary", "{b}");
    assert!(
        b["failover"]["note"]
            .as_str()
            .unwrap_or("")
            .contains("outdated"),
        "{b}"
    );
    drop(cut);
    p.wait_in_sync(60);
    let summary = checker.finish();
    eprintln!("{summary}");
    for n in ["alpha", "beta"] {
        assert_eq!(p.status(n)["split_brain"], false);
    }
    std::thread::sleep(Duration::from_millis(300));
    p.assert_identical();
}

#[test]
fn without_the_witness_io_continues_but_nobody_promotes() {
    let (mut p, mut w) = witnessed_pair(16 * M);
    w.kill9();
    // Well past the lease: the connected pair keeps acknowledging writes.
    std::thread::sleep(Duration::from_secs(3));
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x5a 0 1M", "flush"]);
    let a = p.status("alpha");
    assert!(is_primary(&a), "{a}");
    p.kill9("alpha");
    std::thread::sleep(Duration::from_secs(4));
    let b = p.status("beta");
    assert_eq!(b["role"], "secondary", "{b}");
    let note = b["failover"]["note"].as_str().unwrap_or("").to_owned();
    assert!(note.contains("witness unreachable"), "{b}");
    // The witness comes back: beta promotes (alpha's lease is long gone) with its data.
    w.restart();
    wait_primary(&p, "beta", 20);
    let out = qemu_io(&p.uri("beta"), &["read -P 0x5a 0 1M"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn twenty_switchovers_under_load_lose_nothing() {
    let (p, _w) = witnessed_pair(32 * M);
    let checker = Checker::start(p.dir.path(), "switch", &uris(&p), 2048, 16);
    std::thread::sleep(Duration::from_millis(500));
    let mut to = "beta";
    for i in 0..20 {
        let t = Instant::now();
        let out = std::process::Command::new(common::tandem_bin())
            .args(["switchover", "-c"])
            .arg(&p.config)
            .args(["--to", to])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "switchover {i} to {to}: {}{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            p.log("alpha"),
            p.log("beta")
        );
        eprintln!("switchover {i} to {to}: {} ms", t.elapsed().as_millis());
        assert!(is_primary(&p.status(to)));
        p.wait_in_sync(30);
        std::thread::sleep(Duration::from_millis(300));
        to = if to == "beta" { "alpha" } else { "beta" };
    }
    let summary = checker.finish();
    assert!(summary["reconnects"].as_u64().unwrap() >= 20, "{summary}");
    p.assert_identical();
}

#[test]
fn switchover_is_refused_unless_the_target_is_connected_and_up_to_date() {
    let (mut p, _w) = witnessed_pair(16 * M);
    let config = p.config.clone();
    let run = |to: &str| {
        std::process::Command::new(common::tandem_bin())
            .args(["switchover", "-c"])
            .arg(&config)
            .args(["-n", "alpha", "--to", to])
            .output()
            .unwrap()
    };
    let out = run("gamma");
    assert!(!out.status.success());
    p.stop("beta");
    let out = run("beta");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not connected"), "{err}");
    assert!(is_primary(&p.status("alpha")));
}

/// A fence handler whose exit code is read from a file next to it; it records each call.
fn handler_pair(code: i32) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fence-peer.sh");
    let code_file = dir.path().join("code");
    // The initial forced promotion may run before the link is up: let that one succeed.
    std::fs::write(&code_file, "4").unwrap();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$TANDEM_NODE $DRBD_RESOURCE $DRBD_PEER\" >> {d}/calls\nexit $(cat {c})\n",
            d = dir.path().display(),
            c = code_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let failover = format!(
        "[failover]\nfencing = \"handler\"\nfence_handler = \"{}\"\n",
        script.display()
    );
    let mut p = Pair::with_sections(16 * M, NET, &failover, "");
    std::mem::forget(dir);
    p.up("alpha");
    p.up("beta");
    p.ok("alpha", &["primary", "--force"]);
    p.wait_in_sync(60);
    // Keep the handler's files findable from the pair.
    std::fs::write(
        p.path("handler-dir"),
        script.parent().unwrap().to_str().unwrap(),
    )
    .unwrap();
    std::fs::write(&code_file, code.to_string()).unwrap();
    std::fs::remove_file(script.parent().unwrap().join("calls")).ok();
    p
}

fn handler_calls(p: &Pair) -> String {
    let dir = std::fs::read_to_string(p.path("handler-dir")).unwrap();
    std::fs::read_to_string(std::path::Path::new(&dir).join("calls")).unwrap_or_default()
}

fn set_handler_code(p: &Pair, code: i32) {
    let dir = std::fs::read_to_string(p.path("handler-dir")).unwrap();
    std::fs::write(std::path::Path::new(&dir).join("code"), code.to_string()).unwrap();
}

#[test]
fn fence_handler_exit_codes_decide_promotion() {
    // 3, 4, 5 (with UpToDate data) and 7 prove the old primary harmless: beta promotes.
    for code in [3, 4, 5, 7] {
        let mut p = handler_pair(code);
        p.kill9("alpha");
        wait_primary(&p, "beta", 20);
        assert!(
            handler_calls(&p).contains("beta r0 alpha"),
            "{}",
            handler_calls(&p)
        );
        qemu_io_ok(&p.uri("beta"), &["write -P 0x11 0 64k"]);
    }
    // 6: the peer is primary, so beta outdates itself and stays secondary.
    let mut p = handler_pair(6);
    p.kill9("alpha");
    p.wait_for("beta", "outdated itself", 20, |s| s["disk"] == "Outdated");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(p.status("beta")["role"], "secondary");
    // Anything else proves nothing: no promotion, status says why.
    let mut p = handler_pair(1);
    p.kill9("alpha");
    p.wait_for("beta", "handler failure reported", 20, |s| {
        s["failover"]["note"]
            .as_str()
            .unwrap_or("")
            .contains("exited with 1")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(p.status("beta")["role"], "secondary");
}

#[test]
fn fence_handler_holds_the_primarys_writes_until_the_peer_is_fenced() {
    let mut p = handler_pair(1);
    p.kill9("beta");
    // The handler fails: a write is held, not acknowledged and not failed.
    let uri = p.uri("alpha");
    let writer = std::thread::spawn(move || qemu_io(&uri, &["write -P 0x22 0 64k"]));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "a write was acknowledged without fencing"
    );
    let a = p.status("alpha");
    assert_eq!(a["failover"]["fence"]["state"], "pending", "{a}");
    // Now the handler outdates the peer (4): the held write completes.
    set_handler_code(&p, 4);
    let out = writer.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    p.wait_for("alpha", "peer outdated", 10, |s| {
        s["failover"]["fence"]["state"] == "peer-outdated"
    });

    // Exit code 6 (the peer is primary) makes the primary outdate itself and stop serving.
    let mut p = handler_pair(6);
    p.kill9("beta");
    let out = qemu_io(&p.uri("alpha"), &["write -P 0x33 0 64k"]);
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{out:?}"
    );
    p.wait_for("alpha", "demoted, outdated", 10, |s| {
        s["role"] == "secondary" && s["disk"] == "Outdated"
    });
}

#[test]
fn without_fencing_nobody_promotes_automatically() {
    let mut p = Pair::started(16 * M, "");
    p.kill9("alpha");
    p.wait_for("beta", "note about fencing none", 10, |s| {
        s["failover"]["note"]
            .as_str()
            .unwrap_or("")
            .contains("fencing = \"none\"")
    });
    assert_eq!(p.status("beta")["role"], "secondary");
    // The operator can still force it, and is told the risk.
    let out = p.ok("beta", &["primary", "--force"]);
    assert!(out.contains("forced"), "{out}");
}
