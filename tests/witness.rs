//! The fencing witness as users run it: the real binary on a loopback port and a temporary
//! data directory, driven by the node's client.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, pattern, tandem_bin};
use tandem::fence::witness_client::{Refusal, Reply, Request, WitnessClient, WitnessError};
use tandem::witness::proto::{self, Message, WITNESS_PROTOCOL_VERSION};

const LEASE_MS: u64 = 300;

struct Witness {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
}

impl Witness {
    /// Start on a fresh data directory holding `r0.secret` = "s3cret".
    fn start() -> Witness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r0.secret"), "s3cret\n").unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = spawn(&addr, dir.path());
        let w = Witness { child, dir, addr };
        w.wait_ready();
        w
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "witness did not listen on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9, then start again on the same directory and port.
    fn crash_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn(&self.addr, self.dir.path());
        self.wait_ready();
    }

    fn client(&self, resource: &str, node: &str, secret: &str) -> WitnessClient {
        WitnessClient::new(
            self.addr.clone(),
            resource.into(),
            node.into(),
            secret.as_bytes().to_vec(),
            Duration::from_secs(2),
        )
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(addr: &str, data: &Path) -> Child {
    Command::new(tandem_bin())
        .args(["witness", "--listen", addr, "--data"])
        .arg(data)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn tandem witness")
}

fn acquire(have_epoch: u64, outdate_peer: Option<&str>, force: bool) -> Request {
    Request::Acquire {
        have_epoch,
        lease_ms: LEASE_MS,
        outdate_peer: outdate_peer.map(str::to_owned),
        force,
    }
}

async fn state(c: &mut WitnessClient) -> (u64, Option<String>, Vec<String>) {
    match c.call(Request::Query).await.unwrap() {
        Reply::State {
            epoch,
            holder,
            outdated,
            ..
        } => (epoch, holder, outdated),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn acquire_renew_query_release() {
    let w = Witness::start();
    let mut a = w.client("r0", "alpha", "s3cret");
    assert_eq!(
        a.call(acquire(0, None, false)).await.unwrap(),
        Reply::Granted { epoch: 1 }
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(LEASE_MS / 3)).await;
        assert_eq!(
            a.call(Request::Renew { epoch: 1 }).await.unwrap(),
            Reply::Renewed { epoch: 1 }
        );
    }
    let Reply::State {
        epoch,
        holder,
        lease_remaining_ms,
        outdated,
    } = a.call(Request::Query).await.unwrap()
    else {
        panic!()
    };
    assert_eq!((epoch, holder.as_deref()), (1, Some("alpha")));
    assert!(lease_remaining_ms.unwrap() <= LEASE_MS);
    assert!(outdated.is_empty());
    assert_eq!(
        a.call(Request::Release { epoch: 1 }).await.unwrap(),
        Reply::Released
    );
    // Released: another node may take over at once.
    let mut b = w.client("r0", "beta", "s3cret");
    assert_eq!(
        b.call(acquire(1, None, false)).await.unwrap(),
        Reply::Granted { epoch: 2 }
    );
}

#[tokio::test]
async fn a_second_node_waits_for_the_lease_to_expire() {
    let w = Witness::start();
    let mut a = w.client("r0", "alpha", "s3cret");
    let mut b = w.client("r0", "beta", "s3cret");
    a.call(acquire(0, None, false)).await.unwrap();
    let r = b.call(acquire(1, Some("alpha"), true)).await.unwrap();
    let Reply::Refused(refusal @ Refusal::LeaseHeld { .. }) = &r else {
        panic!("{r:?}")
    };
    assert!(
        refusal
            .to_string()
            .starts_with("alpha holds the lease for epoch 1 for another"),
        "{refusal}"
    );
    // lease + margin (50 ms for a 300 ms lease), plus slack.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 150)).await;
    assert_eq!(
        b.call(acquire(1, Some("alpha"), false)).await.unwrap(),
        Reply::Granted { epoch: 2 }
    );
    // The old primary learns it was superseded, and it is outdated now.
    assert_eq!(
        a.call(Request::Renew { epoch: 1 }).await.unwrap(),
        Reply::Refused(Refusal::Superseded {
            epoch: 2,
            holder: Some("beta".into())
        })
    );
    assert_eq!(
        a.call(acquire(1, None, false)).await.unwrap(),
        Reply::Refused(Refusal::Outdated { epoch: 2 })
    );
    // Once it has resynced, the primary clears it.
    assert_eq!(
        b.call(Request::InSync {
            epoch: 2,
            peer: "alpha".into()
        })
        .await
        .unwrap(),
        Reply::Ok
    );
    assert_eq!(state(&mut a).await.2, Vec::<String>::new());
}

#[tokio::test]
async fn state_survives_kill_9() {
    let mut w = Witness::start();
    let mut a = w.client("r0", "alpha", "s3cret");
    // A long lease, so the check that it restarted fresh is not a race.
    let long = Request::Acquire {
        have_epoch: 41,
        lease_ms: 10_000,
        outdate_peer: Some("beta".into()),
        force: false,
    };
    assert_eq!(a.call(long).await.unwrap(), Reply::Granted { epoch: 42 });
    w.crash_and_restart();
    // The kept connection died with the witness; the client reconnects by itself.
    assert_eq!(
        state(&mut a).await,
        (42, Some("alpha".into()), vec!["beta".into()])
    );
    assert_eq!(
        a.call(Request::Renew { epoch: 42 }).await.unwrap(),
        Reply::Renewed { epoch: 42 }
    );
    // The holder's lease restarted with the witness, so the peer must still wait.
    let mut b = w.client("r0", "beta", "s3cret");
    assert!(matches!(
        b.call(acquire(0, None, true)).await.unwrap(),
        Reply::Refused(Refusal::LeaseHeld { .. })
    ));

    // A release, crash and restart: no holder, the epoch stays.
    a.call(Request::Release { epoch: 42 }).await.unwrap();
    w.crash_and_restart();
    let mut b = w.client("r0", "beta", "s3cret");
    assert_eq!(state(&mut b).await, (42, None, vec!["beta".into()]));
    assert_eq!(
        b.call(acquire(0, None, false)).await.unwrap(),
        Reply::Refused(Refusal::Outdated { epoch: 42 })
    );
    assert_eq!(
        a.call(acquire(42, None, false)).await.unwrap(),
        Reply::Granted { epoch: 43 }
    );
}

/// Connect and run the handshake by hand up to the Challenge.
fn raw_hello(addr: &str, resource: &str, node: &str) -> (std::net::TcpStream, Message, [u8; 32]) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let nonce = [9u8; 32];
    send(
        &mut s,
        &Message::Hello {
            version: WITNESS_PROTOCOL_VERSION,
            resource: resource.into(),
            node: node.into(),
            nonce,
        },
    );
    let m = recv(&mut s).expect("an answer to Hello");
    (s, m, nonce)
}

fn send(s: &mut std::net::TcpStream, m: &Message) {
    s.write_all(&proto::encode(m)).unwrap();
}

/// One message, or None if the witness closed the connection.
fn recv(s: &mut std::net::TcpStream) -> Option<Message> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(e) => panic!("{e}"),
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    Some(postcard::from_bytes(&body).unwrap())
}

#[tokio::test]
async fn a_wrong_secret_fails_on_both_sides() {
    let w = Witness::start();
    // A node with the wrong secret: the witness's proof does not check out.
    let mut c = w.client("r0", "alpha", "wrong");
    let r = c.call(acquire(0, None, false)).await;
    assert!(matches!(r, Err(WitnessError::BadProof)), "{r:?}");

    // A node that skips that check and answers with a bad proof is refused by the witness.
    let (mut s, m, _) = raw_hello(&w.addr, "r0", "alpha");
    assert!(matches!(m, Message::Challenge { .. }), "{m:?}");
    send(&mut s, &Message::Auth { proof: [0; 32] });
    match recv(&mut s) {
        Some(Message::Refused { reason, .. }) => {
            assert!(reason.contains("wrong shared secret"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(recv(&mut s).is_none(), "the connection is dropped");

    // A node that knows the secret but gets the witness's proof wrong is also refused.
    let (mut s, m, _) = raw_hello(&w.addr, "r0", "alpha");
    let Message::Challenge { nonce, .. } = m else {
        panic!("{m:?}")
    };
    send(
        &mut s,
        &Message::Auth {
            proof: proto::node_proof(b"s3cret", &nonce, "r0", "beta"),
        },
    );
    assert!(matches!(recv(&mut s), Some(Message::Refused { .. })));

    // A witness whose secret differs: the right node never trusts it.
    std::fs::write(w.data().join("r0.secret"), "rotated\n").unwrap();
    let r = w.client("r0", "alpha", "s3cret").call(Request::Query).await;
    assert!(
        matches!(r, Err(WitnessError::BadProof | WitnessError::Refused(_))),
        "{r:?}"
    );
    // Nothing was granted along the way.
    let mut ok = w.client("r0", "alpha", "rotated");
    assert_eq!(state(&mut ok).await, (0, None, vec![]));
}

#[tokio::test]
async fn unknown_and_invalid_resources_are_refused() {
    let w = Witness::start();
    let r = w.client("r9", "alpha", "s3cret").call(Request::Query).await;
    let Err(WitnessError::Refused(why)) = r else {
        panic!("{r:?}")
    };
    let expected = w.data().join("r9.secret");
    assert!(why.contains(&expected.display().to_string()), "{why}");
    let r = w
        .client("../r0", "alpha", "s3cret")
        .call(Request::Query)
        .await;
    assert!(
        matches!(&r, Err(WitnessError::Refused(why)) if why.contains("not a valid resource name")),
        "{r:?}"
    );
    // A different protocol version gets a typed answer.
    let mut s = std::net::TcpStream::connect(&w.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    send(
        &mut s,
        &Message::Hello {
            version: 2,
            resource: "r0".into(),
            node: "alpha".into(),
            nonce: [0; 32],
        },
    );
    assert!(matches!(
        recv(&mut s),
        Some(Message::Refused { version: 1, .. })
    ));
}

/// Write `bytes`, then expect the witness to close the connection.
fn expect_dropped(addr: &str, bytes: &[u8]) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The witness may close before taking everything; a failed write is fine.
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Ok(_) => continue, // a Refused message, then the close
            Err(e) => panic!("witness kept a garbage connection open: {e}"),
        }
    }
}

#[tokio::test]
async fn garbage_and_oversized_frames_are_dropped() {
    let mut w = Witness::start();
    let mut a = w.client("r0", "alpha", "s3cret");
    a.call(acquire(0, None, false)).await.unwrap();

    for seed in 1..6 {
        expect_dropped(&w.addr, &pattern(4096, seed));
    }
    let mut oversized = (proto::MAX_FRAME + 1).to_be_bytes().to_vec();
    oversized.extend(pattern(1024, 7));
    expect_dropped(&w.addr, &oversized);
    expect_dropped(&w.addr, &u32::MAX.to_be_bytes());
    // A valid frame that is not a Hello.
    expect_dropped(&w.addr, &proto::encode(&Message::Request(Request::Query)));
    // Garbage after authentication drops only that connection.
    let (mut s, m, _) = raw_hello(&w.addr, "r0", "beta");
    assert!(matches!(m, Message::Challenge { .. }));
    s.write_all(&pattern(64, 9)).unwrap();
    assert!(recv(&mut s).is_none());

    assert!(w.alive());
    assert_eq!(
        a.call(Request::Renew { epoch: 1 }).await.unwrap(),
        Reply::Renewed { epoch: 1 }
    );
    let mut b = w.client("r0", "beta", "s3cret");
    assert_eq!(state(&mut b).await, (1, Some("alpha".into()), vec![]));
}

#[test]
fn a_silent_connection_is_dropped_after_the_handshake_timeout() {
    let w = Witness::start();
    let mut s = std::net::TcpStream::connect(&w.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Half a length prefix, then nothing.
    s.write_all(&[0, 0]).unwrap();
    let t = Instant::now();
    let n = s.read(&mut [0u8; 16]).unwrap();
    assert_eq!(n, 0, "expected the witness to close the connection");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(8),
        "dropped after {waited:?}"
    );
}

#[tokio::test]
async fn one_witness_serves_resources_independently() {
    let w = Witness::start();
    std::fs::write(w.data().join("r1.secret"), "other\n").unwrap();
    let mut a0 = w.client("r0", "alpha", "s3cret");
    let mut a1 = w.client("r1", "alpha", "other");
    let mut b1 = w.client("r1", "beta", "other");
    assert_eq!(
        a0.call(acquire(5, Some("beta"), false)).await.unwrap(),
        Reply::Granted { epoch: 6 }
    );
    // beta is outdated on r0 only.
    assert_eq!(
        b1.call(acquire(0, None, false)).await.unwrap(),
        Reply::Granted { epoch: 1 }
    );
    assert!(matches!(
        a1.call(acquire(0, None, false)).await.unwrap(),
        Reply::Refused(Refusal::LeaseHeld { ref holder, epoch: 1, .. }) if holder == "beta"
    ));
    assert_eq!(
        state(&mut a0).await,
        (6, Some("alpha".into()), vec!["beta".into()])
    );
    assert_eq!(state(&mut a1).await, (1, Some("beta".into()), vec![]));
    // Each resource's secret is its own.
    let r = w.client("r1", "alpha", "s3cret").call(Request::Query).await;
    assert!(matches!(r, Err(WitnessError::BadProof)), "{r:?}");
    let files = |ext: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(w.data())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        files("state"),
        vec![w.data().join("r0.state"), w.data().join("r1.state")]
    );
}

#[test]
fn sigterm_stops_gracefully_and_bad_data_fails() {
    let mut w = Witness::start();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(w.child.wait().unwrap().code(), Some(0));

    // A corrupt state file: refuse to start rather than forget who is outdated.
    std::fs::write(w.data().join("r0.state"), "{").unwrap();
    let out = Command::new(tandem_bin())
        .args(["witness", "--listen", &w.addr, "--data"])
        .arg(w.data())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("r0.state is not a valid witness state file"),
        "{err}"
    );
}
