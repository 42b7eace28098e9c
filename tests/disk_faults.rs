//! Failures of a node's disks, injected into a running node with `tandem up --fault-file`
//! (reloaded on SIGHUP). Data rules (`OP:START-END:ACTION`): blocks a failed write left
//! different on the two copies are resynced while the link stays up (issue 11, nemesis
//! seed 57). Metadata rules (`meta:POINT:ACTION`): each failure at a persist point is an error
//! the operator sees, never a success (issue 12, fault hooks in metadata IO).

mod common;

use common::failover::witnessed_pair;
use common::pair::{qemu_io, qemu_io_ok, Pair, M};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Replace `node`'s fault rules and wait until it has loaded them.
fn set_faults(p: &Pair, node: &str, rules: &str) {
    let before = p.log(node).matches("fault injection (testing)").count();
    std::fs::write(p.path(&format!("{node}.faults")), rules).unwrap();
    kill(Pid::from_raw(p.pid(node)), Signal::SIGHUP).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while p.log(node).matches("fault injection (testing)").count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "{node} did not reload its faults"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A pair with alpha primary and in sync, `faulty` running under a fault file.
fn started_with_faults(size: u64, extra: &str, faulty: &'static str) -> Pair {
    let mut p = Pair::new(size, extra);
    for n in ["alpha", "beta"] {
        if n == faulty {
            up_with_faults(&mut p, n);
        } else {
            p.up(n);
        }
    }
    p.ok("alpha", &["primary", "--force"]);
    p.wait_in_sync(60);
    p
}

/// Wait until `node`'s log says `what`.
fn wait_log(p: &Pair, node: &str, what: &str) {
    p.wait_for(node, &format!("{what:?} in the log"), 30, |_| {
        p.log(node).contains(what)
    });
}

/// (Re)start `node` under an empty fault file (`NODE.faults`), for `set_faults`.
fn up_with_faults(p: &mut Pair, node: &'static str) {
    let faults = p.path(&format!("{node}.faults"));
    std::fs::write(&faults, "").unwrap();
    p.up_with(node, &["--fault-file", faults.to_str().unwrap()]);
}

/// A witnessed pair, alpha primary and in sync, beta running under a fault file.
fn witnessed_pair_with_faults_on_beta() -> (Pair, common::failover::Witness) {
    let (mut p, w) = witnessed_pair(16 * M);
    assert_eq!(p.stop("beta"), Some(0));
    up_with_faults(&mut p, "beta");
    p.wait_in_sync(60);
    (p, w)
}

/// Kill alpha; beta's takeover fails to record and it says so. Returns beta's status.
fn failed_takeover_by_beta(p: &mut Pair) -> serde_json::Value {
    p.kill9("alpha");
    let s = p.wait_for("beta", "the failed takeover in status", 20, |s| {
        s["failover"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("cannot record the promotion"))
    });
    assert_eq!(s["role"], "secondary", "{s}");
    s
}

/// A promotion whose superblock write fails: the node stays secondary and says why, both
/// when it takes over a lost primary and when an operator asks. Before, `become_primary`
/// only logged the failure: the automatic promotion left no trace in status, and
/// `tandem primary` answered "promoted to primary" from a node that was not.
#[test]
fn a_promotion_that_cannot_be_recorded_is_refused_not_reported_as_done() {
    let (mut p, _w) = witnessed_pair_with_faults_on_beta();
    set_faults(&p, "beta", "meta:superblock:eio\n");

    // Automatic: the primary dies; the witness grants beta an epoch it cannot record.
    let s = failed_takeover_by_beta(&mut p);
    assert!(
        s["failover"]["note"].as_str().unwrap().contains("injected"),
        "{s}"
    );

    // Operator: refused with the reason, and still secondary.
    let out = p.tandem("beta", &["primary"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "primary succeeded: {out:?}");
    assert!(stderr.contains("cannot record the promotion"), "{stderr}");
    assert_eq!(p.status("beta")["role"], "secondary");

    // Healed: the same command promotes.
    set_faults(&p, "beta", "");
    p.ok("beta", &["primary"]);
    assert_eq!(p.status("beta")["role"], "primary");
}

/// A takeover whose metadata fdatasync fails: the superblock write that reached the file is
/// written back, so the file says what the node says, that it never became primary. Without
/// the write-back the file kept "was primary" and the epoch the node had given up, for a
/// crash to bring back (the simulator's seeds 49904 and 67431 of `--meta-eio`).
#[test]
fn a_promotion_whose_sync_fails_leaves_the_metadata_file_as_it_was() {
    let (mut p, _w) = witnessed_pair_with_faults_on_beta();
    let before = p.dump_md("beta");
    set_faults(&p, "beta", "meta:sync:eio\n");

    failed_takeover_by_beta(&mut p);
    let after = p.dump_md("beta");
    let flags = after["flags"].as_array().unwrap();
    assert!(
        !flags.iter().any(|f| f == "was_primary"),
        "the file says primary: {after}"
    );
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(after["primary_epoch"], before["primary_epoch"], "{after}");
}

/// A bad metadata rule stops `up` with the file and line, like a bad data rule.
#[test]
fn a_bad_metadata_fault_rule_is_refused_and_the_node_keeps_serving() {
    let (mut p, _w) = witnessed_pair(16 * M);
    let faults = p.path("bad.faults");
    std::fs::write(&faults, "meta:disk:eio\n").unwrap();
    assert_eq!(p.stop("beta"), Some(0));
    let out = std::process::Command::new(common::tandem_bin())
        .args(["up", "-c"])
        .arg(&p.config)
        .args(["-n", "beta", "--fault-file"])
        .arg(&faults)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 1") && stderr.contains("unknown point"),
        "{stderr}"
    );
    assert_eq!(p.status("alpha")["role"], "primary");
}

/// A write whose activity-log transaction cannot be written fails to the client: the data
/// must not land (or be acknowledged) in an extent a crash would not know to resync. Once the
/// fault is gone the same write succeeds and reads back.
#[test]
fn a_write_whose_activity_log_update_fails_is_an_error_to_the_client() {
    let mut p = started_with_faults(16 * M, "", "alpha");
    // Before any write, no extent is in the activity log: the first write must add one.
    set_faults(&p, "alpha", "meta:al:eio\n");
    let out = qemu_io(&p.uri("alpha"), &["write -P 0x5a 12M 64k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error") && !text.contains("wrote 65536"),
        "the write was not refused: {text}"
    );
    assert!(
        p.log("alpha").contains("injected fault"),
        "{}",
        p.log("alpha")
    );
    set_faults(&p, "alpha", "");
    qemu_io_ok(
        &p.uri("alpha"),
        &["write -P 0x5a 12M 64k", "read -P 0x5a 12M 64k"],
    );
    p.wait_in_sync(60);
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// A resync whose end cannot be recorded on the target (bitmap and superblock) is not
/// finished: the target ends the link and the next handshake resyncs again. Before, the
/// target logged the failure and stayed SyncTarget and Inconsistent for good.
#[test]
fn a_resync_whose_end_cannot_be_recorded_is_redone() {
    let mut p = started_with_faults(16 * M, "[resync]\nrate = \"2M\"\n", "beta");
    p.ok("beta", &["disconnect"]);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x6b 2M 4M"]);
    p.ok("beta", &["connect"]);
    p.wait_for("beta", "the resync", 20, |s| {
        s["connection"] == "SyncTarget"
    });
    set_faults(&p, "beta", "meta:superblock:eio\nmeta:bitmap:eio\n");
    wait_log(&p, "beta", "recording the finished resync failed");
    assert_ne!(p.status("beta")["disk"], "UpToDate");
    set_faults(&p, "beta", "");
    p.wait_in_sync(60);
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// The primary's disk fails every operation on a range for a while; the peer has every write.
/// The client's writes there fail, and their blocks are marked out of sync on the primary. The
/// resync of those blocks starts at once but cannot read them while the fault lasts: it keeps
/// trying, and once the disk works again the pair converges without a reconnect. Before,
/// the bits stayed while the link lived (nemesis seed 57: 31.7 MB for good), and a resync whose
/// read failed stopped for good, still SyncSource.
#[test]
fn blocks_a_failed_local_write_left_are_resynced_while_connected() {
    let mut p = started_with_faults(32 * M, "", "alpha");
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x11 4M 1M"]);

    set_faults(&p, "alpha", "any:4M-6M:eio\n");
    let out = qemu_io(&p.uri("alpha"), &["write -P 0x22 4M 1M"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error"),
        "the write did not fail: {text}"
    );
    // Marked, and the resync is running into the same fault.
    wait_log(&p, "alpha", "did not land");
    let s = p.status("alpha");
    assert_eq!(s["connection"], "SyncSource", "{s}");
    assert!(s["out_of_sync_bytes"].as_u64().unwrap() >= M, "{s}");

    set_faults(&p, "alpha", "");
    p.wait_in_sync(30);
    // Either version of the failed write is allowed; both copies must hold the same one.
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// The secondary's disk fails a replicated write: the primary acknowledges it from its own copy
/// and a new generation, the secondary calls itself Outdated. Once the secondary's disk works,
/// the primary pushes the blocks while connected and the secondary is UpToDate again. Before,
/// it stayed Outdated until the link was next established.
#[test]
fn a_secondary_whose_write_failed_is_brought_up_to_date_while_connected() {
    let mut p = started_with_faults(32 * M, "", "beta");

    set_faults(&p, "beta", "write:8M-9M:eio\n");
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x33 8M 64k"]);
    p.wait_for("beta", "the failed apply", 20, |s| s["disk"] == "Outdated");
    set_faults(&p, "beta", "");
    p.wait_in_sync(30);
    qemu_io_ok(&p.uri("alpha"), &["read -P 0x33 8M 64k"]);
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// The bitmap cannot be written when the handshake merges the peer's bits: the connection is
/// dropped with the reason and tried again, and once the disk works the pair resyncs.
#[test]
fn a_handshake_whose_bitmap_cannot_be_written_is_retried() {
    let mut p = started_with_faults(16 * M, "", "beta");
    p.ok("beta", &["disconnect"]);
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x3c 1M 2M"]);
    set_faults(&p, "beta", "meta:bitmap:eio\n");
    p.ok("beta", &["connect"]);
    wait_log(&p, "beta", "injected fault");
    let s = p.status("beta");
    assert!(
        s["connection"] != "Connected" && s["connection"] != "SyncTarget",
        "{s}"
    );
    set_faults(&p, "beta", "");
    p.wait_in_sync(60);
    qemu_io_ok(&p.uri("alpha"), &["read -P 0x3c 1M 2M"]);
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}

/// A node whose disk cannot flush before `disconnect` does not say goodbye (a goodbye promises
/// that everything it acknowledged is durable): the peer sees the loss as a crash, and the
/// pair reconnects and ends identical once the disk works.
#[test]
fn no_goodbye_without_a_flush() {
    let mut p = started_with_faults(16 * M, "", "alpha");
    qemu_io_ok(&p.uri("alpha"), &["write -P 0x5e 3M 1M"]);
    set_faults(&p, "alpha", "flush:0-1:eio\n");
    p.ok("alpha", &["disconnect"]);
    wait_log(&p, "alpha", "closing without one");
    wait_log(&p, "beta", "connection to alpha lost");
    assert!(
        !p.log("beta").contains("peer said goodbye"),
        "{}",
        p.log("beta")
    );
    set_faults(&p, "alpha", "");
    p.ok("alpha", &["connect"]);
    p.wait_in_sync(60);
    p.stop("alpha");
    p.stop("beta");
    p.assert_identical();
}
