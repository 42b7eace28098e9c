//! Failover test parts: a witness process, and the acknowledged-write checker
//! (`tools/ackcheck.py`) running in the background against a pair.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pair::Pair;
use super::{free_port, tandem_bin};

/// A `tandem witness` process that knows resource r0's secret.
pub struct Witness {
    child: Option<Child>,
    pub dir: PathBuf,
    pub addr: String,
    log: PathBuf,
}

impl Witness {
    /// Start a witness with its data under `dir/witness`, sharing `secret_file`.
    pub fn start(dir: &Path, secret_file: &Path) -> Witness {
        let data = dir.join("witness");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(secret_file, data.join("r0.secret")).unwrap();
        let mut w = Witness {
            child: None,
            dir: data,
            addr: format!("127.0.0.1:{}", free_port()),
            log: dir.join("witness.log"),
        };
        w.restart();
        w
    }

    /// (Re)start on the same address and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "witness already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tandem_bin())
            .args(["witness", "--listen", &self.addr, "--data"])
            .arg(&self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "witness did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal to the running witness (SIGSTOP / SIGCONT).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("witness running").id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// The `[failover]` section for a pair using this witness.
    pub fn failover_section(&self, lease: &str) -> String {
        format!(
            "[failover]\nfencing = \"witness\"\nwitness = \"{}\"\nlease = \"{lease}\"\n",
            self.addr
        )
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The acknowledged-write checker writing through whichever URI serves.
pub struct Checker {
    child: Child,
    stop: PathBuf,
    json: PathBuf,
    log: PathBuf,
}

pub fn checker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ackcheck.py")
}

impl Checker {
    /// Start writing `blocks` 4 KiB blocks through `uris` (tried in turn after a failure).
    pub fn start(dir: &Path, name: &str, uris: &[String], blocks: u64, qd: u32) -> Checker {
        let stop = dir.join(format!("{name}.stop"));
        let json = dir.join(format!("{name}.json"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(checker_script());
        for u in uris {
            cmd.args(["--uri", u]);
        }
        cmd.args(["--blocks", &blocks.to_string(), "--qd", &qd.to_string()])
            .args(["--reconnect-timeout", "60"])
            .arg("--stop-file")
            .arg(&stop)
            .arg("--json")
            .arg(&json)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        Checker {
            child,
            stop,
            json,
            log,
        }
    }

    /// Stop writing, let it verify every block, and return its summary (asserting it ran
    /// and found nothing lost or corrupt).
    pub fn finish(mut self) -> serde_json::Value {
        std::fs::write(&self.stop, "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "checker did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&self.json)
                .unwrap_or_else(|e| panic!("no checker summary ({e}); log:\n{log}")),
        )
        .unwrap();
        assert!(
            status.success() && summary["ok"] == true,
            "checker failed ({status}): {summary}\n{log}"
        );
        assert_eq!(summary["lost"], 0, "{summary}");
        assert_eq!(summary["corrupt"], 0, "{summary}");
        assert!(summary["acked"].as_u64().unwrap() > 0, "{summary}");
        summary
    }

    /// Acknowledgements so far are not visible until the end; this only checks it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tandem attach` process following the pair of `config`.
pub struct Attach {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Attach {
    pub fn start(config: &Path, dir: &Path) -> Attach {
        let port = free_port();
        let log = dir.join(format!("attach-{port}.log"));
        let child = Command::new(tandem_bin())
            .args(["attach", "-c"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "attach did not come up: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Attach { child, port, log }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/r0", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[net]` keys for failover tests: quick to notice a dead peer.
pub const NET: &str = "ping_timeout = \"500ms\"\n";
pub const LEASE: &str = "1s";

/// A witness and a started pair using it (alpha primary, in sync).
pub fn witnessed_pair(size: u64) -> (Pair, Witness) {
    witnessed_pair_with(size, NET, LEASE)
}

/// `witnessed_pair` with other `[net]` keys and lease.
pub fn witnessed_pair_with(size: u64, net: &str, lease: &str) -> (Pair, Witness) {
    let probe = tempfile::tempdir().unwrap();
    // The witness needs the secret the pair uses; Pair writes "test-secret\n".
    let secret = probe.path().join("secret");
    std::fs::write(&secret, "test-secret\n").unwrap();
    let w = Witness::start(probe.path(), &secret);
    let mut p = Pair::with_sections(size, net, &w.failover_section(lease), "");
    // Keep the witness's directory alive with the pair's.
    std::mem::forget(probe);
    p.up("alpha");
    p.up("beta");
    p.ok("alpha", &["primary", "--force"]);
    p.wait_in_sync(60);
    (p, w)
}

/// iptables rules dropping the replication traffic to and from one port, removed on drop.
pub struct LinkCut(u16);

impl LinkCut {
    fn rules(&self, op: &str) -> Vec<Vec<String>> {
        let port = self.0.to_string();
        ["--dport", "--sport"]
            .iter()
            .map(|dir| {
                [
                    "-w", op, "INPUT", "-i", "lo", "-p", "tcp", dir, &port, "-j", "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            })
            .collect()
    }

    fn apply(&self, op: &str) {
        for r in self.rules(op) {
            let out = std::process::Command::new("iptables")
                .args(&r)
                .output()
                .unwrap();
            assert!(
                out.status.success() || op == "-D",
                "iptables {r:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    pub fn cut(port: u16) -> LinkCut {
        let c = LinkCut(port);
        c.apply("-I");
        c
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        self.apply("-D");
    }
}

pub fn replication_port(p: &Pair, node: &str) -> u16 {
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    let start = cfg.find(&format!("name = \"{node}\"")).unwrap();
    let line = cfg[start..]
        .lines()
        .find(|l| l.starts_with("replication"))
        .unwrap();
    line.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap()
}
