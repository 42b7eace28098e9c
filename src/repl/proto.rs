//! The peer protocol: one message enum, framed with a fixed header and a CRC32 of the body.
//!
//! Every frame starts with a 32-byte header: magic, kind, sequence number, offset, body length
//! and the CRC32 of the body. Control messages are `postcard`-encoded [`Message`]s; write and
//! resync payloads travel as raw bytes after the header, so they are never re-encoded. The
//! first message on a connection is [`Message::Hello`], which carries the protocol version;
//! mismatches are reported as typed [`HandshakeError`]s.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::meta::Generations;
use crate::state::{DiskState, Role};

pub const PROTOCOL_VERSION: u32 = 5;
pub const FRAME_MAGIC: u32 = 0x544e_444d; // "TNDM"
pub const HEADER_LEN: usize = 32;
/// Largest body of any frame: a 32 MiB write plus slack; anything larger is garbage.
pub const MAX_BODY: u32 = 33 * 1024 * 1024;
/// Control messages are small; a larger one is treated as garbage.
pub const MAX_CONTROL: u32 = 1024 * 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Control = 1,
    /// An application write replicated from the primary (`seq`, `offset`, raw body).
    Write = 2,
    /// A block sent by the sync source (`seq`, `offset`, raw body).
    ResyncData = 3,
}

/// Flags on data frames.
pub const FLAG_FUA: u8 = 1;

/// Control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First message from both sides.
    Hello {
        version: u32,
        resource: String,
        node: String,
        size: u64,
        challenge: [u8; 32],
    },
    /// HMAC-SHA256(secret, "tandem-auth" || peer's challenge || my node name).
    Auth {
        response: [u8; 32],
    },
    /// Replication state, exchanged after authentication and on every change.
    State(PeerState),
    /// Out-of-sync bitmap words starting at word `first`; `last` ends the transfer.
    Bitmap {
        first: u64,
        words: Vec<u64>,
        last: bool,
    },
    WriteAck {
        seq: u64,
    },
    /// The peer failed to apply write `seq` (its disk is now behind).
    WriteFailed {
        seq: u64,
        errno: i32,
    },
    Trim {
        seq: u64,
        offset: u64,
        len: u64,
    },
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    Flush {
        seq: u64,
    },
    FlushAck {
        seq: u64,
    },
    /// The target applied resync data `seq` at `[offset, offset+len)`.
    ResyncAck {
        seq: u64,
        offset: u64,
        len: u64,
    },
    /// Resync finished: the target adopts the source's generations and becomes UpToDate.
    ResyncDone {
        gens: Generations,
    },
    /// Online verify: digests of each 4 KiB block of the range, asked and answered.
    VerifyRequest {
        seq: u64,
        offset: u64,
        len: u64,
    },
    VerifyReply {
        seq: u64,
        digests: Vec<u32>,
    },
    Ping,
    PingAck,
    /// Switchover: the primary has drained, demoted and released its lease; the peer should
    /// promote now and answer with `TakeOverReply`.
    TakeOver {
        seq: u64,
    },
    TakeOverReply {
        seq: u64,
        error: Option<String>,
    },
    /// Switchover asked on the secondary: the primary should hand over to it.
    HandOver {
        seq: u64,
    },
    /// Orderly shutdown of the link (e.g. `disconnect`): no reconnect decision is implied.
    Goodbye {
        reason: String,
    },
    /// The sender starts (`true`) or ends an online verify against this node, which shows
    /// VerifyTarget meanwhile.
    Verifying {
        active: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerState {
    pub role: Role,
    pub disk: DiskState,
    pub gens: Generations,
    pub crashed_primary: bool,
    /// See `MetaFlags::rolled_back`.
    pub rolled_back: bool,
    /// See `MetaFlags::peer_unflushed`.
    pub peer_unflushed: bool,
    pub out_of_sync_bytes: u64,
    pub discard_my_data: bool,
    /// The highest fencing epoch this node knows.
    pub epoch: u64,
    /// See `Superblock::primary_epoch`.
    pub primary_epoch: u64,
}

/// A received frame.
#[derive(Debug)]
pub enum Frame {
    Control(Message),
    Write {
        seq: u64,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    ResyncData {
        seq: u64,
        offset: u64,
        data: Bytes,
    },
}

/// Why a connection was dropped before or during the handshake.
#[derive(Debug)]
pub enum HandshakeError {
    VersionMismatch {
        ours: u32,
        theirs: u32,
    },
    ResourceMismatch {
        ours: String,
        theirs: String,
    },
    SizeMismatch {
        ours: u64,
        theirs: u64,
    },
    /// The peer claims to be a node this one is not configured to talk to.
    UnexpectedNode {
        expected: String,
        theirs: String,
    },
    AuthFailed,
    Protocol(String),
    Io(io::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VersionMismatch { ours, theirs } => {
                write!(f, "peer speaks protocol version {theirs}, this node {ours}")
            }
            Self::ResourceMismatch { ours, theirs } => {
                write!(f, "peer serves resource {theirs:?}, this node {ours:?}")
            }
            Self::SizeMismatch { ours, theirs } => {
                write!(f, "peer's volume is {theirs} bytes, this node's {ours}")
            }
            Self::UnexpectedNode { expected, theirs } => {
                write!(f, "peer says it is {theirs:?}, expected {expected:?}")
            }
            Self::AuthFailed => write!(
                f,
                "peer failed authentication (wrong or missing shared secret)"
            ),
            Self::Protocol(m) => write!(f, "protocol error: {m}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn put_header(out: &mut BytesMut, kind: Kind, flags: u8, seq: u64, offset: u64, body: &[u8]) {
    out.put_u32(FRAME_MAGIC);
    out.put_u8(kind as u8);
    out.put_u8(flags);
    out.put_u16(0);
    out.put_u64(seq);
    out.put_u64(offset);
    out.put_u32(body.len() as u32);
    out.put_u32(crc32fast::hash(body));
}

/// Encode a control message as one frame.
pub fn encode_control(msg: &Message) -> Bytes {
    let body = postcard::to_stdvec(msg).expect("messages always serialise");
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    put_header(&mut out, Kind::Control, 0, 0, 0, &body);
    out.put_slice(&body);
    out.freeze()
}

/// The header of a data frame; the payload is written after it as is.
pub fn encode_data_header(
    kind: Kind,
    seq: u64,
    offset: u64,
    fua: bool,
    data: &[u8],
) -> [u8; HEADER_LEN] {
    let mut out = BytesMut::with_capacity(HEADER_LEN);
    put_header(
        &mut out,
        kind,
        if fua { FLAG_FUA } else { 0 },
        seq,
        offset,
        data,
    );
    out[..].try_into().unwrap()
}

/// Decode a frame header: (kind, flags, seq, offset, len, crc). Validates magic, kind and caps.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> io::Result<(Kind, u8, u64, u64, u32, u32)> {
    let mut b = &h[..];
    let magic = b.get_u32();
    if magic != FRAME_MAGIC {
        return Err(invalid(format!("bad frame magic {magic:#010x}")));
    }
    let kind = match b.get_u8() {
        1 => Kind::Control,
        2 => Kind::Write,
        3 => Kind::ResyncData,
        k => return Err(invalid(format!("unknown frame kind {k}"))),
    };
    let flags = b.get_u8();
    b.advance(2);
    let seq = b.get_u64();
    let offset = b.get_u64();
    let len = b.get_u32();
    let crc = b.get_u32();
    let cap = if kind == Kind::Control {
        MAX_CONTROL
    } else {
        MAX_BODY
    };
    if len > cap {
        return Err(invalid(format!("frame body of {len} bytes exceeds {cap}")));
    }
    Ok((kind, flags, seq, offset, len, crc))
}

/// Decode a complete frame from its header and body.
pub fn decode_frame(header: &[u8; HEADER_LEN], body: Bytes) -> io::Result<Frame> {
    let (kind, flags, seq, offset, len, crc) = decode_header(header)?;
    if body.len() != len as usize {
        return Err(invalid("frame body length mismatch"));
    }
    if crc32fast::hash(&body) != crc {
        return Err(invalid(format!(
            "frame CRC mismatch (kind {kind:?}, seq {seq}, offset {offset})"
        )));
    }
    Ok(match kind {
        Kind::Control => Frame::Control(decode_control(&body)?),
        Kind::Write => Frame::Write {
            seq,
            offset,
            fua: flags & FLAG_FUA != 0,
            data: body,
        },
        Kind::ResyncData => Frame::ResyncData {
            seq,
            offset,
            data: body,
        },
    })
}

/// A control body holds exactly one message: bytes after it mean the sender's encoder is not
/// ours (or the frame is garbage), never something to ignore.
fn decode_control(body: &[u8]) -> io::Result<Message> {
    let (msg, rest) = postcard::take_from_bytes(body)
        .map_err(|e| invalid(format!("undecodable control message: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid(format!(
            "undecodable control message: {} bytes after the message in a body of {}",
            rest.len(),
            body.len()
        )));
    }
    Ok(msg)
}

/// Read one frame (blocking until complete). EOF before a header is `UnexpectedEof`.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).await?;
    let (_, _, _, _, len, _) = decode_header(&header)?;
    let mut body = crate::store::AlignedBuf::for_overwrite(len as usize);
    r.read_exact(body.as_mut_slice()).await?;
    decode_frame(&header, Bytes::from_owner(body))
}

pub async fn write_control<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> io::Result<()> {
    w.write_all(&encode_control(msg)).await
}

type HmacSha256 = Hmac<Sha256>;

fn auth_response(secret: &[u8], challenge: &[u8; 32], node: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"tandem-auth");
    mac.update(challenge);
    mac.update(node.as_bytes());
    mac.finalize().into_bytes().into()
}

fn verify_response(secret: &[u8], challenge: &[u8; 32], node: &str, response: &[u8; 32]) -> bool {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"tandem-auth");
    mac.update(challenge);
    mac.update(node.as_bytes());
    mac.verify_slice(response).is_ok()
}

/// What both sides must agree on.
pub struct Identity<'a> {
    pub resource: &'a str,
    pub node: &'a str,
    pub peer: &'a str,
    pub size: u64,
    pub secret: &'a [u8],
}

/// Run the versioned, mutually authenticated handshake on a fresh connection. Both sides run
/// the same steps; neither sends anything but Hello until the peer has proven the secret.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &Identity<'_>,
) -> Result<(), HandshakeError> {
    let mut challenge = [0u8; 32];
    getrandom::getrandom(&mut challenge).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    write_control(
        s,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            resource: id.resource.to_owned(),
            node: id.node.to_owned(),
            size: id.size,
            challenge,
        },
    )
    .await?;
    let Frame::Control(Message::Hello {
        version,
        resource,
        node,
        size,
        challenge: theirs,
    }) = read_frame(s).await?
    else {
        return Err(HandshakeError::Protocol(
            "first message is not Hello".into(),
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    if resource != id.resource {
        return Err(HandshakeError::ResourceMismatch {
            ours: id.resource.into(),
            theirs: resource,
        });
    }
    if node != id.peer {
        return Err(HandshakeError::UnexpectedNode {
            expected: id.peer.into(),
            theirs: node,
        });
    }
    if size != id.size {
        return Err(HandshakeError::SizeMismatch {
            ours: id.size,
            theirs: size,
        });
    }
    write_control(
        s,
        &Message::Auth {
            response: auth_response(id.secret, &theirs, id.node),
        },
    )
    .await?;
    let Frame::Control(Message::Auth { response }) = read_frame(s).await? else {
        return Err(HandshakeError::Protocol("expected Auth".into()));
    };
    if !verify_response(id.secret, &challenge, id.peer, &response) {
        return Err(HandshakeError::AuthFailed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_round_trip() {
        let m = Message::Bitmap {
            first: 3,
            words: vec![1, 2, u64::MAX],
            last: true,
        };
        let b = encode_control(&m);
        let h: [u8; HEADER_LEN] = b[..HEADER_LEN].try_into().unwrap();
        match decode_frame(&h, b.slice(HEADER_LEN..)).unwrap() {
            Frame::Control(got) => assert_eq!(got, m),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_frames_carry_raw_payload_and_detect_corruption() {
        let data = Bytes::from(vec![7u8; 4096]);
        let h = encode_data_header(Kind::Write, 9, 8192, true, &data);
        match decode_frame(&h, data.clone()).unwrap() {
            Frame::Write {
                seq: 9,
                offset: 8192,
                fua: true,
                data: d,
            } => assert_eq!(d, data),
            other => panic!("{other:?}"),
        }
        let mut bad = data.to_vec();
        bad[100] ^= 1;
        let err = decode_frame(&h, Bytes::from(bad)).unwrap_err();
        assert!(err.to_string().contains("CRC"), "{err}");
    }

    /// Found by the `peer_frame` fuzz target: a control frame (with a correct CRC) whose body
    /// held a valid message followed by more bytes was accepted, the rest ignored.
    #[test]
    fn control_bodies_with_bytes_after_the_message_are_rejected() {
        let mut body = postcard::to_stdvec(&Message::Ping).unwrap();
        body.extend_from_slice(&[0, 0, 0]);
        let mut out = BytesMut::new();
        put_header(&mut out, Kind::Control, 0, 0, 0, &body);
        let h: [u8; HEADER_LEN] = out[..].try_into().unwrap();
        let err = decode_frame(&h, Bytes::from(body)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("3 bytes after the message"),
            "{err}"
        );
    }

    #[test]
    fn headers_reject_garbage() {
        let mut h = encode_data_header(Kind::Write, 1, 0, false, &[]);
        h[0] ^= 1;
        assert!(decode_header(&h).is_err());
        let mut h = encode_data_header(Kind::Write, 1, 0, false, &[]);
        h[4] = 9;
        assert!(decode_header(&h).is_err());
        let mut h: [u8; HEADER_LEN] = encode_control(&Message::Ping)[..HEADER_LEN]
            .try_into()
            .unwrap();
        h[24..28].copy_from_slice(&(MAX_CONTROL + 1).to_be_bytes());
        assert!(decode_header(&h).is_err());
    }

    async fn pair(
        a: Identity<'static>,
        b: Identity<'static>,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (x, y) = tokio::io::duplex(1 << 16);
        // Each side owns its end, so a side that gives up closes it, as a socket would.
        let side = |mut s: tokio::io::DuplexStream, id: Identity<'static>| async move {
            handshake(&mut s, &id).await
        };
        tokio::join!(side(x, a), side(y, b))
    }

    fn id(node: &'static str, peer: &'static str, secret: &'static [u8]) -> Identity<'static> {
        Identity {
            resource: "r0",
            node,
            peer,
            size: 1 << 30,
            secret,
        }
    }

    #[tokio::test]
    async fn handshake_authenticates_both_ways() {
        let (a, b) = pair(
            id("alpha", "beta", b"s3cret"),
            id("beta", "alpha", b"s3cret"),
        )
        .await;
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        let (a, b) = pair(
            id("alpha", "beta", b"s3cret"),
            id("beta", "alpha", b"wrong"),
        )
        .await;
        assert!(matches!(a, Err(HandshakeError::AuthFailed)));
        assert!(matches!(b, Err(HandshakeError::AuthFailed)));
    }

    #[tokio::test]
    async fn handshake_reports_typed_mismatches() {
        let mut other = id("beta", "alpha", b"k");
        other.size = 1;
        let (a, _) = pair(id("alpha", "beta", b"k"), other).await;
        assert!(
            matches!(a, Err(HandshakeError::SizeMismatch { theirs: 1, .. })),
            "{a:?}"
        );
        let mut other = id("beta", "alpha", b"k");
        other.resource = "r1";
        let (a, _) = pair(id("alpha", "beta", b"k"), other).await;
        assert!(
            matches!(a, Err(HandshakeError::ResourceMismatch { .. })),
            "{a:?}"
        );
        let (a, _) = pair(id("alpha", "beta", b"k"), id("gamma", "alpha", b"k")).await;
        assert!(
            matches!(a, Err(HandshakeError::UnexpectedNode { .. })),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn handshake_rejects_a_different_version() {
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let ours = id("alpha", "beta", b"k");
        let fake = async move {
            let hello = Message::Hello {
                version: PROTOCOL_VERSION + 1,
                resource: "r0".into(),
                node: "beta".into(),
                size: 1 << 30,
                challenge: [0; 32],
            };
            write_control(&mut y, &hello).await.unwrap();
            let _ = read_frame(&mut y).await;
        };
        let (r, ()) = tokio::join!(handshake(&mut x, &ours), fake);
        assert!(
            matches!(r, Err(HandshakeError::VersionMismatch { theirs, .. }) if theirs == PROTOCOL_VERSION + 1),
            "{r:?}"
        );
    }

    proptest! {
        /// Garbage on the replication port: decoding returns an error or a frame, never panics,
        /// and never allocates for a body beyond the caps.
        #[test]
        fn decoder_survives_garbage(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN..HEADER_LEN + 256)) {
            let h: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
            if let Ok((kind, _, _, _, len, _)) = decode_header(&h) {
                let cap = if kind == Kind::Control { MAX_CONTROL } else { MAX_BODY };
                prop_assert!(len <= cap);
            }
            let _ = decode_frame(&h, Bytes::copy_from_slice(&bytes[HEADER_LEN..]));
        }
    }
}
