//! The witness protocol, shared by the witness and its client.
//!
//! Frames are a u32 big-endian body length and a `postcard`-encoded [`Message`], at most
//! [`MAX_FRAME`] bytes; anything larger is garbage. The handshake authenticates both ways with
//! HMAC-SHA256 over fresh nonces, so a node never accepts a grant from a fake witness:
//!
//! 1. client → [`Message::Hello`]
//! 2. witness → [`Message::Challenge`] (proves the witness knows the secret) or [`Message::Refused`]
//! 3. client → [`Message::Auth`] (proves the node knows the secret)
//! 4. witness → [`Message::Welcome`] or [`Message::Refused`]
//!
//! Then [`Message::Request`] / [`Message::Reply`], one at a time.

use std::fmt;
use std::io;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const WITNESS_PROTOCOL_VERSION: u32 = 1;
/// Largest frame body; witness messages are tiny, so anything bigger is garbage.
pub const MAX_FRAME: u32 = 64 * 1024;
/// A connection that has not authenticated by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest lease the witness grants; bounds `Instant` arithmetic and stale holders.
pub const MAX_LEASE_MS: u64 = 3_600_000;

/// What an authenticated node asks of the witness for its resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Become primary with a new epoch, above both the witness's and `have_epoch`.
    Acquire {
        have_epoch: u64,
        lease_ms: u64,
        /// Record this peer as outdated in the same decision (it missed or will miss writes).
        outdate_peer: Option<String>,
        /// Promote even though this node is marked outdated (never overrides a held lease).
        force: bool,
    },
    /// Extend the lease of `epoch`.
    Renew {
        epoch: u64,
    },
    /// Give up the lease of `epoch` (planned demotion).
    Release {
        epoch: u64,
    },
    /// The primary of `epoch` goes on writing without `peer`.
    Outdate {
        epoch: u64,
        peer: String,
    },
    /// `peer` finished resyncing from the primary of `epoch`.
    InSync {
        epoch: u64,
        peer: String,
    },
    Query,
}

/// The witness's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Granted {
        epoch: u64,
    },
    Renewed {
        epoch: u64,
    },
    Released,
    PeerOutdated {
        epoch: u64,
    },
    Ok,
    State {
        epoch: u64,
        holder: Option<String>,
        /// Until the holder's lease expires (0 once it has); `None` without a holder.
        lease_remaining_ms: Option<u64>,
        outdated: Vec<String>,
    },
    Refused(Refusal),
}

/// Why the witness said no.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// This node is in the outdated set at `epoch`: its data may be stale.
    Outdated { epoch: u64 },
    /// Another node holds a live lease; `remaining_ms` until it may be taken over.
    LeaseHeld {
        holder: String,
        epoch: u64,
        remaining_ms: u64,
    },
    /// The caller does not hold the lease of the epoch it named (any more).
    Superseded { epoch: u64, holder: Option<String> },
    /// A malformed request (bad lease length, bad peer name...).
    Invalid { reason: String },
    /// The witness could not persist the decision, so it made none.
    Unavailable { reason: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Outdated { epoch } => write!(
                f,
                "the witness marked this node outdated (epoch {epoch}): its peer wrote \
                 without it, so its data may be stale; resync first, or force the promotion"
            ),
            Self::LeaseHeld {
                holder,
                epoch,
                remaining_ms,
            } => write!(
                f,
                "{holder} holds the lease for epoch {epoch} for another {:.1} s",
                *remaining_ms as f64 / 1000.0
            ),
            Self::Superseded {
                epoch,
                holder: Some(h),
            } => write!(
                f,
                "superseded: the witness is at epoch {epoch} and {h} holds the lease"
            ),
            Self::Superseded {
                epoch,
                holder: None,
            } => write!(
                f,
                "superseded: the witness is at epoch {epoch} and no node holds the lease"
            ),
            Self::Invalid { reason } => write!(f, "invalid request: {reason}"),
            Self::Unavailable { reason } => write!(
                f,
                "the witness could not record the decision ({reason}); nothing was changed"
            ),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Granted { epoch } => write!(f, "granted epoch {epoch}"),
            Self::Renewed { epoch } => write!(f, "renewed the lease of epoch {epoch}"),
            Self::Released => write!(f, "released the lease"),
            Self::PeerOutdated { epoch } => write!(f, "peer marked outdated at epoch {epoch}"),
            Self::Ok => write!(f, "ok"),
            Self::State {
                epoch,
                holder,
                lease_remaining_ms,
                outdated,
            } => {
                write!(f, "epoch {epoch}, ")?;
                match (holder, lease_remaining_ms) {
                    (Some(h), Some(ms)) => write!(f, "lease held by {h} ({ms} ms left)")?,
                    (Some(h), None) => write!(f, "lease held by {h}")?,
                    (None, _) => write!(f, "no lease holder")?,
                }
                if outdated.is_empty() {
                    write!(f, ", nobody outdated")
                } else {
                    write!(f, ", outdated: {}", outdated.join(", "))
                }
            }
            Self::Refused(r) => write!(f, "refused: {r}"),
        }
    }
}

/// Every message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello {
        version: u32,
        resource: String,
        node: String,
        nonce: [u8; 32],
    },
    Challenge {
        version: u32,
        nonce: [u8; 32],
        /// [`witness_proof`] over the client's nonce.
        proof: [u8; 32],
    },
    Auth {
        /// [`node_proof`] over the witness's nonce.
        proof: [u8; 32],
    },
    Welcome {
        epoch: u64,
    },
    /// Carries the witness's version so a client can tell a version mismatch from other refusals.
    Refused {
        version: u32,
        reason: String,
    },
    Request(Request),
    Reply(Reply),
}

/// `[A-Za-z0-9._-]+`, not `.` or `..`: resource names become file names in the data directory.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn encode(msg: &Message) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("messages always serialise");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> io::Result<()> {
    w.write_all(&encode(msg)).await?;
    w.flush().await
}

/// Read one message. Oversized or undecodable frames are `InvalidData`.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Message> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    decode_body(&body)
}

/// A frame body holds exactly one message: bytes after it mean the frame is garbage (or was
/// written by a peer whose messages differ from ours), not something to ignore.
fn decode_body(body: &[u8]) -> io::Result<Message> {
    let (msg, rest) = postcard::take_from_bytes(body)
        .map_err(|e| invalid(format!("undecodable message: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid(format!(
            "undecodable message: {} bytes after the message in a frame of {}",
            rest.len(),
            body.len()
        )));
    }
    Ok(msg)
}

type HmacSha256 = Hmac<Sha256>;

// Length prefixes keep ("r0", "alpha") and ("r0a", "lpha") from hashing alike.
fn mac(secret: &[u8], label: &[u8], nonce: &[u8; 32], resource: &str, node: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(label);
    m.update(nonce);
    for s in [resource, node] {
        m.update(&(s.len() as u32).to_be_bytes());
        m.update(s.as_bytes());
    }
    m
}

const WITNESS_LABEL: &[u8] = b"tandem-witness";
const NODE_LABEL: &[u8] = b"tandem-node";

/// The witness's proof over the client's nonce.
pub fn witness_proof(
    secret: &[u8],
    client_nonce: &[u8; 32],
    resource: &str,
    node: &str,
) -> [u8; 32] {
    mac(secret, WITNESS_LABEL, client_nonce, resource, node)
        .finalize()
        .into_bytes()
        .into()
}

/// The node's proof over the witness's nonce.
pub fn node_proof(secret: &[u8], witness_nonce: &[u8; 32], resource: &str, node: &str) -> [u8; 32] {
    mac(secret, NODE_LABEL, witness_nonce, resource, node)
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time check of a [`witness_proof`].
pub fn verify_witness_proof(
    secret: &[u8],
    client_nonce: &[u8; 32],
    resource: &str,
    node: &str,
    proof: &[u8; 32],
) -> bool {
    mac(secret, WITNESS_LABEL, client_nonce, resource, node)
        .verify_slice(proof)
        .is_ok()
}

/// Constant-time check of a [`node_proof`].
pub fn verify_node_proof(
    secret: &[u8],
    witness_nonce: &[u8; 32],
    resource: &str,
    node: &str,
    proof: &[u8; 32],
) -> bool {
    mac(secret, NODE_LABEL, witness_nonce, resource, node)
        .verify_slice(proof)
        .is_ok()
}

pub fn nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn messages_round_trip_through_frames() {
        let msgs = [
            Message::Hello {
                version: 1,
                resource: "r0".into(),
                node: "alpha".into(),
                nonce: [7; 32],
            },
            Message::Request(Request::Acquire {
                have_epoch: 3,
                lease_ms: 2000,
                outdate_peer: Some("beta".into()),
                force: false,
            }),
            Message::Reply(Reply::Refused(Refusal::LeaseHeld {
                holder: "beta".into(),
                epoch: 7,
                remaining_ms: 1400,
            })),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_msg(&mut buf, m).await.unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(&read_msg(&mut r).await.unwrap(), m);
        }
        assert_eq!(
            read_msg(&mut r).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn oversized_frames_are_garbage() {
        let mut frame = (MAX_FRAME + 1).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        let e = read_msg(&mut &frame[..]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    /// Found by the `witness_proto` fuzz target: a frame whose body held a valid message
    /// followed by junk was accepted, the junk silently ignored.
    #[tokio::test]
    async fn frames_with_bytes_after_the_message_are_garbage() {
        let mut frame = encode(&Message::Welcome { epoch: 3 });
        frame.extend_from_slice(b"junk");
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let e = read_msg(&mut &frame[..]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("4 bytes after the message"), "{e}");
        // The fuzzer's input: a Reply(Granted { epoch: 0 }) frame with 7 bytes after it.
        let found = [0u8, 0, 0, 10, 6, 0, 0, 0, 2, 5, 5, b'e', b't', b'a', b'F'];
        let e = read_msg(&mut &found[..]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn proofs_bind_direction_names_and_secret() {
        let n = [1u8; 32];
        let p = witness_proof(b"k", &n, "r0", "alpha");
        assert!(verify_witness_proof(b"k", &n, "r0", "alpha", &p));
        assert!(!verify_witness_proof(b"x", &n, "r0", "alpha", &p));
        assert!(!verify_witness_proof(b"k", &[2; 32], "r0", "alpha", &p));
        assert!(!verify_witness_proof(b"k", &n, "r0a", "lpha", &p));
        assert!(!verify_node_proof(b"k", &n, "r0", "alpha", &p));
        let q = node_proof(b"k", &n, "r0", "alpha");
        assert!(verify_node_proof(b"k", &n, "r0", "alpha", &q));
        assert!(!verify_node_proof(b"k", &n, "r0", "beta", &q));
    }

    #[test]
    fn names_are_path_safe() {
        for ok in ["r0", "my.res-1_x", "A"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "r 0", "é", &"x".repeat(201)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let r = Refusal::LeaseHeld {
            holder: "beta".into(),
            epoch: 7,
            remaining_ms: 1400,
        };
        assert_eq!(
            r.to_string(),
            "beta holds the lease for epoch 7 for another 1.4 s"
        );
        let s = Refusal::Superseded {
            epoch: 8,
            holder: Some("beta".into()),
        };
        assert!(s.to_string().contains("epoch 8 and beta holds"), "{s}");
        assert!(Refusal::Outdated { epoch: 3 }
            .to_string()
            .contains("outdated (epoch 3)"));
    }

    proptest! {
        /// Garbage never panics the decoder nor makes it allocate beyond the cap.
        #[test]
        fn decoder_survives_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = rt.block_on(read_msg(&mut &bytes[..]));
        }
    }
}
