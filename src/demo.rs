//! `tandem demo [--drill]`: a whole pair, a witness and an `attach` endpoint on loopback, with
//! sparse backing files in a temporary directory. `--drill` also runs a write load through
//! `attach`, kills the primary, shows the promotion, restarts the old primary, resyncs, fails
//! back, and proves that every acknowledged write is still there.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use nbd_wire::consts::*;
use nbd_wire::transmission::RequestHeader;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NODES: [&str; 2] = ["alpha", "beta"];
const BLOCK: usize = 4096;
/// Blocks the drill's load writes (the first 16 MiB of the volume).
const DRILL_BLOCKS: u64 = 4096;

pub struct Options {
    pub drill: bool,
    pub size: u64,
    pub dir: Option<PathBuf>,
}

/// The processes of the demo and where they live; everything stops and the directory goes
/// away when this is dropped (also on Ctrl-C and on errors).
struct Cluster {
    dir: PathBuf,
    keep_dir: bool,
    exe: PathBuf,
    config: PathBuf,
    procs: HashMap<&'static str, Child>,
    nbd: HashMap<&'static str, String>,
    attach: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.procs.values() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for (_, mut c) in self.procs.drain() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A free port below the kernel's ephemeral range (from 32768), so that no outgoing
/// connection takes it between this check and the child binding it; never the same twice.
fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 10_000;
    loop {
        let port = 10_000 + (base + NEXT.fetch_add(7, Ordering::Relaxed)) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

impl Cluster {
    fn create(opts: &Options) -> Result<Cluster, String> {
        let (dir, keep_dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                (d.clone(), true)
            }
            None => {
                let base = std::env::temp_dir().join(format!("tandem-demo.{}", std::process::id()));
                std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
                (base, false)
            }
        };
        let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let secret = dir.join("r0.secret");
        let mut key = [0u8; 24];
        getrandom::getrandom(&mut key).map_err(|e| e.to_string())?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&secret, &hex)?;
        let witness_dir = dir.join("witness");
        std::fs::create_dir_all(&witness_dir).map_err(|e| e.to_string())?;
        write_private(&witness_dir.join("r0.secret"), &hex)?;
        let witness = format!("127.0.0.1:{}", free_port());
        let mut nbd = HashMap::new();
        let mut nodes = String::new();
        for n in NODES {
            let addr = format!("127.0.0.1:{}", free_port());
            nodes += &format!(
                "[[node]]\nname = \"{n}\"\ndisk = \"{d}/{n}.img\"\nmeta = \"{d}/{n}.meta\"\n\
                 replication = \"127.0.0.1:{}\"\nnbd = \"{addr}\"\ncontrol = \"{d}/{n}.sock\"\n\n",
                free_port(),
                d = dir.display()
            );
            nbd.insert(n, addr);
        }
        let config = dir.join("r0.toml");
        std::fs::write(
            &config,
            format!(
                "[resource]\nname = \"r0\"\n\n{nodes}[net]\nsecret_file = \"{}\"\n\n\
                 [failover]\nfencing = \"witness\"\nwitness = \"{witness}\"\nlease = \"2s\"\n",
                secret.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut c = Cluster {
            dir: dir.clone(),
            keep_dir,
            exe,
            config,
            procs: HashMap::new(),
            nbd,
            attach: format!("127.0.0.1:{}", free_port()),
        };
        for n in NODES {
            c.run(&[
                "create-md",
                "-n",
                n,
                "--force",
                "--size",
                &opts.size.to_string(),
            ])?;
        }
        let wd = witness_dir.display().to_string();
        c.spawn("witness", &["witness", "--listen", &witness, "--data", &wd])?;
        Ok(c)
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let (cmd, rest) = args.split_first().expect("a command");
        let out = Command::new(&self.exe)
            .arg(cmd)
            .arg("-c")
            .arg(&self.config)
            .args(rest)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "tandem {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self, name: &'static str, args: &[&str]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Own process group: Ctrl-C reaches the demo, which stops them in order.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        self.procs.insert(name, child);
        Ok(())
    }

    fn up(&mut self, node: &'static str) -> Result<(), String> {
        let cfg = self.config.display().to_string();
        self.spawn(node, &["up", "-c", &cfg, "-n", node])?;
        let sock = self.dir.join(format!("{node}.sock"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let exited = self
                .procs
                .get_mut(node)
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                // The directory may be removed on the way out: say what the log said.
                let log = std::fs::read_to_string(self.dir.join(format!("{node}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "{node} did not come up ({}): {}",
                    exited.map_or("timed out".into(), |s| s.to_string()),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill9(&mut self, node: &str) {
        if let Some(mut c) = self.procs.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn status(&self, node: &str) -> Option<Value> {
        let r = crate::control::request(
            &self.dir.join(format!("{node}.sock")),
            &json!({"cmd": "status"}),
        )
        .await
        .ok()?;
        Some(r["result"].clone())
    }

    async fn wait(
        &self,
        what: &str,
        secs: u64,
        pred: impl Fn(&Value, &Value) -> bool,
    ) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            let a = self.status("alpha").await.unwrap_or(Value::Null);
            let b = self.status("beta").await.unwrap_or(Value::Null);
            if pred(&a, &b) {
                return Ok(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(secs) {
                return Err(format!("timed out waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_in_sync(&self, secs: u64) -> Result<Duration, String> {
        self.wait("both nodes UpToDate and in sync", secs, |a, b| {
            [a, b].iter().all(|s| {
                s["connection"] == "Connected"
                    && s["disk"] == "UpToDate"
                    && s["out_of_sync_bytes"] == 0
                    && s["failover"]["peer_outdated"] != true
            })
        })
        .await
    }

    async fn primary(&self) -> Option<&'static str> {
        for n in NODES {
            if self.status(n).await.is_some_and(|s| s["role"] == "primary") {
                return Some(n);
            }
        }
        None
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| e.to_string())
}

fn phase(name: &str, took: Duration) {
    println!("  {name:<48} {:>8.2} s", took.as_secs_f64());
}

pub async fn run(opts: Options) -> Result<(), String> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let mut cluster = Cluster::create(&opts)?;
    let work = async {
        let t = Instant::now();
        cluster.up("alpha")?;
        cluster.up("beta")?;
        cluster.run(&["primary", "-n", "alpha", "--force"])?;
        cluster.wait_in_sync(600).await?;
        let cfg = cluster.config.display().to_string();
        let attach = cluster.attach.clone();
        cluster.spawn("attach", &["attach", "-c", &cfg, "--listen", &attach])?;
        wait_tcp(&attach).await?;
        println!("tandem demo in {}", cluster.dir.display());
        println!("  config:   {}", cluster.config.display());
        println!("  primary:  alpha, nbd://{}/r0", cluster.nbd["alpha"]);
        println!("  follows the primary: nbd://{attach}/r0 (tandem attach)");
        phase("pair up, initial sync, attach ready", t.elapsed());
        if opts.drill {
            drill(&mut cluster).await
        } else {
            println!("  try: qemu-io -f raw nbd://{attach}/r0 -c 'write -P 7 0 1M'");
            println!(
                "       tandem status -c {} -n alpha --watch",
                cluster.config.display()
            );
            println!("Ctrl-C stops everything and removes the directory.");
            watch(&cluster).await
        }
    };
    let flag = interrupted.clone();
    let r = tokio::select! {
        r = work => r,
        _ = crate::signals::wait_for_signal() => {
            flag.store(true, Ordering::Relaxed);
            Ok(())
        }
    };
    drop(cluster);
    if interrupted.load(Ordering::Relaxed) {
        println!("stopped; cleaned up");
    }
    r
}

async fn watch(c: &Cluster) -> Result<(), String> {
    loop {
        let mut line = String::new();
        for n in NODES {
            match c.status(n).await {
                Some(s) => {
                    line += &format!(
                        "{n}: {} {} {} epoch {}   ",
                        s["role"].as_str().unwrap_or("?"),
                        s["disk"].as_str().unwrap_or("?"),
                        s["connection"].as_str().unwrap_or("?"),
                        s["epoch"]
                    )
                }
                None => line += &format!("{n}: down   "),
            }
        }
        println!("{line}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn wait_tcp(addr: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// What the load wrote: per block, the last acknowledged version and the highest issued.
#[derive(Default)]
struct Ledger {
    acked: HashMap<u64, u64>,
    issued: HashMap<u64, u64>,
    writes: u64,
    errors: u64,
    last_ack: Option<Instant>,
    longest_gap: Duration,
}

fn pattern(block: u64, version: u64) -> BytesMut {
    let mut b = BytesMut::with_capacity(BLOCK);
    while b.len() < BLOCK {
        b.put_u64_le(0x5444_4d44_5249_4c4c); // "TDMDRILL"
        b.put_u64_le(block);
        b.put_u64_le(version);
        b.put_u64_le(block ^ version.rotate_left(17));
    }
    b
}

/// An NBD request header for one whole block.
fn block_request(kind: u16, cookie: u64, block: u64) -> BytesMut {
    let mut req = BytesMut::with_capacity(28 + BLOCK);
    RequestHeader {
        flags: 0,
        kind,
        cookie,
        offset: block * BLOCK as u64,
        length: BLOCK as u32,
    }
    .encode(&mut req);
    req
}

/// Write versioned blocks through `attach` one at a time until `stop`, recording every
/// acknowledgement (a simple NBD client: the point is what was acknowledged, not speed).
async fn load(
    addr: String,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let (mut s, _, _) = crate::attach::negotiate(&addr, "r0")
        .await
        .map_err(|e| format!("load: {e}"))?;
    let mut version = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let block = rng % DRILL_BLOCKS;
        version += 1;
        ledger.lock().unwrap().issued.insert(block, version);
        let mut req = block_request(CMD_WRITE, version, block);
        req.extend_from_slice(&pattern(block, version));
        s.write_all(&req).await.map_err(|e| format!("load: {e}"))?;
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply)
            .await
            .map_err(|e| format!("load: {e}"))?;
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let mut l = ledger.lock().unwrap();
        l.writes += 1;
        if error != 0 {
            l.errors += 1;
            continue;
        }
        let now = Instant::now();
        if let Some(prev) = l.last_ack {
            l.longest_gap = l.longest_gap.max(now - prev);
        }
        l.last_ack = Some(now);
        l.acked.insert(block, version);
    }
    Ok(())
}

/// Read back every acknowledged block through `attach`: it must hold its last acknowledged
/// version, or a later one that was issued. Returns the number of lost blocks.
async fn verify(addr: &str, ledger: &Ledger) -> Result<u64, String> {
    let (mut s, _, _) = crate::attach::negotiate(addr, "r0")
        .await
        .map_err(|e| format!("verify: {e}"))?;
    let mut lost = 0;
    for (&block, &acked) in &ledger.acked {
        let req = block_request(CMD_READ, block, block);
        s.write_all(&req).await.map_err(|e| e.to_string())?;
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
        let mut data = vec![0u8; BLOCK];
        s.read_exact(&mut data).await.map_err(|e| e.to_string())?;
        let found = u64::from_le_bytes(data[16..24].try_into().unwrap());
        let whole = pattern(block, found);
        let issued = ledger.issued.get(&block).copied().unwrap_or(0);
        if data[..] != whole[..] || found < acked || found > issued {
            lost += 1;
            if lost <= 5 {
                println!("  LOST block {block}: acknowledged version {acked}, found {found}");
            }
        }
    }
    Ok(lost)
}

async fn drill(c: &mut Cluster) -> Result<(), String> {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(load(c.attach.clone(), ledger.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes_before = ledger.lock().unwrap().writes;
    println!("drill: writing through attach ({writes_before} writes so far)");

    let old = c.primary().await.ok_or("no primary")?;
    let new = if old == "alpha" { "beta" } else { "alpha" };
    let killed = Instant::now();
    c.kill9(old);
    let promoted = c
        .wait(&format!("{new} to promote"), 30, |a, b| {
            let s = if new == "alpha" { a } else { b };
            s["role"] == "primary"
        })
        .await?;
    phase(&format!("kill -9 {old} -> {new} promoted"), promoted);
    loop {
        let acked_since = ledger
            .lock()
            .unwrap()
            .last_ack
            .is_some_and(|t| t > killed + promoted);
        if acked_since || killed.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    phase(
        "kill -9 -> first write acknowledged after it",
        killed.elapsed(),
    );

    let t = Instant::now();
    c.up(old)?;
    let synced = c.wait_in_sync(300).await?;
    phase(
        &format!("{old} restarted and resynced as secondary"),
        t.elapsed().max(synced),
    );

    let t = Instant::now();
    c.run(&["switchover", "--to", old])?;
    phase(&format!("switchover back to {old} (failback)"), t.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    loader.await.map_err(|e| e.to_string())??;
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    let t = Instant::now();
    let lost = verify(&c.attach, &l).await?;
    phase("read back every acknowledged block", t.elapsed());
    println!(
        "drill: {} writes, {} acknowledged blocks checked, {} errors seen by the client, longest gap between acknowledgements {} ms",
        l.writes,
        l.acked.len(),
        l.errors,
        l.longest_gap.as_millis()
    );
    if lost == 0 && l.errors == 0 {
        println!("verdict: PASS: nothing acknowledged was lost, and the client saw no error");
        Ok(())
    } else {
        Err(format!(
            "verdict: FAIL: {lost} acknowledged block(s) lost, {} client error(s)",
            l.errors
        ))
    }
}
