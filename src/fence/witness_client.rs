//! A node's connection to the fencing witness: lazy, authenticated both ways, and dropped on
//! any error so the next call starts clean.

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::nbd::addr::ListenAddr;
use crate::witness::proto::{self, read_msg, write_msg, Message};
pub use crate::witness::proto::{Refusal, Reply, Request, WITNESS_PROTOCOL_VERSION};

/// Why a call reached no decision. Refusals by the state machine are [`Reply::Refused`].
#[derive(Debug)]
pub enum WitnessError {
    /// Cannot connect, or the connection broke.
    Unreachable(io::Error),
    /// No answer within the client's timeout.
    Timeout,
    VersionMismatch {
        ours: u32,
        theirs: u32,
    },
    /// The witness refused the connection (unknown resource, wrong secret...).
    Refused(String),
    /// The witness could not prove it knows the shared secret: not to be trusted.
    BadProof,
    Protocol(String),
}

impl fmt::Display for WitnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "cannot reach the witness: {e}"),
            Self::Timeout => write!(f, "the witness did not answer in time"),
            Self::VersionMismatch { ours, theirs } => write!(
                f,
                "the witness speaks protocol version {theirs}, this node {ours}"
            ),
            Self::Refused(why) => write!(f, "the witness refused this node: {why}"),
            Self::BadProof => write!(
                f,
                "the witness failed authentication: it does not know this resource's shared \
                 secret (wrong secret file, or not the real witness)"
            ),
            Self::Protocol(m) => write!(f, "witness protocol error: {m}"),
        }
    }
}

impl std::error::Error for WitnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreachable(e) => Some(e),
            _ => None,
        }
    }
}

impl WitnessError {
    fn from_io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::InvalidData {
            Self::Protocol(e.to_string())
        } else {
            Self::Unreachable(e)
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// A lazily connected, authenticated client of one witness for one resource and node.
pub struct WitnessClient {
    addr: String,
    resource: String,
    node: String,
    secret: Vec<u8>,
    timeout: Duration,
    conn: Option<Box<dyn Io>>,
}

impl fmt::Debug for WitnessClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WitnessClient")
            .field("addr", &self.addr)
            .field("resource", &self.resource)
            .field("node", &self.node)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl WitnessClient {
    /// `addr` is `HOST:PORT` or `unix:PATH`; nothing connects until the first [`Self::call`].
    pub fn new(
        addr: String,
        resource: String,
        node: String,
        secret: Vec<u8>,
        timeout: Duration,
    ) -> Self {
        Self {
            addr,
            resource,
            node,
            secret,
            timeout,
            conn: None,
        }
    }

    /// Send one request and wait for its reply, connecting and authenticating first if
    /// needed; the whole call is bounded by the timeout. On any error the connection is
    /// dropped so the next call reconnects.
    pub async fn call(&mut self, req: Request) -> Result<Reply, WitnessError> {
        self.call_within(req, self.timeout).await
    }

    /// `call`, giving up after `limit` (at most the client's own timeout).
    pub async fn call_within(
        &mut self,
        req: Request,
        limit: std::time::Duration,
    ) -> Result<Reply, WitnessError> {
        let limit = limit.min(self.timeout);
        let result = match tokio::time::timeout(limit, self.call_inner(&req)).await {
            Ok(r) => r,
            Err(_) => Err(WitnessError::Timeout),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn call_inner(&mut self, req: &Request) -> Result<Reply, WitnessError> {
        let reused = self.conn.is_some();
        match self.exchange(req).await {
            // A kept connection may have died with a restarted witness: retry once on a
            // fresh one. Repeating a request is safe: at worst it grants one more epoch.
            Err(WitnessError::Unreachable(_)) if reused => {
                self.conn = None;
                self.exchange(req).await
            }
            r => r,
        }
    }

    async fn exchange(&mut self, req: &Request) -> Result<Reply, WitnessError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let s = self.conn.as_mut().expect("connected above");
        write_msg(s, &Message::Request(req.clone()))
            .await
            .map_err(WitnessError::from_io)?;
        match read_msg(s).await.map_err(WitnessError::from_io)? {
            Message::Reply(r) => Ok(r),
            Message::Refused { reason, .. } => Err(WitnessError::Refused(reason)),
            other => Err(WitnessError::Protocol(format!(
                "expected a reply, got {other:?}"
            ))),
        }
    }

    async fn connect(&self) -> Result<Box<dyn Io>, WitnessError> {
        let at = |e: io::Error| {
            WitnessError::Unreachable(io::Error::new(e.kind(), format!("{}: {e}", self.addr)))
        };
        let addr: ListenAddr = self
            .addr
            .parse()
            .map_err(|e: String| at(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut s: Box<dyn Io> = match &addr {
            ListenAddr::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).await.map_err(at)?;
                s.set_nodelay(true).map_err(at)?;
                Box::new(s)
            }
            ListenAddr::Unix(p) => Box::new(UnixStream::connect(p).await.map_err(at)?),
        };
        self.handshake(&mut s).await?;
        Ok(s)
    }

    async fn handshake(&self, s: &mut Box<dyn Io>) -> Result<u64, WitnessError> {
        let io = WitnessError::from_io;
        let ours = WITNESS_PROTOCOL_VERSION;
        let nonce = proto::nonce().map_err(|e| WitnessError::Protocol(e.to_string()))?;
        let hello = Message::Hello {
            version: ours,
            resource: self.resource.clone(),
            node: self.node.clone(),
            nonce,
        };
        write_msg(s, &hello).await.map_err(io)?;
        let refused = |version: u32, reason: String| {
            if version != ours {
                WitnessError::VersionMismatch {
                    ours,
                    theirs: version,
                }
            } else {
                WitnessError::Refused(reason)
            }
        };
        let witness_nonce = match read_msg(s).await.map_err(io)? {
            Message::Challenge {
                version,
                nonce: theirs,
                proof,
            } => {
                if version != ours {
                    return Err(WitnessError::VersionMismatch {
                        ours,
                        theirs: version,
                    });
                }
                if !proto::verify_witness_proof(
                    &self.secret,
                    &nonce,
                    &self.resource,
                    &self.node,
                    &proof,
                ) {
                    return Err(WitnessError::BadProof);
                }
                theirs
            }
            Message::Refused { version, reason } => return Err(refused(version, reason)),
            other => {
                return Err(WitnessError::Protocol(format!(
                    "expected Challenge, got {other:?}"
                )))
            }
        };
        let proof = proto::node_proof(&self.secret, &witness_nonce, &self.resource, &self.node);
        write_msg(s, &Message::Auth { proof }).await.map_err(io)?;
        match read_msg(s).await.map_err(io)? {
            Message::Welcome { epoch } => Ok(epoch),
            Message::Refused { version, reason } => Err(refused(version, reason)),
            other => Err(WitnessError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tokio::net::UnixListener;

    fn client(dir: &Path, node: &str, secret: &[u8]) -> WitnessClient {
        WitnessClient::new(
            format!("unix:{}", dir.join("w.sock").display()),
            "r0".into(),
            node.into(),
            secret.to_vec(),
            Duration::from_secs(2),
        )
    }

    /// A fake witness that answers the first message of each connection with `answer`.
    fn fake(dir: &Path, answer: Option<Message>) -> tokio::task::JoinHandle<()> {
        let l = UnixListener::bind(dir.join("w.sock")).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let _ = read_msg(&mut s).await;
                    match answer {
                        Some(a) => write_msg(&mut s, &a).await.unwrap(),
                        None => std::future::pending().await,
                    }
                    // Would grant anything, were it asked.
                    let _ = read_msg(&mut s).await;
                    let _ = write_msg(&mut s, &Message::Reply(Reply::Granted { epoch: 99 })).await;
                });
            }
        })
    }

    #[tokio::test]
    async fn a_fake_witness_cannot_grant() {
        let dir = tempfile::tempdir().unwrap();
        let _f = fake(
            dir.path(),
            Some(Message::Challenge {
                version: WITNESS_PROTOCOL_VERSION,
                nonce: [0; 32],
                proof: [0; 32],
            }),
        );
        let mut c = client(dir.path(), "alpha", b"k");
        let r = c.call(Request::Query).await;
        assert!(matches!(r, Err(WitnessError::BadProof)), "{r:?}");
    }

    #[tokio::test]
    async fn version_mismatch_and_silence_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let _f = fake(
            dir.path(),
            Some(Message::Refused {
                version: 2,
                reason: "the witness speaks protocol version 2".into(),
            }),
        );
        let r = client(dir.path(), "alpha", b"k").call(Request::Query).await;
        assert!(
            matches!(r, Err(WitnessError::VersionMismatch { ours: 1, theirs: 2 })),
            "{r:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let _f = fake(dir.path(), None);
        let mut c = client(dir.path(), "alpha", b"k");
        c.timeout = Duration::from_millis(200);
        let r = c.call(Request::Query).await;
        assert!(matches!(r, Err(WitnessError::Timeout)), "{r:?}");
        assert!(c.conn.is_none());
    }

    #[tokio::test]
    async fn nobody_listening_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let r = client(dir.path(), "alpha", b"k").call(Request::Query).await;
        let Err(e @ WitnessError::Unreachable(_)) = r else {
            panic!("{r:?}")
        };
        assert!(e.to_string().contains("w.sock"), "{e}");
    }

    #[tokio::test]
    async fn round_trips_against_the_real_witness() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("r0.secret"), "k\n").unwrap();
        let listen = ListenAddr::Unix(dir.path().join("w.sock"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let witness = tokio::spawn({
            let data = data.clone();
            async move {
                crate::witness::run(&listen, &data, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        while !dir.path().join("w.sock").exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let mut a = client(dir.path(), "alpha", b"k");
        let acquire = Request::Acquire {
            have_epoch: 0,
            lease_ms: 5000,
            outdate_peer: Some("beta".into()),
            force: false,
        };
        assert_eq!(a.call(acquire).await.unwrap(), Reply::Granted { epoch: 1 });
        assert_eq!(
            a.call(Request::Renew { epoch: 1 }).await.unwrap(),
            Reply::Renewed { epoch: 1 }
        );
        let mut b = client(dir.path(), "beta", b"k");
        let r = b
            .call(Request::Acquire {
                have_epoch: 1,
                lease_ms: 5000,
                outdate_peer: Some("alpha".into()),
                force: false,
            })
            .await
            .unwrap();
        assert_eq!(r, Reply::Refused(Refusal::Outdated { epoch: 1 }));
        // The secret "k" plus the one stripped newline.
        let mut wrong = client(dir.path(), "beta", b"k\n");
        let r = wrong.call(Request::Query).await;
        assert!(matches!(r, Err(WitnessError::BadProof)), "{r:?}");

        let on_disk: crate::witness::state::Persisted =
            serde_json::from_slice(&std::fs::read(data.join("r0.state")).unwrap()).unwrap();
        assert_eq!(on_disk.epoch, 1);
        assert_eq!(on_disk.outdated, vec!["beta".to_owned()]);

        stop.send(()).unwrap();
        witness.await.unwrap().unwrap();
        assert!(!dir.path().join("w.sock").exists());
    }
}
