//! PostgreSQL and SQLite on ext4 on `tandem attach` (through nbdfuse and a loop device), through
//! a `kill -9` of the primary and a switchover back: every commit a client saw succeed must be
//! in the database afterwards, and the databases must see no error. The work is done by
//! `tools/db-e2e.sh`, which an operator can run by hand too; this test runs it with the binary
//! under test and prints its output on failure.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole script takes about 45 s here; this only guards against a hang.
const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn postgresql_and_sqlite_through_attach_survive_a_kill9_and_a_failback() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tempfile::NamedTempFile::new().unwrap();
    // One open file for both streams, so they share the offset and interleave in order.
    let log = out.reopen().unwrap();
    let mut child = Command::new("bash")
        .arg(format!("{root}/tools/db-e2e.sh"))
        .env("TANDEM", env!("CARGO_BIN_EXE_tandem"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > LIMIT {
            // SIGTERM lets the script's exit trap stop the databases and unmount.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let grace = Instant::now();
            while child.try_wait().unwrap().is_none() && grace.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::new();
    out.reopen().unwrap().read_to_string(&mut text).unwrap();
    println!("{text}");
    match status {
        None => panic!("tools/db-e2e.sh did not finish in {LIMIT:?}:\n{text}"),
        Some(s) => assert!(
            s.success() && text.contains("all databases verified"),
            "tools/db-e2e.sh failed ({s}):\n{text}"
        ),
    }
}
