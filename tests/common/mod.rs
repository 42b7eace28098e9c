//! Shared harness for integration tests: start the real `tandem` binary on a temporary sparse
//! file and wait until it accepts connections; run external NBD clients.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod failover;
pub mod pair;

pub const MIB: u64 = 1 << 20;

pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    /// `unix:PATH` or `HOST:PORT`, as passed to `--listen`.
    pub listen: String,
    pub export: String,
}

pub struct ServerOpts<'a> {
    pub size: u64,
    pub export: &'a str,
    pub tcp: bool,
    pub extra: &'a [&'a str],
}

impl Default for ServerOpts<'_> {
    fn default() -> Self {
        Self {
            size: 64 * MIB,
            export: "",
            tcp: false,
            extra: &[],
        }
    }
}

pub fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

/// A free TCP port on 127.0.0.1, never the same twice in one test process. Ports come from
/// 20000..32000, below the kernel's ephemeral range, so outgoing connections cannot take them
/// between this check and the server binding them.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 12000;
    loop {
        let port = 20000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

impl Server {
    pub fn start(opts: ServerOpts) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        Self::start_on(dir, disk, opts)
    }

    /// Start on an existing directory and disk path (the disk may already hold data).
    pub fn start_on(dir: tempfile::TempDir, disk: PathBuf, opts: ServerOpts) -> Server {
        let listen = if opts.tcp {
            format!("127.0.0.1:{}", free_port())
        } else {
            format!("unix:{}", dir.path().join("nbd.sock").display())
        };
        let size = opts.size.to_string();
        let mut args = vec![
            "serve",
            "--disk",
            disk.to_str().unwrap(),
            "--listen",
            &listen,
            "--size",
            &size,
            "--export",
            opts.export,
        ];
        args.extend_from_slice(opts.extra);
        let child = Command::new(tandem_bin())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tandem");
        let server = Server {
            child,
            dir,
            disk,
            listen,
            export: opts.export.to_owned(),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = match self.listen.strip_prefix("unix:") {
                Some(p) => UnixStream::connect(p).is_ok(),
                None => std::net::TcpStream::connect(&self.listen).is_ok(),
            };
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tandem did not start listening on {}",
                self.listen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// NBD URI for libnbd tools and fio.
    pub fn uri(&self) -> String {
        match self.listen.strip_prefix("unix:") {
            Some(p) => format!("nbd+unix:///{}?socket={}", self.export, p),
            None => format!("nbd://{}/{}", self.listen, self.export),
        }
    }

    /// Filename for qemu-io / qemu-img (`-f raw`).
    pub fn qemu_target(&self) -> String {
        match self.listen.strip_prefix("unix:") {
            Some(p) => format!("nbd+unix:///{}?socket={}", self.export, p),
            None => format!("nbd://{}/{}", self.listen, self.export),
        }
    }

    pub fn socket_path(&self) -> Option<&str> {
        self.listen.strip_prefix("unix:")
    }

    /// Connect a raw stream (for protocol tests).
    pub fn connect_raw(&self) -> RawStream {
        match self.listen.strip_prefix("unix:") {
            Some(p) => RawStream::Unix(UnixStream::connect(p).unwrap()),
            None => RawStream::Tcp(std::net::TcpStream::connect(&self.listen).unwrap()),
        }
    }

    /// The server process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub enum RawStream {
    Tcp(std::net::TcpStream),
    Unix(UnixStream),
}

impl std::io::Read for RawStream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(b),
            Self::Unix(s) => s.read(b),
        }
    }
}

impl std::io::Write for RawStream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(b),
            Self::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl RawStream {
    pub fn set_read_timeout(&self, d: Duration) {
        match self {
            Self::Tcp(s) => s.set_read_timeout(Some(d)).unwrap(),
            Self::Unix(s) => s.set_read_timeout(Some(d)).unwrap(),
        }
    }
    pub fn shutdown_write(&self) {
        match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
        }
    }
}

/// Run an external program; panics with its output if it cannot be started.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed? see .ci/run)"));
    out
}

/// Run and require exit status 0; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a Python snippet with nbdsh (libnbd's shell); `h` is a fresh handle.
pub fn nbdsh(args: &[&str]) -> Output {
    run("nbdsh", args)
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), for test payloads.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
