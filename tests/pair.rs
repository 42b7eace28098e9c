//! The replicated pair with real `tandem up` processes on loopback: initial sync, protocol C
//! replication under fio, resync after outages (incremental, resumable), split brain,
//! verify, corrupt metadata and garbage on the replication port.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::pair::*;

fn fio_verify(uri: &str, size: &str, extra: &[&str]) {
    let mut args = vec![
        "--name=v".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--size={size}"),
        "--iodepth=32".into(),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--do_verify=1".into(),
        // fio would leave a verify-state file in the working directory.
        "--verify_state_save=0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new("fio").args(&args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0") && !text.contains("verify:"),
        "fio: {text}"
    );
}

#[test]
fn initial_sync_replicates_fio_writes_and_copies_end_identical() {
    let mut p = Pair::started(64 * M, "");
    // Only the primary serves; the secondary's refusal names the primary.
    let refused = qemu_io(&p.uri("beta"), &["read 0 4k"]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && text.contains("the primary is alpha"),
        "{text}"
    );

    fio_verify(&p.uri("alpha"), "32M", &[]);
    p.wait_in_sync(20);
    let s = p.status("alpha");
    assert_eq!(s["role"], "primary");
    assert_eq!(s["peer"]["role"], "secondary");
    assert_eq!(s["generation"]["bitmap"], "0000000000000000");
    assert_eq!(p.stop("beta"), Some(0));
    assert_eq!(p.stop("alpha"), Some(0));
    p.assert_identical();
    // dump-md shows the clean state and the same current generation on both nodes.
    let (a, b) = (p.dump_md("alpha"), p.dump_md("beta"));
    let cur = |v: &serde_json::Value| v.to_string();
    assert!(
        cur(&a).contains("generation") || cur(&a).contains("gens"),
        "{a}"
    );
    assert_eq!(a["out_of_sync_bytes"], 0, "{a}");
    assert_eq!(b["out_of_sync_bytes"], 0, "{b}");
}

#[test]
fn secondary_outage_resyncs_only_what_was_written() {
    let mut p = Pair::started(256 * M, "");
    p.kill9("beta");
    p.wait_for("alpha", "peer lost", 10, |s| s["peer"].is_null());
    qemu_io_ok(
        &p.uri("alpha"),
        &["write -P 0x5a 10M 3M", "write -P 0x6b 100M 1M", "flush"],
    );
    let s = p.status("alpha");
    // 4 MiB written while degraded: that, not the 256 MiB device, is what must move.
    assert_eq!(s["out_of_sync_bytes"], 4 * M, "{s}");
    assert_ne!(
        s["generation"]["bitmap"], "0000000000000000",
        "a new generation was started: {s}"
    );
    p.up("beta");
    p.wait_in_sync(30);
    assert!(
        p.log("alpha").contains("bitmap-self"),
        "bitmap-based resync expected:\n{}",
        p.log("alpha")
    );
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

#[test]
fn interrupted_resync_resumes_after_either_side_is_killed() {
    // 4 MiB/s (the initial 24 MiB sync takes ~6 s): a 12 MiB resync takes ~3 s, long enough
    // to interrupt after a peer flush made part of it durable.
    let mut p = Pair::started(24 * M, "[resync]\nrate = \"4M\"\n");
    p.kill9("beta");
    p.wait_for("alpha", "peer lost", 10, |s| s["peer"].is_null());
    qemu_io_ok(
        &p.uri("alpha"),
        &["write -P 0x11 0 6M", "write -P 0x22 12M 6M"],
    );
    assert_eq!(p.status("alpha")["out_of_sync_bytes"], 12 * M);
    // Target killed after 2/3. What it acknowledged is kept only once its flush (every
    // `peer_flush_interval`, 1 s) covered it; the rest is marked again, as a crash of its
    // operating system could have lost it.
    p.up("beta");
    p.wait_for("alpha", "resync under way", 10, |s| {
        s["connection"] == "SyncSource" && s["resync"]["done_bytes"].as_u64().unwrap_or(0) >= 8 * M
    });
    p.kill9("beta");
    let left = p.wait_for("alpha", "peer lost", 10, |s| s["peer"].is_null())["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        left < 12 * M && left > 0,
        "bits clear as blocks land: {left} left"
    );
    // Source killed halfway.
    p.up("beta");
    p.wait_for("alpha", "resync under way again", 10, |s| {
        s["connection"] == "SyncSource"
    });
    std::thread::sleep(Duration::from_millis(500));
    p.kill9("alpha");
    p.up("alpha");
    p.wait_for("alpha", "resync finished", 60, |s| {
        s["connection"] == "Connected"
            && s["out_of_sync_bytes"] == 0
            && s["peer"]["disk"] == "UpToDate"
    });
    p.wait_for("beta", "target up to date", 10, |s| s["disk"] == "UpToDate");
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

#[test]
fn primary_killed_under_load_pair_chooses_a_direction_and_ends_identical() {
    let mut p = Pair::started(64 * M, "");
    let uri = p.uri("alpha");
    let load = std::thread::spawn(move || {
        Command::new("fio")
            .args([
                "--name=load",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--size=32M",
                "--iodepth=32",
                "--time_based",
                "--runtime=10",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    p.kill9("alpha");
    let _ = load.join();
    // Both restarted: the survivor stops cleanly, the crashed primary comes back first.
    assert_eq!(p.stop("beta"), Some(0));
    p.up("alpha");
    p.up("beta");
    // Both come back secondary; the survivor (beta) is the sync source for alpha's
    // activity-log extents (DRBD 9's choice for protocol C).
    p.wait_in_sync(60);
    let log = p.log("alpha");
    assert!(log.contains("crashed as primary"), "{log}");
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

#[test]
fn split_brain_is_detected_and_resolved_by_discard_my_data() {
    let mut p = Pair::started(64 * M, "");
    p.ok("alpha", &["disconnect"]);
    p.ok("beta", &["disconnect"]);
    p.ok("beta", &["primary", "--force"]);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 1M"]);
    qemu_io_ok(
        &p.uri("beta"),
        &["write -P 0xbb 1M 1M", "write -P 0xbb 20M 64k"],
    );
    p.ok("alpha", &["connect"]);
    let out = p.tandem("beta", &["connect"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "connect must report the split brain: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("split brain"),
        "{out:?}"
    );
    for n in NODES {
        let s = p.wait_for(n, "split brain reported", 10, |s| s["split_brain"] == true);
        assert_eq!(s["connection"], "StandAlone");
    }
    // Nothing was synced: each side still has its own data.
    qemu_io_ok(&p.uri("alpha"), &["read -P 0xaa 1M 1M"]);
    qemu_io_ok(&p.uri("beta"), &["read -P 0xbb 1M 1M"]);
    // The operator discards beta's changes.
    p.ok("beta", &["secondary"]);
    p.ok("beta", &["connect", "--discard-my-data"]);
    p.ok("alpha", &["connect"]);
    p.wait_in_sync(60);
    qemu_io_ok(
        &p.uri("alpha"),
        &["read -P 0xaa 1M 1M", "read -P 0 20M 64k"],
    );
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// Split brain with one primary (alpha) and the given policy: returns which node's data won.
fn split_brain_with_policy(policy: &str, beta_writes: bool) -> &'static str {
    let mut p = Pair::started(64 * M, &format!("[split_brain]\n{policy}\n"));
    p.ok("alpha", &["disconnect"]);
    p.ok("beta", &["disconnect"]);
    p.ok("beta", &["primary", "--force"]);
    qemu_io_ok(
        &p.uri("alpha"),
        &["write -P 0xaa 1M 1M", "write -P 0xaa 8M 1M"],
    );
    if beta_writes {
        qemu_io_ok(&p.uri("beta"), &["write -P 0xbb 1M 64k"]);
    } else {
        // A write is needed to make a new generation on beta; write back what is there.
        qemu_io_ok(&p.uri("beta"), &["write -P 0 30M 4k"]);
    }
    p.ok("beta", &["secondary"]);
    p.ok("alpha", &["connect"]);
    p.ok("beta", &["connect"]);
    p.wait_in_sync(60);
    let winner = if qemu_io(&p.uri("alpha"), &["read -P 0xaa 1M 64k"])
        .status
        .success()
        && !String::from_utf8_lossy(&qemu_io(&p.uri("alpha"), &["read -P 0xaa 1M 64k"]).stdout)
            .contains("failed")
    {
        "alpha"
    } else {
        "beta"
    };
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
    winner
}

#[test]
fn policy_discard_secondary_keeps_the_primary() {
    assert_eq!(
        split_brain_with_policy("after_sb_1pri = \"discard-secondary\"", true),
        "alpha"
    );
}

#[test]
fn policy_discard_node_names_the_victim() {
    assert_eq!(
        split_brain_with_policy(
            "after_sb_1pri = \"consensus\"\nafter_sb_0pri = \"discard-node-beta\"",
            true
        ),
        "alpha"
    );
}

#[test]
fn policy_discard_least_changes_keeps_the_busier_side() {
    // alpha changed 2 MiB, beta 64 KiB: beta is discarded (consensus agrees: beta is secondary).
    assert_eq!(
        split_brain_with_policy(
            "after_sb_1pri = \"consensus\"\nafter_sb_0pri = \"discard-least-changes\"",
            true
        ),
        "alpha"
    );
}

#[test]
fn overlapping_writes_then_verify_finds_nothing_and_a_planted_difference_is_found_and_repaired() {
    let mut p = Pair::started(64 * M, "");
    // A 1 MiB region at QD32: many overlapping in-flight writes.
    fio_verify(&p.uri("alpha"), "1M", &["--rw=randwrite", "--loops=20"]);
    let out = p.ok("alpha", &["verify", "--wait"]);
    assert!(out.contains(" 0 mismatched"), "{out}");
    // The peer showed VerifyTarget meanwhile, and is Connected again.
    p.wait_for("beta", "the end of the peer's verify", 10, |s| {
        s["connection"] == "Connected"
            && p.log("beta").contains("verify against this node finished")
    });
    assert!(p
        .log("beta")
        .contains("alpha's verify against this node started"));
    // Plant a difference in beta's copy behind tandem's back (bit rot).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.disk("beta"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 100], 7 * 4096 + 10).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let out = p.ok("alpha", &["verify", "--wait"]);
    assert!(out.contains(" 4096 mismatched"), "{out}");
    assert_eq!(p.status("alpha")["out_of_sync_bytes"], 4096);
    p.ok("alpha", &["disconnect"]);
    p.ok("alpha", &["connect"]);
    p.wait_in_sync(30);
    let out = p.ok("alpha", &["verify", "--wait"]);
    assert!(out.contains(" 0 mismatched"), "{out}");
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

#[test]
fn corrupt_metadata_stops_the_node_with_file_and_block() {
    let mut p = Pair::new(16 * M, "");
    let meta = p.path("beta.meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    bytes[4096 * 9 + 300] ^= 0x40; // a bitmap block
    std::fs::write(&meta, &bytes).unwrap();
    let out = Command::new(common::tandem_bin())
        .args(["up", "-c", p.config.to_str().unwrap(), "-n", "beta"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(meta.to_str().unwrap()) && err.contains("block"),
        "{err}"
    );
    // Never silently re-initialised: the corrupt byte is still there.
    assert_eq!(std::fs::read(&meta).unwrap(), bytes);
    p.up("alpha");
}

#[test]
fn garbage_and_unauthenticated_peers_on_the_replication_port_are_dropped() {
    let p = Pair::started(32 * M, "");
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    let port = cfg
        .lines()
        .filter_map(|l| l.strip_prefix("replication = \"127.0.0.1:"))
        .nth(1)
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    for junk in [
        common::pattern(4096, 9),
        b"TNDM\x01\x00\x00\x00garbage".to_vec(),
        vec![0u8; 64],
    ] {
        if let Ok(mut s) = std::net::TcpStream::connect(format!("127.0.0.1:{port}")) {
            let _ = s.write_all(&junk);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x42 0 1M", "flush"]);
    p.wait_in_sync(10);
    let s = p.status("beta");
    assert_eq!(s["connection"], "Connected");
    let mut p = p;
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// "resync finished as source: X bytes brought in sync, Y bytes sent" from a node's log.
fn resync_totals(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("resync finished as source:"))?;
    let nums: Vec<u64> = line
        .split("source:")
        .nth(1)?
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    Some((nums[0], nums[1]))
}

#[test]
fn primary_crash_resyncs_its_activity_log_extents_and_checksums_skip_equal_blocks() {
    for checksum in [false, true] {
        let mut p = Pair::started(64 * M, &format!("[resync]\nchecksum = {checksum}\n"));
        // Both copies get these writes; they leave extents hot in alpha's activity log.
        qemu_io_ok(
            &p.uri("alpha"),
            &["write -P 0x31 0 6M", "write -P 0x32 40M 1M", "flush"],
        );
        p.wait_in_sync(10);
        p.kill9("alpha");
        p.up("alpha");
        assert!(
            p.log("alpha").contains("crashed as primary"),
            "{}",
            p.log("alpha")
        );
        p.wait_in_sync(30);
        // The survivor is the sync source for the crashed primary's hot extents.
        // The source logs its totals just after reporting Connected; wait for the line.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (synced, sent) = loop {
            if let Some(t) = resync_totals(&p.log("beta")) {
                break t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "beta ran no resync as source:\n{}",
                p.log("beta")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(synced >= 7 * M, "hot extents resynced: {synced}");
        if checksum {
            assert_eq!(sent, 0, "identical blocks must not be sent");
        } else {
            assert_eq!(sent, synced);
        }
        p.stop("alpha");
        p.stop("beta");
        p.assert_identical();
    }
}

#[test]
fn a_peer_with_the_wrong_secret_fails_authentication_and_the_real_peer_still_connects() {
    let mut p = Pair::started(16 * M, "");
    p.stop("alpha");
    p.wait_for("beta", "waiting for its peer", 10, |s| {
        s["connection"] == "Connecting"
    });
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    let beta_repl = cfg
        .lines()
        .filter_map(|l| l.strip_prefix("replication = \""))
        .nth(1)
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    // An impostor that knows the resource, the names and the size, but not the secret.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(&beta_repl).await.unwrap();
        let id = tandem::repl::proto::Identity {
            resource: "r0",
            node: "alpha",
            peer: "beta",
            size: 16 * M,
            secret: b"not-the-secret",
        };
        tandem::repl::proto::handshake(&mut s, &id).await
    });
    assert!(
        matches!(result, Err(tandem::repl::proto::HandshakeError::AuthFailed)),
        "{result:?}"
    );
    // Beta logs its side of the failure once it has checked the impostor's answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !p.log("beta").contains("authentication") {
        assert!(std::time::Instant::now() < deadline, "{}", p.log("beta"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.status("beta")["peer"].is_null());
    // The real peer still gets in.
    p.up("alpha");
    p.wait_in_sync(20);
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}
