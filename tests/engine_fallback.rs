//! The thread-pool engine takes over, with one log line saying why, where io_uring is refused.
//! The refusal is real: tandem runs under a seccomp filter that fails `io_uring_setup` with
//! EPERM, as container runtimes' default profiles do.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Install a seccomp filter in the child: `io_uring_setup` → EPERM, everything else allowed.
fn deny_io_uring(cmd: &mut Command) {
    // SAFETY: pre_exec runs between fork and exec; it only calls prctl, which is
    // async-signal-safe, on data that lives in this closure.
    unsafe {
        cmd.pre_exec(|| {
            const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
            let filter = [
                // A = seccomp_data.arch; foreign architectures are let through untouched.
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 4,
                },
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 3,
                    k: AUDIT_ARCH_X86_64,
                },
                // A = seccomp_data.nr
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_io_uring_setup as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x0005_0000 | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                },
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    2, /* SECCOMP_MODE_FILTER */
                    &prog as *const _,
                    0,
                    0,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_denied_io_uring_falls_back_to_threads_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    let mut cmd = Command::new(tandem_bin());
    cmd.args(["serve", "--disk", disk.to_str().unwrap(), "--size", "16M"])
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    deny_io_uring(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let info = run_ok("nbdinfo", &["--json", &uri]);
    assert!(
        info.contains("(threads)"),
        "description should name the engine: {info}"
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x3c 0 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0x3c 0 1M",
        ],
    );
    assert!(!out.contains("failed"), "{out}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let log = lines.join().unwrap();
    let why: Vec<_> = log
        .iter()
        .filter(|l| l.contains("io_uring unavailable"))
        .collect();
    assert_eq!(
        why.len(),
        1,
        "exactly one line saying why; log:\n{}",
        log.join("\n")
    );
    assert!(
        why[0].contains("disabled") || why[0].contains("seccomp"),
        "{}",
        why[0]
    );
    assert_eq!(
        std::fs::read(&disk).unwrap()[..1 << 20],
        vec![0x3c; 1 << 20][..]
    );
}

#[test]
fn forced_io_uring_engine_serves() {
    let s = Server::start(ServerOpts {
        extra: &["--engine", "io-uring"],
        ..Default::default()
    });
    let info = run_ok("nbdinfo", &["--json", &s.uri()]);
    assert!(info.contains("(io_uring)"), "{info}");
}
