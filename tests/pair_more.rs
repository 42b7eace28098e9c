//! More of the replicated pair with real `tandem up` processes: the automatic split-brain
//! policies not covered in `pair.rs`, a peer that stops answering, the events stream,
//! `status --watch`, exit codes of refused commands, and `invalidate`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pair::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `connect` on both nodes at once (each call waits up to 5 s for the handshake's verdict,
/// so running them one after the other would cost the first one's full wait).
fn connect_both(p: &Pair) -> (Output, Output) {
    std::thread::scope(|s| {
        let a = s.spawn(|| p.tandem("alpha", &["connect"]));
        let b = s.spawn(|| p.tandem("beta", &["connect"]));
        (a.join().unwrap(), b.join().unwrap())
    })
}

/// Split the pair: both sides StandAlone, beta forced primary (alpha stays primary).
fn split(p: &Pair) {
    p.ok("alpha", &["disconnect"]);
    p.ok("beta", &["disconnect"]);
    p.ok("beta", &["primary", "--force"]);
}

/// Both nodes report an unresolved split brain and stay StandAlone.
fn assert_split_brain(p: &Pair, outs: &(Output, Output)) {
    for (n, out) in NODES.iter().zip([&outs.0, &outs.1]) {
        assert_eq!(
            out.status.code(),
            Some(3),
            "connect on {n} must report the split brain: {}",
            text(out)
        );
        assert!(text(out).contains("split brain"), "{n}: {}", text(out));
        let s = p.wait_for(n, "split brain reported", 10, |s| s["split_brain"] == true);
        assert_eq!(s["connection"], "StandAlone", "{s}");
        assert!(s["peer"].is_null(), "{s}");
    }
}

/// Every byte of `[off, off+len)` of `node`'s backing file equals `byte`.
fn disk_has(p: &Pair, node: &str, off: u64, len: u64, byte: u8) -> bool {
    let data = std::fs::read(p.disk(node)).unwrap();
    data[off as usize..(off + len) as usize]
        .iter()
        .all(|&b| b == byte)
}

fn stop_both(p: &mut Pair) {
    assert_eq!(p.stop("alpha"), Some(0), "alpha:\n{}", p.log("alpha"));
    assert_eq!(p.stop("beta"), Some(0), "beta:\n{}", p.log("beta"));
}

// ------------------------------------------------------------------ split-brain policies

/// With the lazy generation bump a node that was forced primary but wrote nothing keeps its
/// generation, so this is no split brain at all: the pair resyncs by bitmap from the side that
/// wrote (rule 70 bitmap-self), and discard-zero-changes never has to decide.
#[test]
fn policy_discard_zero_changes_side_without_writes_is_no_split_brain() {
    let mut p = Pair::started(
        32 * M,
        "[split_brain]\nafter_sb_0pri = \"discard-zero-changes\"\n",
    );
    let gen_before = p.status("beta")["generation"].clone();
    split(&p);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 1M"]);
    p.ok("beta", &["secondary"]);
    p.ok("alpha", &["secondary"]);
    let s = p.status("beta");
    assert_eq!(s["generation"], gen_before, "no write, no new generation");
    assert_eq!(s["out_of_sync_bytes"], 0);
    assert_eq!(p.status("alpha")["out_of_sync_bytes"], M);
    let (a, b) = connect_both(&p);
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    p.wait_in_sync(30);
    for n in NODES {
        assert_eq!(p.status(n)["split_brain"], false);
    }
    let log = p.log("alpha");
    assert!(
        log.contains("bitmap-self") && !log.contains("split brain"),
        "a bitmap resync from alpha, no split brain:\n{log}"
    );
    stop_both(&mut p);
    p.assert_identical();
    assert!(disk_has(&p, "beta", M, M, 0xaa));
}

/// When both sides wrote, discard-zero-changes has no side without changes: it cannot decide
/// and the split brain is reported, nothing synced.
#[test]
fn policy_discard_zero_changes_cannot_resolve_when_both_wrote() {
    let mut p = Pair::started(
        32 * M,
        "[split_brain]\nafter_sb_0pri = \"discard-zero-changes\"\n",
    );
    split(&p);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 1M"]);
    qemu_io_ok(&p.uri("beta"), &["write -P 0xbb 4M 64k"]);
    p.ok("beta", &["secondary"]);
    p.ok("alpha", &["secondary"]);
    let outs = connect_both(&p);
    assert_split_brain(&p, &outs);
    stop_both(&mut p);
    assert!(disk_has(&p, "alpha", M, M, 0xaa) && disk_has(&p, "alpha", 4 * M, 64 << 10, 0));
    assert!(disk_has(&p, "beta", 4 * M, 64 << 10, 0xbb) && disk_has(&p, "beta", M, M, 0));
}

/// Both wrote, both secondary at reconnect: the side with fewer changes is discarded. beta
/// (which sorts last, so the tie-break would not favour it) changed more and wins.
#[test]
fn policy_discard_least_changes_with_no_primary_keeps_the_busier_side() {
    let mut p = Pair::started(
        32 * M,
        "[split_brain]\nafter_sb_0pri = \"discard-least-changes\"\n",
    );
    split(&p);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 64k"]);
    qemu_io_ok(&p.uri("beta"), &["write -P 0xbb 8M 2M"]);
    p.ok("beta", &["secondary"]);
    p.ok("alpha", &["secondary"]);
    let (a, b) = connect_both(&p);
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    p.wait_in_sync(30);
    assert!(
        p.log("alpha").contains("discard-least-changes"),
        "{}",
        p.log("alpha")
    );
    stop_both(&mut p);
    p.assert_identical();
    // beta's data everywhere; alpha's change rolled back.
    assert!(disk_has(&p, "alpha", 8 * M, 2 * M, 0xbb));
    assert!(disk_has(&p, "alpha", M, 64 << 10, 0));
}

/// discard-younger-primary with both secondary at reconnect: alpha was primary when the
/// pair split, beta became primary later (forced), so beta's changes are discarded, even
/// though beta changed more (discard-least-changes would keep beta).
#[test]
fn policy_discard_younger_primary_discards_the_later_primary() {
    let mut p = Pair::started(
        32 * M,
        "[split_brain]\nafter_sb_0pri = \"discard-younger-primary\"\n",
    );
    split(&p);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 64k"]);
    qemu_io_ok(&p.uri("beta"), &["write -P 0xbb 8M 2M"]);
    p.ok("beta", &["secondary"]);
    p.ok("alpha", &["secondary"]);
    let (a, b) = connect_both(&p);
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    p.wait_in_sync(30);
    let log = p.log("alpha");
    stop_both(&mut p);
    p.assert_identical();
    let alpha_won = disk_has(&p, "alpha", M, 64 << 10, 0xaa);
    assert!(
        alpha_won && disk_has(&p, "alpha", 8 * M, 2 * M, 0),
        "the younger primary (beta) must be discarded; alpha's log:\n{log}"
    );
}

/// One primary (alpha, fewer changes) and consensus: the 0pri verdict (least changes) would
/// discard the primary, so consensus refuses and the split brain stays unresolved.
#[test]
fn policy_consensus_refuses_when_the_0pri_verdict_discards_the_primary() {
    let mut p = Pair::started(
        32 * M,
        "[split_brain]\nafter_sb_0pri = \"discard-least-changes\"\nafter_sb_1pri = \"consensus\"\n",
    );
    split(&p);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 64k"]);
    qemu_io_ok(&p.uri("beta"), &["write -P 0xbb 8M 2M"]);
    p.ok("beta", &["secondary"]);
    let outs = connect_both(&p);
    assert_split_brain(&p, &outs);
    assert_eq!(p.status("alpha")["role"], "primary");
    // Nothing synced: the primary still serves its own data, not beta's.
    qemu_io_ok(&p.uri("alpha"), &["read -P 0xaa 1M 64k", "read -P 0 8M 2M"]);
    stop_both(&mut p);
    assert!(disk_has(&p, "beta", 8 * M, 2 * M, 0xbb) && disk_has(&p, "beta", M, 64 << 10, 0));
}

/// Two primaries at reconnect with after_sb_2pri = disconnect: split brain on both sides,
/// nothing synced, each keeps serving its own data.
#[test]
fn policy_after_sb_2pri_disconnect_keeps_both_primaries_apart() {
    let mut p = Pair::started(
        32 * M,
        "[split_brain]\nafter_sb_0pri = \"discard-least-changes\"\n\
         after_sb_1pri = \"discard-secondary\"\nafter_sb_2pri = \"disconnect\"\n",
    );
    split(&p);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0xaa 1M 1M"]);
    qemu_io_ok(
        &p.uri("beta"),
        &["write -P 0xbb 1M 64k", "write -P 0xbb 8M 1M"],
    );
    let oos = |n| p.status(n)["out_of_sync_bytes"].as_u64().unwrap();
    let before = (oos("alpha"), oos("beta"));
    let outs = connect_both(&p);
    assert_split_brain(&p, &outs);
    for n in NODES {
        assert_eq!(p.status(n)["role"], "primary");
    }
    assert_eq!((oos("alpha"), oos("beta")), before, "nothing was synced");
    qemu_io_ok(&p.uri("alpha"), &["read -P 0xaa 1M 1M", "read -P 0 8M 1M"]);
    qemu_io_ok(
        &p.uri("beta"),
        &[
            "read -P 0xbb 1M 64k",
            "read -P 0 1088k 960k",
            "read -P 0xbb 8M 1M",
        ],
    );
    stop_both(&mut p);
}

// ------------------------------------------------------------------ a peer that stops answering

#[test]
fn stopped_peer_is_dropped_within_ping_timeout_and_resyncs_after_sigcont() {
    let mut p = Pair::started(64 * M, "");
    let beta = Pid::from_raw(p.pid("beta"));
    kill(beta, Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    // A write issued while the peer is silent completes once the peer is dropped.
    let uri = p.uri("alpha");
    let writer = std::thread::spawn(move || qemu_io(&uri, &["write -P 0x31 2M 1M"]));
    let s = p.wait_for("alpha", "peer dropped", 5, |s| s["peer"].is_null());
    let dropped = stopped.elapsed();
    assert!(dropped < Duration::from_secs(3), "took {dropped:?}: {s}");
    assert_eq!(s["connection"], "Connecting", "{s}");
    assert_eq!(s["role"], "primary", "{s}");
    let w = writer.join().unwrap();
    assert!(
        w.status.success() && !text(&w).contains("failed"),
        "{}",
        text(&w)
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "the write waited {:?}",
        stopped.elapsed()
    );
    assert!(
        p.log("alpha").contains("did not answer"),
        "{}",
        p.log("alpha")
    );
    // Writes keep working while degraded; each is counted out of sync.
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x32 20M 3M", "flush"]);
    let s = p.status("alpha");
    assert_eq!(s["out_of_sync_bytes"], 4 * M, "{s}");
    assert_eq!(s["split_brain"], false, "{s}");
    kill(beta, Signal::SIGCONT).unwrap();
    p.wait_in_sync(30);
    assert!(
        p.log("alpha").contains("bitmap-self"),
        "a bitmap resync expected:\n{}",
        p.log("alpha")
    );
    qemu_io_ok(
        &p.uri("alpha"),
        &["read -P 0x31 2M 1M", "read -P 0x32 20M 3M"],
    );
    stop_both(&mut p);
    p.assert_identical();
}

/// A started pair whose primary never asks the peer to flush on its own (the periodic flush
/// would make beta's copy durable before the tests below can crash it).
fn pair_without_periodic_peer_flush() -> Pair {
    let mut p = Pair::with_sections(
        64 * M,
        "ping_timeout = \"1s\"\npeer_flush_interval = \"1h\"\n",
        "[failover]\nfencing = \"none\"\n",
        "",
    );
    p.up("alpha");
    p.up("beta");
    p.ok("alpha", &["primary", "--force"]);
    p.wait_in_sync(60);
    p
}

/// Restart beta with a volatile write cache (a `kill -9` then loses what it has not flushed,
/// as an operating-system crash would), then write `len` bytes of `byte` at `offset` through
/// alpha without a flush.
fn unflushed_write_to_volatile_beta(p: &mut Pair, byte: u8, offset: u64, len: u64) {
    assert_eq!(p.stop("beta"), Some(0), "beta:\n{}", p.log("beta"));
    p.up_with("beta", &["--volatile-cache"]);
    p.wait_in_sync(30);
    let write = format!("h.pwrite(bytes([{byte}]) * {len}, {offset})");
    let out = common::nbdsh(&["-u", &p.uri("alpha"), "-c", &write]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The secondary acknowledges a write once it is in its page cache. If its operating system
/// then crashes, the write is gone there while the primary counts the copies as equal; a later
/// failover would serve the old data, even for writes the client flushed after the crash. The
/// primary must mark what the peer had not flushed out of sync when the link
/// drops, and the resync must rewrite it.
#[test]
fn writes_the_secondary_lost_in_a_crash_before_flushing_are_resynced() {
    let mut p = pair_without_periodic_peer_flush();
    // Acknowledged by both nodes, flushed by neither; then beta "crashes".
    unflushed_write_to_volatile_beta(&mut p, 0x5a, 5 * M, 3 * M);
    p.kill9("beta");
    p.wait_for("alpha", "peer dropped", 5, |s| s["peer"].is_null());
    assert!(
        p.log("alpha")
            .contains("had not flushed marked out of sync"),
        "{}",
        p.log("alpha")
    );
    let s = p.status("alpha");
    assert!(
        s["out_of_sync_bytes"].as_u64().unwrap() >= 3 * M,
        "the unflushed extents are marked: {s}"
    );
    // The client flushes now; only alpha is there to hear it.
    qemu_io_ok(&p.uri("alpha"), &["flush"]);
    assert!(
        !disk_has(&p, "beta", 5 * M, 3 * M, 0x5a),
        "the crash lost beta's copy"
    );
    // The resync target flushes before it is told it is UpToDate: a crash right after the
    // resync loses nothing of it.
    p.up_with("beta", &["--volatile-cache"]);
    p.wait_in_sync(30);
    p.kill9("beta");
    assert!(disk_has(&p, "beta", 5 * M, 3 * M, 0x5a));
    p.up("beta");
    p.wait_in_sync(30);
    stop_both(&mut p);
    p.assert_identical();
}

/// A secondary whose machine goes down (its page cache lost with writes it acknowledged)
/// while the primary is killed (its page cache kept): before, the secondary came back
/// UpToDate, the primary came back as a crashed primary, and the "survivor" overwrote the
/// primary's activity-log extents with its older data. Now the secondary sees another boot
/// id, comes back Outdated (not promotable), and is the target of a full resync.
#[test]
fn a_secondary_whose_machine_went_down_is_outdated_and_resynced_whole() {
    const BOOT_1: &str = "11111111-1111-1111-1111-111111111111";
    const BOOT_2: &str = "22222222-2222-2222-2222-222222222222";
    let mut p = pair_without_periodic_peer_flush();
    assert_eq!(p.stop("beta"), Some(0), "beta:\n{}", p.log("beta"));
    p.up_with("beta", &["--volatile-cache", "--boot-id", BOOT_1]);
    p.wait_in_sync(30);
    let write = format!("h.pwrite(bytes([0x6b]) * {}, {})", 2 * M, 9 * M);
    let out = common::nbdsh(&["-u", &p.uri("alpha"), "-c", &write]);
    assert!(out.status.success(), "{}", text(&out));
    // Both at once: no node gets to notice the other's loss first.
    p.kill9("alpha");
    p.kill9("beta");
    assert!(
        !disk_has(&p, "beta", 9 * M, 2 * M, 0x6b),
        "beta's lost cache took the write"
    );
    assert!(disk_has(&p, "alpha", 9 * M, 2 * M, 0x6b));

    // beta's machine comes back: another boot id.
    p.up_with("beta", &["--boot-id", BOOT_2]);
    let s = p.status("beta");
    assert_eq!(s["disk"], "Outdated", "{s}");
    assert!(
        p.log("beta").contains("the machine went down"),
        "{}",
        p.log("beta")
    );
    let refused = p.tandem("beta", &["primary"]);
    assert!(!refused.status.success(), "{}", text(&refused));

    // alpha, a crashed primary with its data, is the source of every block.
    p.up("alpha");
    p.wait_in_sync(60);
    let log = p.log("beta");
    assert!(
        log.contains("become sync target (full)") && log.contains("rolled-back"),
        "{log}"
    );
    assert_eq!(p.status("beta")["disk"], "UpToDate");
    assert!(disk_has(&p, "beta", 9 * M, 2 * M, 0x6b));
    stop_both(&mut p);
    p.assert_identical();
}

/// A secondary stopped cleanly stops acknowledging, flushes its disk and only then says
/// goodbye, so the primary forgets what it kept and marks nothing.
#[test]
fn a_secondary_that_says_goodbye_has_flushed_and_nothing_is_marked() {
    let mut p = pair_without_periodic_peer_flush();
    unflushed_write_to_volatile_beta(&mut p, 0x7c, 20 * M, M);
    assert_eq!(p.stop("beta"), Some(0), "beta:\n{}", p.log("beta"));
    assert!(disk_has(&p, "beta", 20 * M, M, 0x7c));
    let s = p.wait_for("alpha", "peer gone", 5, |s| s["peer"].is_null());
    assert_eq!(s["out_of_sync_bytes"], 0, "{s}");
    assert!(
        !p.log("alpha").contains("had not flushed"),
        "{}",
        p.log("alpha")
    );
}

/// Without client flushes the primary asks the peer to flush every `peer_flush_interval`
/// (default 1 s), so what a crash of the secondary can lose, and a link loss marks, stays small.
#[test]
fn the_primary_has_the_secondary_flush_what_it_acknowledged() {
    let mut p = Pair::started(64 * M, "");
    unflushed_write_to_volatile_beta(&mut p, 0x6b, 9 * M, M);
    std::thread::sleep(Duration::from_millis(2500));
    p.kill9("beta");
    assert!(disk_has(&p, "beta", 9 * M, M, 0x6b), "not flushed on beta");
    p.wait_for("alpha", "peer dropped", 5, |s| s["peer"].is_null());
    assert_eq!(p.status("alpha")["out_of_sync_bytes"], 0);
    p.up("beta");
    p.wait_in_sync(30);
    stop_both(&mut p);
    p.assert_identical();
}

// ------------------------------------------------------------------ events

/// Collects `tandem events` lines from a child process.
struct Events {
    child: std::process::Child,
    rx: mpsc::Receiver<String>,
    seen: Vec<serde_json::Value>,
}

impl Events {
    fn start(p: &Pair, node: &str) -> Events {
        let mut child = Command::new(common::tandem_bin())
            .args(["events", "-c"])
            .arg(&p.config)
            .args(["-n", node])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut e = Events {
            child,
            rx,
            seen: Vec::new(),
        };
        e.wait("subscribed", |v| v["event"] == "subscribed");
        e
    }

    /// Wait up to 10 s for a line matching `pred` (earlier lines are kept in `seen`).
    fn wait(&mut self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("no {what} event; seen: {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_event_fields(v: &serde_json::Value, node: &str) {
    assert_eq!(v["resource"], "r0", "{v}");
    assert_eq!(v["node"], node, "{v}");
    let t = v["time"].as_str().unwrap_or_else(|| panic!("no time: {v}"));
    assert_rfc3339(t, v);
}

/// RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
fn assert_rfc3339(t: &str, v: &serde_json::Value) {
    let b = t.as_bytes();
    assert!(
        b.len() == 24
            && b[4] == b'-'
            && b[10] == b'T'
            && b[19] == b'.'
            && b[23] == b'Z'
            && t[..4].parse::<u32>().is_ok_and(|y| y >= 2024),
        "time {t:?} is not RFC 3339: {v}"
    );
}

#[test]
fn events_stream_reports_connection_and_role_changes() {
    let mut p = Pair::started(16 * M, "");
    let mut ev = Events::start(&p, "alpha");

    p.ok("alpha", &["disconnect"]);
    let v = ev.wait("StandAlone", |v| {
        v["event"] == "connection" && v["state"] == "StandAlone"
    });
    assert_event_fields(&v, "alpha");
    assert_eq!(v["reason"], "operator request", "{v}");
    let v = ev.wait("link lost", |v| {
        v["event"] == "connection" && v["state"] == "lost"
    });
    assert_event_fields(&v, "alpha");
    assert_eq!(v["peer"], "beta", "{v}");

    p.ok("alpha", &["connect"]);
    let v = ev.wait("Connected", |v| {
        v["event"] == "connection" && v["state"] == "Connected"
    });
    assert_event_fields(&v, "alpha");
    assert_eq!(v["peer"], "beta", "{v}");
    assert!(v["decision"].is_string(), "{v}");

    p.ok("alpha", &["secondary"]);
    let v = ev.wait("role secondary", |v| {
        v["event"] == "role" && v["role"] == "secondary"
    });
    assert_event_fields(&v, "alpha");
    p.ok("alpha", &["primary"]);
    let v = ev.wait("role primary", |v| {
        v["event"] == "role" && v["role"] == "primary"
    });
    assert_event_fields(&v, "alpha");
    assert_eq!(v["forced"], false, "{v}");

    // Every line so far is a JSON object with an event name.
    assert!(
        ev.seen.iter().all(|v| v["event"].is_string()),
        "{:#?}",
        ev.seen
    );

    // The peer going away is an event too (forget the operator's disconnect above).
    ev.seen.clear();
    p.kill9("beta");
    let v = ev.wait("peer lost", |v| {
        v["event"] == "connection" && v["state"] == "lost"
    });
    assert_event_fields(&v, "alpha");
    assert_eq!(v["peer"], "beta", "{v}");
    assert!(v["reason"].is_string(), "{v}");
}

// ------------------------------------------------------------------ status --watch

#[test]
fn status_watch_draws_a_resync_progress_bar() {
    let mut p = Pair::started(16 * M, "[resync]\nrate = \"4M\"\n");
    p.kill9("beta");
    p.wait_for("alpha", "peer lost", 10, |s| s["peer"].is_null());
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x44 0 8M"]);
    p.up("beta");
    p.wait_for("alpha", "resync under way", 10, |s| {
        s["connection"] == "SyncSource"
    });
    let mut watch = Command::new(common::tandem_bin())
        .args(["status", "--watch", "-c"])
        .arg(&p.config)
        .args(["-n", "alpha"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        watch.try_wait().unwrap().is_none(),
        "status --watch must keep running"
    );
    watch.kill().unwrap();
    let out = watch.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("resync: ["), "{shown}");
    assert!(shown.contains("[#"), "some progress drawn: {shown}");
    assert!(shown.contains("SyncSource"), "{shown}");
    // Redrawn: more than one frame in 1.5 s.
    assert!(shown.matches("resync: [").count() >= 2, "{shown}");
    p.wait_in_sync(30);
    stop_both(&mut p);
    p.assert_identical();
}

// ------------------------------------------------------------------ exit codes

#[test]
fn status_of_a_node_that_is_not_running_exits_4() {
    let p = Pair::new(16 * M, "");
    let out = p.tandem("alpha", &["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach node alpha"), "{err}");
}

#[test]
fn refused_role_changes_exit_3_and_say_why() {
    let p = Pair::started(16 * M, "");
    // Promoting the secondary while the peer is primary: refused, naming the peer.
    let out = p.tandem("beta", &["primary"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer alpha is primary"), "{err}");
    let out = p.tandem("beta", &["primary", "--force"]);
    assert_eq!(out.status.code(), Some(3), "--force too: {}", text(&out));
    assert_eq!(p.status("beta")["role"], "secondary");

    // Demoting the primary while an NBD client is attached: refused.
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &p.uri("alpha"), "-c", "sleep 20000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    p.wait_for("alpha", "client attached", 10, |s| s["nbd"]["clients"] == 1);
    let out = p.tandem("alpha", &["secondary"]);
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NBD client"), "{err}");
    assert_eq!(p.status("alpha")["role"], "primary");
    // Once the client is gone the demotion goes through.
    p.wait_for("alpha", "client gone", 10, |s| s["nbd"]["clients"] == 0);
    p.ok("alpha", &["secondary"]);
}

#[test]
fn unknown_node_name_exits_1_with_the_configs_message() {
    let p = Pair::new(16 * M, "");
    for args in [&["status"][..], &["up"][..], &["primary"][..]] {
        let out = p.tandem("gamma", args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("node \"gamma\" is not in this file (nodes: alpha, beta)")
                && err.contains(p.config.to_str().unwrap()),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn config_with_an_unknown_key_stops_up_before_anything_starts() {
    let p = Pair::new(16 * M, "");
    let good = std::fs::read_to_string(&p.config).unwrap();
    // Insert a misspelt key right after the [net] header.
    let mut lines: Vec<&str> = good.lines().collect();
    let net = lines.iter().position(|l| *l == "[net]").unwrap();
    lines.insert(net + 1, "ping_intervall = \"1s\"");
    let bad_line = net + 2; // 1-based
    let bad = p.path("bad.toml");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();

    let mut child = Command::new(common::tandem_bin())
        .args(["up", "-c"])
        .arg(&bad)
        .args(["-n", "alpha"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tandem up with a bad config kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "line {bad_line}: unknown key \"ping_intervall\" in [net]"
        )),
        "{err}"
    );
    assert!(err.contains(bad.to_str().unwrap()), "{err}");
    assert!(!p.path("alpha.sock").exists(), "no control socket");
    // And the same metadata still starts with the good config.
    let mut p = p;
    p.up("alpha");
}

// ------------------------------------------------------------------ invalidate

#[test]
fn invalidate_on_the_secondary_full_resyncs_and_is_refused_on_the_primary() {
    let mut p = Pair::started(32 * M, "");
    qemu_io_ok(
        &p.uri("alpha"),
        &["write -P 0x5c 0 4M", "write -P 0x6d 20M 1M", "flush"],
    );
    p.wait_in_sync(10);

    let out = p.tandem("alpha", &["invalidate"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("primary"),
        "{}",
        text(&out)
    );

    // Rot in beta's copy that the (clean) bitmap knows nothing about: only a full resync
    // repairs it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.disk("beta"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 8192], 13 * M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 100], 20 * M + 5).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let out = p.ok("beta", &["invalidate"]);
    assert!(out.contains("full resync"), "{out}");
    p.wait_for("beta", "full resync as target", 10, |s| {
        (s["connection"] == "SyncTarget" && s["resync"]["total_bytes"].as_u64() == Some(32 * M))
            || (s["connection"] == "Connected" && s["disk"] == "UpToDate")
    });
    p.wait_in_sync(30);
    assert!(
        p.log("alpha").contains("become sync source (full)"),
        "{}",
        p.log("alpha")
    );
    stop_both(&mut p);
    p.assert_identical();
    assert!(disk_has(&p, "beta", 13 * M, 8192, 0));
    assert!(disk_has(&p, "beta", 20 * M, M, 0x6d));
}
