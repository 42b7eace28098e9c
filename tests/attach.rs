//! `tandem attach` with clients nobody here wrote, through a `kill -9` of the primary and a
//! switchover: the clients must see no error, and nothing acknowledged may be lost.

mod common;

use std::process::Command;
use std::time::Duration;

use common::failover::{witnessed_pair, Attach, Checker};
use common::pair::{Pair, M};

/// Kill the primary after `after`, asserting the client is still running then (otherwise the
/// test would prove nothing).
fn kill_primary_soon<T>(p: &mut Pair, after: Duration, client: &std::thread::JoinHandle<T>) {
    std::thread::sleep(after);
    assert!(!client.is_finished(), "the client finished before the kill");
    p.kill9("alpha");
    p.wait_for("beta", "promotion", 20, |s| s["role"] == "primary");
}

#[test]
fn the_checker_through_attach_sees_no_error_across_a_kill9() {
    let (mut p, _w) = witnessed_pair(32 * M);
    let a = Attach::start(&p.config, p.dir.path());
    let checker = Checker::start(p.dir.path(), "attach", &[a.uri()], 2048, 16);
    std::thread::sleep(Duration::from_secs(2));
    p.kill9("alpha");
    p.wait_for("beta", "promotion", 20, |s| s["role"] == "primary");
    std::thread::sleep(Duration::from_secs(2));
    let s = checker.finish();
    // One connection from start to end: the failover was hidden from the client.
    assert_eq!(s["reconnects"], 0, "{s}\n{}", a.log());
    assert_eq!(s["unacked"], 0, "{s}\n{}", a.log());
    assert!(a.log().contains("replayed"), "{}", a.log());
}

#[test]
fn fio_verify_through_attach_across_a_kill9() {
    let (mut p, _w) = witnessed_pair(64 * M);
    let a = Attach::start(&p.config, p.dir.path());
    let out_file = p.path("fio.out");
    let uri = a.uri();
    let fio = std::thread::spawn(move || {
        Command::new("fio")
            .args([
                "--name=failover",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=48M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--do_verify=1",
                // Slow enough that the kill lands in the middle of the write phase.
                "--rate_iops=3000",
            ])
            .arg(format!("--output={}", out_file.display()))
            .output()
            .unwrap()
    });
    kill_primary_soon(&mut p, Duration::from_millis(1500), &fio);
    let out = fio.join().unwrap();
    let report = std::fs::read_to_string(p.path("fio.out")).unwrap_or_default();
    assert!(
        out.status.success() && report.contains("err= 0"),
        "fio failed: {}\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
}

#[test]
fn qemu_io_through_attach_across_a_kill9_and_a_switchover() {
    let (mut p, _w) = witnessed_pair(32 * M);
    let a = Attach::start(&p.config, p.dir.path());
    let uri = a.uri();
    // Many sequential writes, each waiting for its acknowledgement.
    let cmds: Vec<String> = (0..3000)
        .map(|i| format!("write -P {} {} 64k", i % 250 + 1, (i % 256) * 65536))
        .collect();
    let writer = {
        let uri = uri.clone();
        let cmds = cmds.clone();
        std::thread::spawn(move || {
            let mut args = vec!["-f".to_string(), "raw".into(), uri];
            for c in &cmds {
                args.push("-c".into());
                args.push(c.clone());
            }
            Command::new("qemu-io").args(&args).output().unwrap()
        })
    };
    kill_primary_soon(&mut p, Duration::from_millis(300), &writer);
    assert_qemu_io_ok(writer.join().unwrap(), &a);
    // The last write to each 64 KiB slot wins; read every slot back through attach.
    let mut last = std::collections::HashMap::new();
    for i in 0..3000usize {
        last.insert(i % 256, i % 250 + 1);
    }
    let reads: Vec<String> = last
        .iter()
        .map(|(slot, pat)| format!("read -P {pat} {} 64k", slot * 65536))
        .collect();
    let mut args = vec!["-f".to_string(), "raw".into(), uri.clone()];
    for c in &reads {
        args.push("-c".into());
        args.push(c.clone());
    }
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );

    // The old primary rejoins; a switchover back to it is just as invisible.
    p.up("alpha");
    p.wait_in_sync(60);
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            let mut args = vec!["-f".to_string(), "raw".into(), uri];
            for i in 0..3000 {
                args.push("-c".into());
                args.push(format!("write -P 7 {} 64k", (i % 256) * 65536));
            }
            Command::new("qemu-io").args(&args).output().unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !writer.is_finished(),
        "the client finished before the switchover"
    );
    p.ok("alpha", &["switchover", "--to", "alpha"]);
    assert_qemu_io_ok(writer.join().unwrap(), &a);
    assert_eq!(p.status("alpha")["role"], "primary");
}

fn assert_qemu_io_ok(out: std::process::Output, a: &Attach) {
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "{text}\n{}",
        a.log()
    );
}

#[test]
fn ext4_on_nbdfuse_through_attach_survives_a_kill9() {
    let (mut p, _w) = witnessed_pair(64 * M);
    let a = Attach::start(&p.config, p.dir.path());
    let mnt = p.path("fuse");
    std::fs::create_dir_all(&mnt).unwrap();
    let fuse = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(a.uri())
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .spawn()
        .unwrap();
    let image = mnt.join("nbd");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !image.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not mount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sh = |cmd: &str| {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let fs = p.path("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let loopdev = sh(&format!("losetup --find --show {}", image.display()));
    let cleanup = Guard {
        loopdev: loopdev.clone(),
        fs: fs.clone(),
        mnt: mnt.clone(),
        fuse,
    };
    sh(&format!("mkfs.ext4 -q {loopdev}"));
    sh(&format!("mount {loopdev} {}", fs.display()));
    sh(&format!(
        "dd if=/dev/urandom of={}/a bs=1M count=8 status=none && sync",
        fs.display()
    ));
    let sum_a = sh(&format!("md5sum < {}/a", fs.display()));
    // Keep writing while the primary dies.
    let writer = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "for i in $(seq 1 100); do dd if=/dev/urandom of={}/f$i bs=256k count=1 status=none conv=fsync || exit 1; done",
                    fs.display()
                ))
                .output()
                .unwrap()
        })
    };
    kill_primary_soon(&mut p, Duration::from_millis(500), &writer);
    let out = writer.join().unwrap();
    assert!(out.status.success(), "{out:?}\n{}", a.log());
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sh(&format!("md5sum < {}/a", fs.display())), sum_a);
    assert_eq!(sh(&format!("ls {} | grep -c '^f'", fs.display())), "100");
    drop(cleanup);
}

/// Unmount, detach and stop nbdfuse on every exit path, so a failed test leaves nothing
/// behind (a leftover nbdfuse would also hold the test's output pipe open).
struct Guard {
    loopdev: String,
    fs: std::path::PathBuf,
    mnt: std::path::PathBuf,
    fuse: std::process::Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.fs).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status();
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
    }
}
