//! Black-box tests of `tandem serve` with real NBD clients: qemu-io, qemu-img, nbdinfo,
//! nbdcopy, nbdsh (python3-libnbd), fio's nbd engine and nbdfuse.
//!
//! Every test starts its own server (via `tests/common`) and checks real outcomes: data read
//! back (through NBD and directly from the disk file on the host), exit codes and errno
//! values. Every external program runs under `timeout`, so a hung server fails the test
//! instead of hanging the suite.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{pattern, Server, ServerOpts, MIB};

const KIB: u64 = 1024;
const PATH_ENV: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// Upper bound for any single client invocation.
const CLIENT_TIMEOUT_S: u32 = 90;

// errno values as libnbd reports them (Linux).
const EPERM: i64 = 1;
const ENOENT: i64 = 2;
const EIO: i64 = 5;
const EINVAL: i64 = 22;
const ENOSPC: i64 = 28;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Run `program args` under `timeout` (exit 124 on timeout), in `cwd` if given.
fn exec_in(cwd: Option<&Path>, program: &str, args: &[&str]) -> Output {
    let limit = CLIENT_TIMEOUT_S.to_string();
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &limit, program])
        .args(args)
        .env("PATH", PATH_ENV)
        .stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn exec(program: &str, args: &[&str]) -> Output {
    exec_in(None, program, args)
}

fn describe(program: &str, args: &[&str], out: &Output) -> String {
    format!(
        "{program} {args:?} -> {}{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        if out.status.code() == Some(124) {
            " (TIMED OUT)"
        } else {
            ""
        },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run and require exit status 0; returns stdout.
fn exec_ok(program: &str, args: &[&str]) -> String {
    let out = exec(program, args);
    assert!(
        out.status.success(),
        "command failed: {}",
        describe(program, args, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stdout_stderr(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Python prelude for nbdsh scripts: `err(f)` returns 0 or the errno of an `nbd.Error`;
/// `out(k, v)` prints `k=v` for the Rust side to check.
const PY_PRELUDE: &str = r#"
import errno, os, sys
def err(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        return e.errnum
def out(k, v):
    print(f"{k}={v}", flush=True)
"#;

fn nbdsh_args(setup: &[&str], uri: &str, script: &str) -> Vec<String> {
    let mut args = vec!["-c".to_string(), PY_PRELUDE.to_string()];
    for s in setup {
        args.push("-c".into());
        args.push(s.to_string());
    }
    args.push("-c".into());
    args.push(format!("h.connect_uri({uri:?})"));
    args.push("-c".into());
    args.push(script.to_string());
    args
}

/// Run an nbdsh script on a handle connected to `uri` (after the `setup` statements);
/// requires success and returns stdout.
fn nbdsh_ok(setup: &[&str], uri: &str, script: &str) -> String {
    let args = nbdsh_args(setup, uri, script);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    exec_ok("nbdsh", &args)
}

/// Parse `key=value` lines.
fn kv(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn kv_get<'a>(m: &'a HashMap<String, String>, k: &str) -> &'a str {
    m.get(k)
        .unwrap_or_else(|| panic!("script did not report {k:?}; got {m:?}"))
}

fn kv_errno(m: &HashMap<String, String>, k: &str) -> i64 {
    kv_get(m, k)
        .parse()
        .unwrap_or_else(|_| panic!("{k} is not a number: {m:?}"))
}

fn read_host(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Create a disk file of `size` bytes holding `data` at offset 0 (for read-only servers,
/// which refuse to create or extend their disk).
fn make_disk(dir: &tempfile::TempDir, size: u64, data: &[u8]) -> PathBuf {
    let disk = dir.path().join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(data, 0).unwrap();
    disk
}

/// Wait for a child to exit, at most `limit`; None if it is still running.
fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: data differs at byte {i} (lengths {} vs {}; got {:?}, want {:?})",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

// ---- a small JSON reader for nbdinfo / qemu-img output ----------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(s: &str) -> Json {
        let b = s.as_bytes();
        let mut i = 0;
        let v = json_value(b, &mut i);
        json_ws(b, &mut i);
        assert_eq!(i, b.len(), "trailing data after JSON value in {s:?}");
        v
    }
    fn get(&self, k: &str) -> &Json {
        match self {
            Json::Obj(m) => m
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("JSON key {k:?} missing in {self:?}")),
            _ => panic!("not a JSON object (looking for {k:?}): {self:?}"),
        }
    }
    fn has(&self, k: &str) -> bool {
        matches!(self, Json::Obj(m) if m.iter().any(|(key, _)| key == k))
    }
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => panic!("not a JSON array: {self:?}"),
        }
    }
    fn u64(&self) -> u64 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("not an integer: {n}")),
            _ => panic!("not a JSON number: {self:?}"),
        }
    }
    fn bool(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            _ => panic!("not a JSON bool: {self:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            _ => panic!("not a JSON string: {self:?}"),
        }
    }
}

fn json_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn json_value(b: &[u8], i: &mut usize) -> Json {
    json_ws(b, i);
    assert!(*i < b.len(), "unexpected end of JSON");
    match b[*i] {
        b'{' => {
            *i += 1;
            let mut m = Vec::new();
            loop {
                json_ws(b, i);
                if b[*i] == b'}' {
                    *i += 1;
                    return Json::Obj(m);
                }
                let k = match json_value(b, i) {
                    Json::Str(s) => s,
                    other => panic!("JSON object key is not a string: {other:?}"),
                };
                json_ws(b, i);
                assert_eq!(b[*i], b':', "expected ':' in JSON at {}", *i);
                *i += 1;
                let v = json_value(b, i);
                m.push((k, v));
                json_ws(b, i);
                if b[*i] == b',' {
                    *i += 1;
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut a = Vec::new();
            loop {
                json_ws(b, i);
                if b[*i] == b']' {
                    *i += 1;
                    return Json::Arr(a);
                }
                a.push(json_value(b, i));
                json_ws(b, i);
                if b[*i] == b',' {
                    *i += 1;
                }
            }
        }
        b'"' => {
            *i += 1;
            let mut s = Vec::new();
            while b[*i] != b'"' {
                if b[*i] == b'\\' {
                    *i += 1;
                    match b[*i] {
                        b'n' => s.push(b'\n'),
                        b't' => s.push(b'\t'),
                        b'r' => s.push(b'\r'),
                        b'u' => {
                            let hex = std::str::from_utf8(&b[*i + 1..*i + 5]).unwrap();
                            let c = char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                .unwrap_or('?');
                            let mut tmp = [0u8; 4];
                            s.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                            *i += 4;
                        }
                        c => s.push(c),
                    }
                } else {
                    s.push(b[*i]);
                }
                *i += 1;
            }
            *i += 1;
            Json::Str(String::from_utf8_lossy(&s).into_owned())
        }
        b't' if b[*i..].starts_with(b"true") => {
            *i += 4;
            Json::Bool(true)
        }
        b'f' if b[*i..].starts_with(b"false") => {
            *i += 5;
            Json::Bool(false)
        }
        b'n' if b[*i..].starts_with(b"null") => {
            *i += 4;
            Json::Null
        }
        _ => {
            let start = *i;
            while *i < b.len()
                && (b[*i] == b'-'
                    || b[*i] == b'+'
                    || b[*i] == b'.'
                    || b[*i] == b'e'
                    || b[*i] == b'E'
                    || b[*i].is_ascii_digit())
            {
                *i += 1;
            }
            assert!(
                *i > start,
                "bad JSON at byte {start}: {:?}",
                String::from_utf8_lossy(&b[start..])
            );
            Json::Num(String::from_utf8_lossy(&b[start..*i]).into_owned())
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. qemu-io pattern session
// ---------------------------------------------------------------------------------------

fn qemu_io_session(server: &Server) {
    let target = server.qemu_target();
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "read -P 0 1M 1M",
        // WRITE_ZEROES over data (NO_HOLE set), then may-trim zeroes over data
        "write -P 0xee 2M 1M",
        "write -z 2M 1M",
        "read -P 0 2M 1M",
        "write -P 0xee 6M 1M",
        "write -z -u 6M 1M",
        "read -P 0 6M 1M",
        // FUA write
        "write -f -P 0xcd 4M 64k",
        "read -P 0xcd 4M 64k",
        "flush",
        // TRIM over data punches a hole that reads back as zeroes
        "write -P 0x55 8M 1M",
        "discard 8M 1M",
        "read -P 0 8M 1M",
        // pipelined writes + flush
        "aio_write -P 0x11 10M 64k",
        "aio_write -P 0x22 11M 64k",
        "aio_flush",
        "read -P 0x11 10M 64k",
        "read -P 0x22 11M 64k",
        // unaligned small write within a block
        "write -P 0x77 12582913 511",
        "read -P 0x77 12582913 511",
        "read -P 0 12M 1",
        "read -P 0 12583424 3584",
        "flush",
    ];
    let mut args: Vec<&str> = vec!["-f", "raw", &target];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let out = exec("qemu-io", &args);
    let text = stdout_stderr(&out);
    assert!(
        out.status.success(),
        "qemu-io session failed: {}",
        describe("qemu-io", &args, &out)
    );
    assert!(
        !text.contains("verification failed"),
        "pattern verification failed:\n{text}"
    );
    assert!(
        !text.contains("failed"),
        "a qemu-io command failed:\n{text}"
    );
    // qemu-io prints one "wrote"/"read" line per completed request.
    let count = |p: &str| text.lines().filter(|l| l.starts_with(p)).count();
    assert_eq!(count("wrote "), 10, "expected 10 completed writes:\n{text}");
    assert_eq!(count("read "), 11, "expected 11 completed reads:\n{text}");
    assert_eq!(
        count("discard "),
        1,
        "expected 1 completed discard:\n{text}"
    );

    // And the data is in the disk file on the host.
    assert_same(
        "host 0..1M",
        &read_host(&server.disk, 0, MIB as usize),
        &vec![0xab; MIB as usize],
    );
    assert_same(
        "host 2M (zeroed)",
        &read_host(&server.disk, 2 * MIB, MIB as usize),
        &vec![0; MIB as usize],
    );
    assert_same(
        "host 4M (FUA)",
        &read_host(&server.disk, 4 * MIB, 65536),
        &vec![0xcd; 65536],
    );
    assert_same(
        "host 6M (zeroed)",
        &read_host(&server.disk, 6 * MIB, MIB as usize),
        &vec![0; MIB as usize],
    );
    assert_same(
        "host 8M (trimmed)",
        &read_host(&server.disk, 8 * MIB, MIB as usize),
        &vec![0; MIB as usize],
    );
    assert_same(
        "host 10M",
        &read_host(&server.disk, 10 * MIB, 65536),
        &vec![0x11; 65536],
    );
    assert_same(
        "host 11M",
        &read_host(&server.disk, 11 * MIB, 65536),
        &vec![0x22; 65536],
    );
    assert_same(
        "host 12M+1",
        &read_host(&server.disk, 12 * MIB + 1, 511),
        &vec![0x77; 511],
    );
}

#[test]
fn qemu_io_pattern_session_unix() {
    let mut server = Server::start(ServerOpts::default());
    qemu_io_session(&server);
    assert!(server.alive(), "server died during the qemu-io session");
}

#[test]
fn qemu_io_pattern_session_tcp_named_export() {
    let mut server = Server::start(ServerOpts {
        export: "disk",
        tcp: true,
        ..Default::default()
    });
    assert!(
        server.qemu_target().starts_with("nbd://127.0.0.1:"),
        "{}",
        server.qemu_target()
    );
    assert!(
        server.qemu_target().ends_with("/disk"),
        "{}",
        server.qemu_target()
    );
    qemu_io_session(&server);
    // The empty (default) export name reaches the named export too.
    let default_uri = format!("nbd://{}/", server.listen);
    let out = exec_ok(
        "qemu-io",
        &["-f", "raw", &default_uri, "-c", "read -P 0xcd 4M 64k"],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(server.alive(), "server died during the qemu-io session");
}

// ---------------------------------------------------------------------------------------
// 2. nbdcopy round trip + qemu-img compare
// ---------------------------------------------------------------------------------------

#[test]
fn nbdcopy_round_trip_and_qemu_img_compare() {
    let size = 32 * MIB;
    let mut server = Server::start(ServerOpts {
        size,
        ..Default::default()
    });
    let uri = server.uri();
    let dir = server.dir.path().to_path_buf();
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    let data = pattern(size as usize, 0x5eed_0001);
    std::fs::write(&src, &data).unwrap();
    let (src_s, dst_s) = (src.to_str().unwrap(), dst.to_str().unwrap());

    exec_ok("nbdcopy", &["--flush", src_s, &uri]);
    exec_ok("nbdcopy", &[&uri, dst_s]);
    assert_same("nbdcopy round trip", &std::fs::read(&dst).unwrap(), &data);
    assert_same(
        "server disk file after nbdcopy",
        &std::fs::read(&server.disk).unwrap(),
        &data,
    );

    let out = exec(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare should find identical images: {}",
        describe("qemu-img", &["compare"], &out)
    );

    // Change one byte through NBD: compare must now report a difference (exit 1).
    let off: u64 = 17 * MIB + 12345;
    let newbyte = data[off as usize] ^ 0xff;
    let cmd = format!("write -P {newbyte:#x} {off} 1");
    let out = exec_ok("qemu-io", &["-f", "raw", &server.qemu_target(), "-c", &cmd]);
    assert!(out.contains("wrote 1/1"), "{out}");
    let out = exec(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare must find the changed byte: {}",
        describe("qemu-img", &["compare"], &out)
    );
    let text = stdout_stderr(&out);
    // qemu-img compare works in 512-byte sectors and reports the start of the sector.
    let sector = off & !511;
    assert!(
        text.contains(&format!("offset {sector}")),
        "mismatch should be reported at {sector}:\n{text}"
    );

    // Single connection, synchronous: copy a different image in, read it back.
    let data2 = pattern(size as usize, 0x5eed_0002);
    let src2 = dir.join("src2.img");
    let dst2 = dir.join("dst2.img");
    std::fs::write(&src2, &data2).unwrap();
    exec_ok(
        "nbdcopy",
        &[
            "-C",
            "1",
            "--synchronous",
            "--flush",
            src2.to_str().unwrap(),
            &uri,
        ],
    );
    exec_ok(
        "nbdcopy",
        &["-C", "1", "--synchronous", &uri, dst2.to_str().unwrap()],
    );
    assert_same(
        "nbdcopy -C 1 --synchronous round trip",
        &std::fs::read(&dst2).unwrap(),
        &data2,
    );
    let out = exec(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src2.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe("qemu-img", &["compare"], &out)
    );
    assert!(server.alive());
}

// ---------------------------------------------------------------------------------------
// 3. nbdinfo and qemu-img map
// ---------------------------------------------------------------------------------------

#[test]
fn nbdinfo_list_and_export_details() {
    let mut server = Server::start(ServerOpts {
        export: "disk",
        ..Default::default()
    });
    let uri = server.uri();

    let list = Json::parse(&exec_ok("nbdinfo", &["--list", "--json", &uri]));
    let exports = list.get("exports").arr();
    let e = exports
        .iter()
        .find(|e| e.get("export-name").str() == "disk")
        .unwrap_or_else(|| panic!("export \"disk\" not listed: {list:?}"));
    assert!(
        e.has("description"),
        "listed export has no description: {e:?}"
    );
    assert!(
        !e.get("description").str().is_empty(),
        "empty description: {e:?}"
    );
    assert_eq!(e.get("export-size").u64(), 64 * MIB);

    let info = Json::parse(&exec_ok("nbdinfo", &["--json", &uri]));
    assert_eq!(info.get("protocol").str(), "newstyle-fixed");
    assert!(
        info.get("structured").bool(),
        "structured replies not negotiated: {info:?}"
    );
    let e = &info.get("exports").arr()[0];
    assert_eq!(e.get("export-name").str(), "disk");
    assert_eq!(e.get("export-size").u64(), 64 * MIB);
    for k in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert!(e.get(k).bool(), "{k} should be true: {e:?}");
    }
    assert!(!e.get("is_read_only").bool(), "{e:?}");
    assert_eq!(e.get("block_size_minimum").u64(), 1, "{e:?}");
    assert_eq!(e.get("block_size_preferred").u64(), 4096, "{e:?}");
    assert_eq!(e.get("block_size_maximum").u64(), 33554432, "{e:?}");
    let contexts: Vec<&str> = e.get("contexts").arr().iter().map(Json::str).collect();
    assert!(
        contexts.contains(&"base:allocation"),
        "contexts: {contexts:?}"
    );

    // The exit-code interface agrees (0 = true, 2 = false).
    for can in [
        "flush",
        "fua",
        "trim",
        "zero",
        "multi-conn",
        "cache",
        "structured-reply",
    ] {
        let out = exec("nbdinfo", &["--can", can, &uri]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "nbdinfo --can {can}: {}",
            describe("nbdinfo", &[], &out)
        );
    }
    let out = exec("nbdinfo", &["--is", "read-only", &uri]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "nbdinfo --is read-only: {}",
        describe("nbdinfo", &[], &out)
    );
    assert_eq!(
        exec_ok("nbdinfo", &["--size", &uri]).trim(),
        (64 * MIB).to_string()
    );
    assert!(server.alive());
}

#[test]
fn nbdinfo_read_only_export() {
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(&dir, 16 * MIB, b"hello");
    let mut server = Server::start_on(
        dir,
        disk,
        ServerOpts {
            size: 16 * MIB,
            extra: &["--read-only"],
            ..Default::default()
        },
    );
    let uri = server.uri();
    let info = Json::parse(&exec_ok("nbdinfo", &["--json", &uri]));
    let e = &info.get("exports").arr()[0];
    assert!(
        e.get("is_read_only").bool(),
        "is_read_only should be true: {e:?}"
    );
    assert_eq!(e.get("export-size").u64(), 16 * MIB);
    let out = exec("nbdinfo", &["--is", "read-only", &uri]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "nbdinfo --is read-only: {}",
        describe("nbdinfo", &[], &out)
    );
    assert!(server.alive());
}

#[test]
fn nbdinfo_map_and_qemu_img_map() {
    let mut server = Server::start(ServerOpts::default());
    let uri = server.uri();
    let out = exec_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &server.qemu_target(),
            "-c",
            "write -P 0xab 4M 64k",
        ],
    );
    assert!(out.contains("wrote 65536/65536"), "{out}");

    let map = exec_ok("nbdinfo", &["--map", &uri]);
    let rows: Vec<(u64, u64, u32, String)> = map
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "unexpected nbdinfo --map line {l:?}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect();
    let want = vec![
        (0, 4194304, 3, "hole,zero".to_string()),
        (4194304, 65536, 0, "data".to_string()),
        (4259840, 62849024, 3, "hole,zero".to_string()),
    ];
    assert_eq!(rows, want, "nbdinfo --map output:\n{map}");

    let qmap = Json::parse(&exec_ok(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &uri],
    ));
    let got: Vec<(u64, u64, bool, bool)> = qmap
        .arr()
        .iter()
        .map(|e| {
            (
                e.get("start").u64(),
                e.get("length").u64(),
                e.get("data").bool(),
                e.get("zero").bool(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 4194304, false, true),
            (4194304, 65536, true, false),
            (4259840, 62849024, false, true)
        ],
        "qemu-img map: {qmap:?}"
    );
    assert!(server.alive());
}

// ---------------------------------------------------------------------------------------
// 4. nbdsh: invalid requests, read-only, block status, multi-conn, unknown export
// ---------------------------------------------------------------------------------------

#[test]
fn nbdsh_invalid_requests_keep_connection() {
    let mut server = Server::start(ServerOpts::default());
    let script = r#"
sz = h.get_size()
out("size", sz)
h.pwrite(b"\x5a" * 4096, 0)
out("read_past_end", err(lambda: h.pread(4096, sz - 1024)))
out("read_beyond_end", err(lambda: h.pread(512, sz + 4096)))
out("write_past_end", err(lambda: h.pwrite(b"x" * 4096, sz - 1024)))
out("zero_past_end", err(lambda: h.zero(4096, sz - 1024)))
out("trim_past_end", err(lambda: h.trim(4096, sz - 1024)))
ents = []
out("block_status_past_end", err(lambda: h.block_status(4096, sz + 4096, lambda c, o, e, r: 0)))
out("read_unknown_flag", err(lambda: h.pread(512, 0, 1 << 15)))
out("write_unknown_flag", err(lambda: h.pwrite(b"\x01" * 512, 0, 1 << 14)))
out("unknown_flag_write_left_data", h.pread(512, 0) == b"\x5a" * 512)
out("read_len0", err(lambda: h.pread(0, 0)))
out("read_len0_mid", err(lambda: h.pread(0, 4096)))
out("write_len0", err(lambda: h.pwrite(b"", 4096)))
out("trim_len0", err(lambda: h.trim(0, 4096)))
out("zero_len0", err(lambda: h.zero(0, 4096)))
out("cache", err(lambda: h.cache(1 << 20, 0)))
big = bytes((i * 5 + 9) & 0xff for i in range(32 << 20))
out("write_max", err(lambda: h.pwrite(big, 8 << 20)))
out("read_max", h.pread(32 << 20, 8 << 20) == big)
del big
out("ready", h.aio_is_ready())
# the connection survived: a normal round trip on the same handle
data = bytes((i * 7 + 3) & 0xff for i in range(65536))
h.pwrite(data, sz - 65536)
out("round_trip", h.pread(65536, sz - 65536) == data)
out("last_byte", h.pread(1, sz - 1)[0] == data[-1])
"#;
    let m = kv(&nbdsh_ok(
        &[
            "h.set_strict_mode(0)",
            "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)",
        ],
        &server.uri(),
        script,
    ));
    assert_eq!(kv_get(&m, "size"), (64 * MIB).to_string());
    let expect = [
        ("read_past_end", EINVAL),
        ("read_beyond_end", EINVAL),
        ("write_past_end", ENOSPC),
        ("zero_past_end", ENOSPC),
        ("trim_past_end", EINVAL),
        ("block_status_past_end", EINVAL),
        ("read_unknown_flag", EINVAL),
        ("write_unknown_flag", EINVAL),
        ("read_len0", 0),
        ("read_len0_mid", 0),
        ("write_len0", 0),
        ("trim_len0", 0),
        ("zero_len0", 0),
        ("cache", 0),
        ("write_max", 0),
    ];
    let mut bad = vec![];
    for (k, want) in expect {
        let got = kv_errno(&m, k);
        if got != want {
            bad.push(format!("{k}: got errno {got}, want {want}"));
        }
    }
    assert!(
        bad.is_empty(),
        "wrong replies:\n{}\nall: {m:?}",
        bad.join("\n")
    );
    assert_eq!(
        kv_get(&m, "unknown_flag_write_left_data"),
        "True",
        "a rejected write changed data"
    );
    assert_eq!(
        kv_get(&m, "read_max"),
        "True",
        "32 MiB read did not return the 32 MiB write"
    );
    assert_eq!(
        kv_get(&m, "ready"),
        "True",
        "connection not ready after invalid requests"
    );
    assert_eq!(kv_get(&m, "round_trip"), "True");
    assert_eq!(kv_get(&m, "last_byte"), "True");
    assert!(server.alive());
}

#[test]
fn nbdsh_read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(65536, 77);
    let disk = make_disk(&dir, 16 * MIB, &content);
    let mut server = Server::start_on(
        dir,
        disk.clone(),
        ServerOpts {
            size: 16 * MIB,
            extra: &["--read-only"],
            ..Default::default()
        },
    );
    let script = r#"
out("is_read_only", h.is_read_only())
out("pwrite", err(lambda: h.pwrite(b"x" * 4096, 0)))
out("pwrite_fua", err(lambda: h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)))
out("trim", err(lambda: h.trim(4096, 0)))
out("zero", err(lambda: h.zero(4096, 0)))
with open(os.environ["EXPECT"], "rb") as f:
    want = f.read()
out("pread_ok", h.pread(65536, 0) == want)
out("pread_tail_zero", h.pread(4096, h.get_size() - 4096) == bytes(4096))
"#;
    let expect_path = server.dir.path().join("expect.bin");
    std::fs::write(&expect_path, &content).unwrap();
    let args = nbdsh_args(&["h.set_strict_mode(0)"], &server.uri(), script);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "nbdsh"])
        .args(&args)
        .env("PATH", PATH_ENV)
        .env("EXPECT", &expect_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("nbdsh", &["(read-only script)"], &out)
    );
    let m = kv(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(kv_get(&m, "is_read_only"), "True");
    assert_eq!(kv_errno(&m, "pwrite"), EPERM, "{m:?}");
    assert_eq!(kv_errno(&m, "pwrite_fua"), EPERM, "{m:?}");
    assert_eq!(kv_errno(&m, "trim"), EPERM, "{m:?}");
    assert_eq!(kv_errno(&m, "zero"), EPERM, "{m:?}");
    assert_eq!(
        kv_get(&m, "pread_ok"),
        "True",
        "read-only export returned wrong data"
    );
    assert_eq!(kv_get(&m, "pread_tail_zero"), "True");
    // Nothing changed on the host.
    assert_same("read-only disk", &read_host(&disk, 0, 65536), &content);
    assert!(server.alive());
}

#[test]
fn nbdsh_block_status_base_allocation() {
    let mut server = Server::start(ServerOpts::default());
    let script = r#"
out("can_ctx", h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
h.pwrite(b"\xaa" * 65536, 0)
h.flush()
def bs(length, offset, flags=0):
    ents = []
    def cb(ctx, off, e, r):
        ents.append((ctx, off, list(e)))
        return 0
    h.block_status(length, offset, cb, flags)
    assert len(ents) == 1, ents
    assert ents[0][0] == "base:allocation", ents
    assert ents[0][1] == offset, ents
    e = ents[0][2]
    return list(zip(e[0::2], e[1::2]))
out("one_data", bs(1 << 20, 0, nbd.CMD_FLAG_REQ_ONE))
out("one_data_mid", bs(1 << 20, 32768, nbd.CMD_FLAG_REQ_ONE))
out("one_hole", bs(65536, 1 << 20, nbd.CMD_FLAG_REQ_ONE))
out("one_short", bs(4096, 4096, nbd.CMD_FLAG_REQ_ONE))
out("many", bs(2 << 20, 0))
h.pwrite(b"\xbb" * 65536, 2 << 20)
out("before_trim", bs(65536, 2 << 20, nbd.CMD_FLAG_REQ_ONE))
h.trim(65536, 2 << 20)
out("after_trim", bs(65536, 2 << 20, nbd.CMD_FLAG_REQ_ONE))
out("trim_reads_zero", h.pread(65536, 2 << 20) == bytes(65536))
"#;
    let m = kv(&nbdsh_ok(
        &["h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)"],
        &server.uri(),
        script,
    ));
    assert_eq!(kv_get(&m, "can_ctx"), "True");
    // With REQ_ONE: exactly one extent, no longer than requested.
    assert_eq!(kv_get(&m, "one_data"), "[(65536, 0)]", "{m:?}");
    assert_eq!(kv_get(&m, "one_data_mid"), "[(32768, 0)]", "{m:?}");
    assert_eq!(kv_get(&m, "one_hole"), "[(65536, 3)]", "{m:?}");
    assert_eq!(kv_get(&m, "one_short"), "[(4096, 0)]", "{m:?}");
    // Without REQ_ONE: data then hole; the last extent may run past the request.
    let many = kv_get(&m, "many");
    assert!(many.starts_with("[(65536, 0), ("), "{many}");
    assert!(
        many.contains(", 3)"),
        "second extent should be hole,zero: {many}"
    );
    // TRIM punches a hole: the range reads back as zeroes and is reported as hole,zero.
    assert_eq!(kv_get(&m, "before_trim"), "[(65536, 0)]", "{m:?}");
    assert_eq!(
        kv_get(&m, "after_trim"),
        "[(65536, 3)]",
        "TRIM did not leave a hole: {m:?}"
    );
    assert_eq!(kv_get(&m, "trim_reads_zero"), "True", "{m:?}");
    assert!(server.alive());
}

#[test]
fn nbdsh_multi_conn_flush_visible_on_other_connection() {
    let mut server = Server::start(ServerOpts::default());
    let uri = server.uri();
    let script = format!(
        r#"
out("multi_conn", h.can_multi_conn())
h2 = nbd.NBD()
h2.connect_uri({uri:?})
data = bytes((i * 13 + 1) & 0xff for i in range(262144))
# prime h2's view first, then overwrite through h and flush
out("before", h2.pread(4096, 3 << 20) == bytes(4096))
h.pwrite(data, 3 << 20)
h.flush()
out("visible", h2.pread(262144, 3 << 20) == data)
h2.pwrite(b"\x42" * 4096, 5 << 20, nbd.CMD_FLAG_FUA)
h2.flush()
out("visible_back", h.pread(4096, 5 << 20) == b"\x42" * 4096)
h2.shutdown()
"#
    );
    let m = kv(&nbdsh_ok(&[], &uri, &script));
    assert_eq!(kv_get(&m, "multi_conn"), "True");
    assert_eq!(kv_get(&m, "before"), "True");
    assert_eq!(
        kv_get(&m, "visible"),
        "True",
        "write+flush on A not visible on B"
    );
    assert_eq!(
        kv_get(&m, "visible_back"),
        "True",
        "write+flush on B not visible on A"
    );
    assert!(server.alive());
}

#[test]
fn nbdsh_unknown_export_is_enoent() {
    let mut server = Server::start(ServerOpts {
        export: "disk",
        ..Default::default()
    });
    let sock = server.socket_path().unwrap().to_string();
    let nope = format!("nbd+unix:///nope?socket={sock}");
    let script = r#"
out("info", err(lambda: h.opt_info()))
out("go", err(lambda: h.opt_go()))
h.set_export_name("disk")
out("info_disk", err(lambda: h.opt_info()))
out("size", h.get_size())
h.set_export_name("")
out("go_default", err(lambda: h.opt_go()))
out("read", h.pread(512, 0) == bytes(512))
"#;
    let m = kv(&nbdsh_ok(&["h.set_opt_mode(True)"], &nope, script));
    assert_eq!(kv_errno(&m, "info"), ENOENT, "{m:?}");
    assert_eq!(kv_errno(&m, "go"), ENOENT, "{m:?}");
    assert_eq!(kv_errno(&m, "info_disk"), 0, "{m:?}");
    assert_eq!(kv_get(&m, "size"), (64 * MIB).to_string());
    assert_eq!(
        kv_errno(&m, "go_default"),
        0,
        "empty name should reach the export: {m:?}"
    );
    assert_eq!(kv_get(&m, "read"), "True");

    // A plain connect to an unknown export fails with a clear error.
    let out = exec("nbdsh", &["-u", &nope, "-c", "print(h.get_size())"]);
    assert!(
        !out.status.success(),
        "connect to unknown export succeeded: {}",
        describe("nbdsh", &[], &out)
    );
    let text = stdout_stderr(&out);
    assert!(
        text.contains("No such file or directory") || text.contains("ENOENT"),
        "{text}"
    );
    assert!(server.alive());
}

// ---------------------------------------------------------------------------------------
// 5. Older clients: plain newstyle / EXPORT_NAME / no structured replies
// ---------------------------------------------------------------------------------------

const ROUND_TRIP: &str = r#"
out("protocol", h.get_protocol())
out("sr", h.get_structured_replies_negotiated())
out("size", h.get_size())
data = bytes((i * 11 + 5) & 0xff for i in range(1 << 20))
h.pwrite(data, 1 << 20)
h.pwrite(b"\x99" * 4096, 3 << 20, nbd.CMD_FLAG_FUA)
h.flush()
out("round_trip", h.pread(1 << 20, 1 << 20) == data)
out("fua_round_trip", h.pread(4096, 3 << 20) == b"\x99" * 4096)
out("read_past_end", err(lambda: h.pread(4096, h.get_size() - 1024)))
out("after_error", h.pread(4096, 1 << 20) == data[:4096])
"#;

fn check_round_trip(m: &HashMap<String, String>, protocol: &str, server: &Server) {
    assert_eq!(kv_get(m, "protocol"), protocol, "{m:?}");
    assert_eq!(
        kv_get(m, "sr"),
        "False",
        "structured replies must not be negotiated: {m:?}"
    );
    assert_eq!(kv_get(m, "size"), (64 * MIB).to_string());
    assert_eq!(kv_get(m, "round_trip"), "True", "{m:?}");
    assert_eq!(kv_get(m, "fua_round_trip"), "True", "{m:?}");
    // Simple error reply, and the connection carries on.
    assert_eq!(kv_errno(m, "read_past_end"), EINVAL, "{m:?}");
    assert_eq!(kv_get(m, "after_error"), "True", "{m:?}");
    let want: Vec<u8> = (0..MIB as usize)
        .map(|i| ((i * 11 + 5) & 0xff) as u8)
        .collect();
    assert_same(
        "host file",
        &read_host(&server.disk, MIB, MIB as usize),
        &want,
    );
}

#[test]
fn old_style_client_export_name_without_structured_replies() {
    // Handshake flags 0: no FIXED_NEWSTYLE, no NO_ZEROES -> NBD_OPT_EXPORT_NAME and the
    // 124 zero bytes of padding, simple replies only.
    let mut server = Server::start(ServerOpts::default());
    let m = kv(&nbdsh_ok(
        &[
            "h.set_strict_mode(0)",
            "h.set_handshake_flags(0)",
            "h.set_request_structured_replies(False)",
        ],
        &server.uri(),
        ROUND_TRIP,
    ));
    check_round_trip(&m, "newstyle", &server);
    assert!(server.alive());
}

#[test]
fn old_style_client_named_export_via_export_name() {
    let mut server = Server::start(ServerOpts {
        export: "disk",
        ..Default::default()
    });
    let m = kv(&nbdsh_ok(
        &[
            "h.set_strict_mode(0)",
            "h.set_handshake_flags(0)",
            "h.set_request_structured_replies(False)",
        ],
        &server.uri(),
        ROUND_TRIP,
    ));
    check_round_trip(&m, "newstyle", &server);
    assert!(server.alive());
}

#[test]
fn fixed_newstyle_client_without_structured_replies() {
    let mut server = Server::start(ServerOpts::default());
    let m = kv(&nbdsh_ok(
        &[
            "h.set_strict_mode(0)",
            "h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)",
            "h.set_request_structured_replies(False)",
        ],
        &server.uri(),
        ROUND_TRIP,
    ));
    check_round_trip(&m, "newstyle-fixed", &server);
    assert!(server.alive());
}

// ---------------------------------------------------------------------------------------
// 6. fio with verification
// ---------------------------------------------------------------------------------------

fn fio_verify(server: &Server, extra: &[&str]) {
    let uri_arg = format!("--uri={}", server.uri());
    let mut args = vec![
        "--name=v",
        "--ioengine=nbd",
        &uri_arg,
        "--size=64M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",
    ];
    args.extend_from_slice(extra);
    let out = exec_in(Some(server.dir.path()), "fio", &args);
    let text = stdout_stderr(&out);
    assert!(
        out.status.success(),
        "fio failed: {}",
        describe("fio", &args, &out)
    );
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("verify:") || l.contains("bad magic") || l.contains("verify failed"))
        .collect();
    assert!(
        bad.is_empty(),
        "fio reported verify errors:\n{}\n\n{text}",
        bad.join("\n")
    );
    assert!(
        text.contains("err= 0"),
        "fio job did not finish with err=0:\n{text}"
    );
    // The verify phase read the data back.
    assert!(
        text.contains("READ: bw="),
        "fio did not read anything back:\n{text}"
    );
}

#[test]
fn fio_randwrite_verify() {
    let mut server = Server::start(ServerOpts::default());
    fio_verify(&server, &["--rw=randwrite", "--bs=4k", "--iodepth=32"]);
    assert!(server.alive());
}

#[test]
fn fio_randrw_fsync_verify() {
    let mut server = Server::start(ServerOpts::default());
    fio_verify(
        &server,
        &["--rw=randrw", "--bs=64k", "--iodepth=16", "--fsync=16"],
    );
    assert!(server.alive());
}

#[test]
fn fio_verify_threads_engine() {
    let mut server = Server::start(ServerOpts {
        extra: &["--engine", "threads"],
        ..Default::default()
    });
    fio_verify(&server, &["--rw=randwrite", "--bs=4k", "--iodepth=32"]);
    fio_verify(
        &server,
        &["--rw=randrw", "--bs=64k", "--iodepth=16", "--fsync=16"],
    );
    assert!(server.alive());
}

#[test]
fn fio_verify_direct() {
    let mut server = Server::start(ServerOpts {
        extra: &["--direct"],
        ..Default::default()
    });
    fio_verify(&server, &["--rw=randwrite", "--bs=4k", "--iodepth=32"]);
    // Unaligned-size blocks take the buffered path on a --direct server.
    fio_verify(
        &server,
        &["--rw=randrw", "--bs=6k", "--iodepth=8", "--fsync=16"],
    );
    assert!(server.alive());
}

// ---------------------------------------------------------------------------------------
// 7. Fault injection seen by real clients
// ---------------------------------------------------------------------------------------

#[test]
fn fault_read_eio_seen_by_qemu_io_and_nbdsh() {
    let mut server = Server::start(ServerOpts {
        extra: &["--fault", "read:1M-2M:eio"],
        ..Default::default()
    });
    let target = server.qemu_target();

    let out = exec("qemu-io", &["-f", "raw", &target, "-c", "read 1M 4k"]);
    let text = stdout_stderr(&out);
    assert!(
        !out.status.success(),
        "read in the faulty range succeeded:\n{text}"
    );
    assert!(
        text.contains("Input/output error"),
        "expected an I/O error:\n{text}"
    );

    let out = exec(
        "qemu-io",
        &[
            "-f",
            "raw",
            &target,
            "-c",
            "read -P 0 0 4k",
            "-c",
            "read -P 0 3M 4k",
        ],
    );
    assert!(
        out.status.success(),
        "reads outside the faulty range failed: {}",
        describe("qemu-io", &[], &out)
    );

    let m = kv(&nbdsh_ok(
        &[],
        &server.uri(),
        r#"
out("in_range", err(lambda: h.pread(4096, (1 << 20) + 8192)))
out("straddle", err(lambda: h.pread(8192, (1 << 20) - 4096)))
h.pwrite(b"\x31" * 4096, 0)
out("outside", h.pread(4096, 0) == b"\x31" * 4096)
"#,
    ));
    assert_eq!(kv_errno(&m, "in_range"), EIO, "{m:?}");
    assert_eq!(kv_errno(&m, "straddle"), EIO, "{m:?}");
    assert_eq!(kv_get(&m, "outside"), "True", "{m:?}");
    assert!(server.alive());
}

#[test]
fn fault_write_enospc_seen_by_nbdsh() {
    let mut server = Server::start(ServerOpts {
        extra: &["--fault", "write:0-4096:enospc"],
        ..Default::default()
    });
    let m = kv(&nbdsh_ok(
        &[],
        &server.uri(),
        r#"
out("at0", err(lambda: h.pwrite(b"\x44" * 4096, 0)))
out("at8192", err(lambda: h.pwrite(b"\x45" * 4096, 8192)))
out("read8192", h.pread(4096, 8192) == b"\x45" * 4096)
out("read0", h.pread(4096, 0) == bytes(4096))
"#,
    ));
    assert_eq!(kv_errno(&m, "at0"), ENOSPC, "{m:?}");
    assert_eq!(kv_errno(&m, "at8192"), 0, "{m:?}");
    assert_eq!(kv_get(&m, "read8192"), "True", "{m:?}");
    assert_eq!(
        kv_get(&m, "read0"),
        "True",
        "failed write changed data: {m:?}"
    );
    assert_same(
        "host 8192",
        &read_host(&server.disk, 8192, 4096),
        &[0x45; 4096],
    );
    assert!(server.alive());
}

#[test]
fn fault_delay_and_odd_errno_become_slow_success_and_eio() {
    // Two rules: writes in 1M-2M are delayed; reads of the first 4 KiB fail with ENODATA
    // (61), which is not an NBD error value and must reach the client as EIO.
    let mut server = Server::start(ServerOpts {
        extra: &[
            "--fault",
            "write:1M-2M:delay=300ms",
            "--fault",
            "read:0-4096:errno=61",
        ],
        ..Default::default()
    });
    let m = kv(&nbdsh_ok(
        &[],
        &server.uri(),
        r#"
import time
t = time.monotonic()
h.pwrite(b"\x66" * 4096, 1 << 20)
out("delayed_s", time.monotonic() - t)
out("delayed_data", h.pread(4096, 1 << 20) == b"\x66" * 4096)
out("odd_errno", err(lambda: h.pread(4096, 0)))
out("after", h.pread(4096, 8192) == bytes(4096))
"#,
    ));
    let secs: f64 = kv_get(&m, "delayed_s").parse().unwrap();
    assert!(
        secs >= 0.29,
        "write in the delayed range took only {secs} s"
    );
    assert_eq!(kv_get(&m, "delayed_data"), "True", "{m:?}");
    assert_eq!(
        kv_errno(&m, "odd_errno"),
        EIO,
        "storage errno 61 should be reported as EIO: {m:?}"
    );
    assert_eq!(kv_get(&m, "after"), "True", "{m:?}");
    assert!(server.alive());
}

// ---------------------------------------------------------------------------------------
// 8. Graceful stop
// ---------------------------------------------------------------------------------------

#[test]
fn graceful_stop_keeps_flushed_data() {
    let mut server = Server::start(ServerOpts::default());
    let data = pattern(MIB as usize, 8);
    let src = server.dir.path().join("payload.bin");
    std::fs::write(&src, &data).unwrap();
    let script = format!(
        r#"
data = open({src:?}, "rb").read()
for i in range(0, len(data), 65536):
    h.pwrite(data[i:i + 65536], (7 << 20) + i)
h.flush()
out("ok", h.pread(len(data), 7 << 20) == data)
"#,
        src = src.to_str().unwrap()
    );
    let m = kv(&nbdsh_ok(&[], &server.uri(), &script));
    assert_eq!(kv_get(&m, "ok"), "True");
    assert_eq!(
        server.stop(),
        Some(0),
        "SIGTERM should stop the server with exit code 0"
    );
    assert_same(
        "disk file after stop",
        &read_host(&server.disk, 7 * MIB, MIB as usize),
        &data,
    );
}

#[test]
fn graceful_stop_with_client_still_connected() {
    let mut server = Server::start(ServerOpts::default());
    let data = pattern(256 * KIB as usize, 9);
    let src = server.dir.path().join("payload.bin");
    std::fs::write(&src, &data).unwrap();
    // Write without FUA and without FLUSH, then stay connected (blocked on stdin).
    let script = format!(
        r#"
data = open({src:?}, "rb").read()
h.pwrite(data, 5 << 20)
print("ready", flush=True)
sys.stdin.read()
"#,
        src = src.to_str().unwrap()
    );
    let args = nbdsh_args(&[], &server.uri(), &script);
    let mut client = Command::new("nbdsh")
        .args(&args)
        .env("PATH", PATH_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "ready" {
        let _ = client.kill();
        let mut err = String::new();
        client
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("nbdsh did not get ready: {line:?}\n{err}");
    }

    sigterm(&server.child);
    let status = wait_timeout(&mut server.child, Duration::from_secs(15));
    // Let the client go whatever happened.
    drop(client.stdin.take());
    if wait_timeout(&mut client, Duration::from_secs(10)).is_none() {
        let _ = client.kill();
        let _ = client.wait();
    }
    let status =
        status.expect("server did not exit within 15 s of SIGTERM with an idle client connected");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM should stop the server with exit code 0"
    );
    assert_same(
        "disk file after stop",
        &read_host(&server.disk, 5 * MIB, data.len()),
        &data,
    );
}

// ---------------------------------------------------------------------------------------
// 9. nbdfuse + ext4
// ---------------------------------------------------------------------------------------

struct FuseMount {
    mnt: PathBuf,
    child: Child,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .env("PATH", PATH_ENV)
                .stderr(Stdio::null())
                .status();
            if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

#[test]
fn nbdfuse_ext4_filesystem() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE (run the container with --device /dev/fuse)"
    );
    let size = 64 * MIB;
    let mut server = Server::start(ServerOpts {
        size,
        ..Default::default()
    });
    let dir = server.dir.path().to_path_buf();
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let file = mnt.join("disk");
    let child = Command::new("nbdfuse")
        .arg(&file)
        .arg(server.uri())
        .env("PATH", PATH_ENV)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nbdfuse");
    let mut fuse = FuseMount {
        mnt: mnt.clone(),
        child,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if std::fs::metadata(&file)
            .map(|m| m.len() == size)
            .unwrap_or(false)
        {
            break;
        }
        if let Some(st) = fuse.child.try_wait().unwrap() {
            panic!("nbdfuse exited early with {st}");
        }
        assert!(
            Instant::now() < deadline,
            "nbdfuse did not expose {} within 15 s",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = file.to_str().unwrap();

    // Raw block I/O through the FUSE file.
    let chunk = pattern(MIB as usize, 99);
    {
        let fh = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        fh.write_all_at(&chunk, 3 * MIB).unwrap();
        fh.sync_all().unwrap();
        let mut back = vec![0u8; chunk.len()];
        fh.read_exact_at(&mut back, 3 * MIB).unwrap();
        assert_same("nbdfuse read back", &back, &chunk);
    }
    assert_same(
        "host file after nbdfuse write",
        &read_host(&server.disk, 3 * MIB, chunk.len()),
        &chunk,
    );

    // A filesystem on top.
    exec_ok("mkfs.ext4", &["-q", "-F", f]);
    exec_ok("e2fsck", &["-fn", f]);
    let payload_text = format!(
        "tandem nbdfuse test {:x}\n",
        u64::from_le_bytes(pattern(8, 5)[..8].try_into().unwrap())
    );
    let payload = dir.join("hello.txt");
    std::fs::write(&payload, &payload_text).unwrap();
    let w = format!("write {} hello.txt", payload.display());
    exec_ok("debugfs", &["-w", "-R", &w, f]);
    let cat = exec_ok("debugfs", &["-R", "cat hello.txt", f]);
    assert_eq!(cat, payload_text, "file read back through debugfs differs");
    exec_ok("e2fsck", &["-fn", f]);

    // Unmount; nbdfuse exits.
    exec_ok("fusermount3", &["-u", mnt.to_str().unwrap()]);
    let st = wait_timeout(&mut fuse.child, Duration::from_secs(10))
        .expect("nbdfuse did not exit after unmount");
    assert!(st.success(), "nbdfuse exited with {st}");

    // The filesystem is in the server's disk file on the host.
    let disk = server.disk.to_str().unwrap().to_string();
    exec_ok("e2fsck", &["-fn", &disk]);
    assert_eq!(
        exec_ok("debugfs", &["-R", "cat hello.txt", &disk]),
        payload_text
    );
    assert_eq!(server.stop(), Some(0));
}

// ---------------------------------------------------------------------------------------
// 10. Many clients at once
// ---------------------------------------------------------------------------------------

#[test]
fn eight_concurrent_clients_own_regions() {
    let mut server = Server::start(ServerOpts::default());
    let uri = server.uri();
    let dir = server.dir.path().to_path_buf();
    const N: u64 = 8;
    let mut children = vec![];
    let mut payloads = vec![];
    for i in 0..N {
        let data = pattern(MIB as usize, 1000 + i);
        let src = dir.join(format!("payload{i}.bin"));
        std::fs::write(&src, &data).unwrap();
        payloads.push(data);
        // Region i lives at (8 + 2*i) MiB: non-adjacent, so mixups show up.
        let off = (8 + 2 * i) * MIB;
        let script = format!(
            r#"
data = open({src:?}, "rb").read()
off = {off}
bufs = []
for j in range(0, len(data), 65536):
    b = nbd.Buffer.from_bytearray(bytearray(data[j:j + 65536]))
    bufs.append(b)
    h.aio_pwrite(b, off + j, flags=(nbd.CMD_FLAG_FUA if j % (4 * 65536) == 0 else 0))
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
ok = True
for rep in range(3):
    ok = ok and h.pread(len(data), off) == data
out("ok", ok)
"#,
            src = src.to_str().unwrap()
        );
        let args = nbdsh_args(&[], &uri, &script);
        let child = Command::new("timeout")
            .args(["-k", "5", "90", "nbdsh"])
            .args(&args)
            .env("PATH", PATH_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push(child);
    }
    let mut failures = vec![];
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let m = kv(&String::from_utf8_lossy(&out.stdout));
        if !out.status.success() || m.get("ok").map(String::as_str) != Some("True") {
            failures.push(format!("client {i}: {}", describe("nbdsh", &[], &out)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for (i, data) in payloads.iter().enumerate() {
        let off = (8 + 2 * i as u64) * MIB;
        assert_same(
            &format!("host region of client {i}"),
            &read_host(&server.disk, off, data.len()),
            data,
        );
        // The gap after each region was never written.
        assert_same(
            &format!("gap after client {i}"),
            &read_host(&server.disk, off + MIB, 4096),
            &[0; 4096],
        );
    }
    assert!(server.alive());
    assert_eq!(server.stop(), Some(0));
}
