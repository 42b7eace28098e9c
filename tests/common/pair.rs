//! A replicated pair of real `tandem up` processes on loopback, for integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, tandem_bin, MIB};

pub const NODES: [&str; 2] = ["alpha", "beta"];

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub size: u64,
    procs: HashMap<&'static str, Child>,
    nbd_ports: HashMap<&'static str, u16>,
}

impl Pair {
    /// Write a config (with `extra` TOML appended) and create metadata on both nodes.
    pub fn new(size: u64, extra: &str) -> Pair {
        Self::with_sections(
            size,
            "ping_timeout = \"1s\"\n",
            "[failover]\nfencing = \"none\"\n",
            extra,
        )
    }

    /// Like `new`, with extra `[net]` keys and a whole `[failover]` section.
    pub fn with_sections(size: u64, net: &str, failover: &str, extra: &str) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("secret"), "test-secret\n").unwrap();
        let mut nodes = String::new();
        let mut nbd_ports = HashMap::new();
        for n in NODES {
            let nbd = free_port();
            nbd_ports.insert(n, nbd);
            nodes += &format!(
                "[[node]]\nname = \"{n}\"\ndisk = \"{d}/{n}.img\"\nmeta = \"{d}/{n}.meta\"\n\
                 replication = \"127.0.0.1:{}\"\nnbd = \"127.0.0.1:{nbd}\"\ncontrol = \"{d}/{n}.sock\"\n\n",
                free_port(),
                d = d.display()
            );
        }
        let config = d.join("r0.toml");
        let text = format!(
            "[resource]\nname = \"r0\"\n\n{nodes}[net]\nsecret_file = \"{}/secret\"\nping_interval = \"100ms\"\n\
             {net}connect_interval = \"100ms\"\n\n{failover}\n{extra}\n",
            d.display()
        );
        std::fs::write(&config, text).unwrap();
        let pair = Pair {
            dir,
            config,
            size,
            procs: HashMap::new(),
            nbd_ports,
        };
        for n in NODES {
            pair.ok(n, &["create-md", "--size", &size.to_string()]);
        }
        pair
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn disk(&self, node: &str) -> PathBuf {
        self.path(&format!("{node}.img"))
    }

    pub fn uri(&self, node: &str) -> String {
        format!("nbd://127.0.0.1:{}/r0", self.nbd_ports[node])
    }

    /// Run `tandem CMD -c CONFIG -n NODE ARGS...`.
    pub fn tandem(&self, node: &str, args: &[&str]) -> Output {
        self.command(node, args).output().unwrap()
    }

    /// `tandem CMD -c CONFIG -n NODE ARGS...`, not started.
    fn command(&self, node: &str, args: &[&str]) -> Command {
        let (cmd, rest) = args.split_first().unwrap();
        let mut c = Command::new(tandem_bin());
        c.arg(cmd)
            .arg("-c")
            .arg(&self.config)
            .arg("-n")
            .arg(node)
            .args(rest);
        c
    }

    /// Like `tandem`, but gives up after `secs` (None): a hung node must fail a test, not
    /// hang it.
    pub fn tandem_within(&self, node: &str, args: &[&str], secs: u64) -> Option<Output> {
        let mut child = self
            .command(node, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(child.wait_with_output().unwrap())
    }

    pub fn ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.tandem(node, args);
        assert!(
            out.status.success(),
            "tandem {args:?} on {node} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn up(&mut self, node: &'static str) {
        self.up_with(node, &[]);
    }

    /// `up` with extra arguments for `tandem up`.
    pub fn up_with(&mut self, node: &'static str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{node}.log")))
            .unwrap();
        let child = Command::new(tandem_bin())
            .args(["up", "-c"])
            .arg(&self.config)
            .args(["-n", node])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.insert(node, child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.path(&format!("{node}.sock"))).is_err() {
            assert!(
                Instant::now() < deadline,
                "{node} did not come up:\n{}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{node}.log"))).unwrap_or_default()
    }

    pub fn running(&self, node: &str) -> bool {
        self.procs.contains_key(node)
    }

    pub fn nbd_port(&self, node: &str) -> u16 {
        self.nbd_ports[node]
    }

    pub fn pid(&self, node: &str) -> i32 {
        self.procs[node].id() as i32
    }

    pub fn kill9(&mut self, node: &str) {
        let mut c = self.procs.remove(node).expect("node running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self, node: &str) -> Option<i32> {
        let mut c = self.procs.remove(node).expect("node running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap().code()
    }

    pub fn status(&self, node: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(node, &["status", "--json"])).unwrap()
    }

    /// `tandem dump-md --json` of `node`'s metadata file, as the file holds it now.
    pub fn dump_md(&self, node: &str) -> serde_json::Value {
        let meta = self.path(&format!("{node}.meta"));
        let out = std::process::Command::new(super::tandem_bin())
            .args(["dump-md", "--json"])
            .arg(meta)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Poll `status` until `pred` holds.
    pub fn wait_for(
        &self,
        node: &str,
        what: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(node);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{node}: timed out waiting for {what}; status {s}\nlog alpha:\n{}\nlog beta:\n{}",
                self.log("alpha"),
                self.log("beta")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Both nodes Connected and UpToDate with nothing out of sync.
    pub fn wait_in_sync(&self, secs: u64) {
        for n in NODES {
            self.wait_for(n, "Connected and UpToDate", secs, |s| {
                s["connection"] == "Connected"
                    && s["disk"] == "UpToDate"
                    && s["peer"]["disk"] == "UpToDate"
                    && s["out_of_sync_bytes"] == 0
                    && s["failover"]["peer_outdated"] != true
            });
        }
    }

    /// Fresh pair: both up, alpha forced primary, initial full sync done.
    pub fn started(size: u64, extra: &str) -> Pair {
        let mut p = Pair::new(size, extra);
        p.up("alpha");
        p.up("beta");
        p.ok("alpha", &["primary", "--force"]);
        p.wait_in_sync(60);
        p
    }

    /// Assert the two backing files are byte-identical.
    pub fn assert_identical(&self) {
        let a = std::fs::read(self.disk("alpha")).unwrap();
        let b = std::fs::read(self.disk("beta")).unwrap();
        assert_eq!(a.len(), b.len());
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("copies differ first at byte {i} (block {})", i / 4096);
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for (_, c) in self.procs.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f".to_string(), "raw".to_string(), uri.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).to_string());
    }
    Command::new("qemu-io").args(&args).output().unwrap()
}

pub fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let out = qemu_io(uri, cmds);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
}

pub const M: u64 = MIB;
