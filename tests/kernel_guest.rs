//! The Linux kernel's own NBD client through `tandem attach --device`, across a kill -9 of
//! the primary and then a SIGSTOP of the next one. This host's kernel has no nbd module, so the client runs in a QEMU guest
//! booting Debian's cloud kernel (tools/guest/build.sh); the guest reaches the pair on the
//! host's loopback through QEMU's user networking (10.0.2.2). The guest script is
//! tools/guest/kernel-failover.sh.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::failover::witnessed_pair;
use common::pair::{Pair, M};
use common::tandem_bin;

/// A booted guest: its console lines as they arrive, and its serial input.
struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    console: Arc<Mutex<String>>,
    stderr: PathBuf,
}

impl Guest {
    fn boot(dir: &Path, stderr: PathBuf) -> Guest {
        let mut child = Command::new(dir.join("qemu"))
            .args(["-accel", "tcg", "-m", "512", "-smp", "1"])
            .args(["-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(dir.join("initrd"))
            .args(["-append", "console=ttyS0 quiet panic=1"])
            .args(["-netdev", "user,id=n0"])
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start qemu");
        let out = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let c = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                let line = strip_ansi(&String::from_utf8_lossy(&line));
                c.lock().unwrap().push_str(&line);
                c.lock().unwrap().push('\n');
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            stdin: child.stdin.take(),
            child,
            lines,
            console,
            stderr,
        }
    }

    /// The first console line containing one of `markers`, or why there was none.
    fn wait_for(&self, markers: &[&str], within: Duration) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if markers.iter().any(|m| l.contains(m)) => return Ok(l),
                Ok(l) if l.contains("GUEST: FAIL") || l.contains("Kernel panic") => {
                    return Err(format!("the guest failed: {l}"))
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("no {markers:?} within {within:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the guest stopped before {markers:?}"))
                }
            }
        }
    }

    fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.flush().unwrap();
    }

    /// Console and QEMU's own messages, for failure reports.
    fn transcript(&self) -> String {
        format!(
            "--- guest console ---\n{}\n--- qemu stderr ---\n{}",
            self.console.lock().unwrap(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Console text without terminal escape sequences (tracing colours its output on a tty).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn ext4_on_the_kernel_nbd_client_survives_a_kill9_and_a_stop_of_the_primary() {
    let started = Instant::now();
    let (mut p, _w) = witnessed_pair(64 * M);

    // The guest's files: the pair's config with the host as QEMU's guest sees it, and the
    // test script.
    let overlay = p.path("guest-overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let config = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("127.0.0.1:", "10.0.2.2:");
    std::fs::write(overlay.join("config.toml"), config).unwrap();
    std::fs::copy(
        repo().join("tools/guest/kernel-failover.sh"),
        overlay.join("test.sh"),
    )
    .unwrap();

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest");
    let build = Command::new("bash")
        .arg(repo().join("tools/guest/build.sh"))
        .arg(&out)
        .arg(tandem_bin())
        .arg(&overlay)
        .output()
        .expect("run tools/guest/build.sh");
    assert!(
        build.status.success(),
        "cannot build the guest (it needs Debian's linux-image-*-cloud-amd64, busybox-static \
         and qemu-system-x86 through apt, cpio and root):\n{}",
        String::from_utf8_lossy(&build.stderr)
    );

    let mut g = Guest::boot(&out, p.path("qemu.stderr"));
    let logs = |p: &Pair| {
        format!(
            "--- alpha ---\n{}\n--- beta ---\n{}",
            p.log("alpha"),
            p.log("beta")
        )
    };
    let expect = |g: &Guest, p: &Pair, marker: &str, secs: u64| {
        if let Err(why) = g.wait_for(&[marker], Duration::from_secs(secs)) {
            // Let the guest print its kernel log before it powers off.
            std::thread::sleep(Duration::from_secs(2));
            panic!("{why}\n{}\n{}", g.transcript(), logs(p));
        }
    };
    let mut marks = vec![("built", started.elapsed())];

    // Round 1: kill -9 of the primary. Its sockets close, the kernel reports the link dead.
    expect(&g, &p, "GUEST: WRITING round 1", 120);
    marks.push(("writing", started.elapsed()));
    std::thread::sleep(Duration::from_millis(300));
    p.kill9("alpha");
    p.wait_for("beta", "promotion", 30, |s| s["role"] == "primary");
    marks.push(("beta promoted", started.elapsed()));
    expect(&g, &p, "/dev/nbd0 reconnected to beta", 60);
    marks.push(("guest on beta", started.elapsed()));
    // The guest keeps writing through the new primary for a while.
    std::thread::sleep(Duration::from_secs(2));
    g.send("again\n");

    // Round 2: the primary stops answering but its connection stays open. Only the kernel's
    // request timeout notices; then it reports the link dead too.
    expect(&g, &p, "GUEST: WRITING round 2", 60);
    p.up("alpha");
    p.wait_in_sync(60);
    marks.push(("alpha back in sync", started.elapsed()));
    let beta = nix::unistd::Pid::from_raw(p.pid("beta"));
    nix::sys::signal::kill(beta, nix::sys::signal::Signal::SIGSTOP).unwrap();
    p.wait_for("alpha", "promotion", 30, |s| s["role"] == "primary");
    marks.push(("alpha promoted", started.elapsed()));
    expect(&g, &p, "/dev/nbd0 reconnected to alpha", 60);
    marks.push(("guest on alpha", started.elapsed()));
    // Writes reach alpha while beta is still stopped, so the copies diverge.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.log("alpha").contains("writing without the peer") {
        assert!(
            Instant::now() < deadline,
            "no write reached alpha while beta was stopped\n{}\n{}",
            g.transcript(),
            logs(&p)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    g.send("done\n");

    let end = g.wait_for(&["GUEST: PASS"], Duration::from_secs(150));
    if end.is_err() {
        std::thread::sleep(Duration::from_secs(2));
    }
    let transcript = g.transcript();
    if let Err(why) = end {
        panic!("{why}\n{transcript}\n{}", logs(&p));
    }
    marks.push(("verified", started.elapsed()));
    assert!(
        g.wait_exit(Duration::from_secs(30)),
        "the guest did not power off:\n{transcript}"
    );
    // The stopped old primary is killed rather than resumed (resuming races its own
    // demotion; that is the pair's business, not the kernel client's), rejoins and resyncs:
    // both copies then hold what the guest wrote.
    p.kill9("beta");
    p.up("beta");
    p.wait_in_sync(60);
    p.assert_identical();
    // The lines that tell the story, for `cargo test -- --nocapture`.
    for l in transcript
        .lines()
        .filter(|l| l.starts_with("GUEST:") || l.contains("/dev/nbd0") || l.contains("link dead"))
    {
        eprintln!("{l}");
    }
    eprintln!(
        "{}",
        marks
            .iter()
            .map(|(what, t)| format!("{what} at {:.1}s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
