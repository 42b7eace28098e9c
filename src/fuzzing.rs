//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz) and for `tests/fuzz_corpora.rs`,
//! which replays the committed corpora through the same functions on stable Rust.
//!
//! Each `pub fn <target>(data: &[u8])` runs one decoder on untrusted bytes and panics only when
//! the decoder panics or gives a wrong answer: where it is cheap, what decoded is encoded again
//! and must decode to the same value, and what the decoder accepted must satisfy the invariants
//! its callers rely on. Nothing here does IO except on in-memory buffers; async decoders are
//! polled once with a no-op waker (in-memory readers never return `Pending`).
//!
//! [`seeds`] builds the seed inputs from the crate's own encoders; `fuzz/README.md` says how
//! to write them out.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes};
use nbd_wire::consts::*;
use nbd_wire::handshake::MAX_BUFFERED_OPTION;
use nbd_wire::transmission::{MAX_PAYLOAD, REQUEST_LEN};
use nbd_wire::{
    validate, Command, ExportCatalog, ExportInfo, ExportLimits, HandshakeError, Outcome, Refusal,
    RequestHeader, ServerHandshake,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{Config, Fencing, AL_EXTENTS_RANGE};
use crate::meta::actlog::{self, scan_ring, Transaction, TxFault, UPDATES_PER_TX};
use crate::meta::bitmap::{Bitmap, BmFault, BITS_PER_BLOCK};
use crate::meta::superblock::{block_crc, Superblock, BLOCK_SIZE};
use crate::repl::proto as peer;
use crate::witness::proto as witness;

/// Run a future that only touches in-memory buffers to completion.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a future over in-memory buffers returned Pending"),
    }
}

/// A tiny deterministic generator for split points (xorshift32).
struct Rng(u32);

impl Rng {
    fn new(seed: u16) -> Self {
        Rng((u32::from(seed) << 8) | 0x9e37_0001)
    }
    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
    /// Mostly small chunks, sometimes large ones.
    fn chunk(&mut self) -> usize {
        let r = self.next();
        if r.is_multiple_of(8) {
            1 + (r >> 8) as usize % 4096
        } else {
            1 + (r >> 8) as usize % 24
        }
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Up to 8 bytes at `at` as a little-endian integer, missing bytes zero.
fn le_u64_padded(b: &[u8], at: usize, len: usize) -> u64 {
    let mut v = [0u8; 8];
    for (i, slot) in v.iter_mut().enumerate().take(len) {
        *slot = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(v)
}

// ---------------------------------------------------------------------------------------
// nbd_handshake

/// A small catalog: the default export, a read-only one, one refused by policy with a long
/// message (truncated on the wire) and unknown names.
pub struct FuzzCatalog;

pub const FUZZ_EXPORT: &str = "disk0";

impl ExportCatalog for FuzzCatalog {
    fn list(&self) -> Vec<(String, String)> {
        vec![
            (FUZZ_EXPORT.into(), "the first disk".into()),
            ("ro".into(), String::new()),
            ("secondary".into(), "refused by policy".into()),
        ]
    }

    fn lookup(&self, name: &str) -> Result<ExportInfo, Refusal> {
        let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM;
        match name {
            "" | FUZZ_EXPORT => Ok(ExportInfo {
                name: FUZZ_EXPORT.into(),
                description: "the first disk".into(),
                size: 1 << 30,
                transmission_flags: flags,
                block_size: (1, 4096, MAX_PAYLOAD),
            }),
            "ro" => Ok(ExportInfo {
                name: "ro".into(),
                description: String::new(),
                size: 3 * 4096 + 1,
                transmission_flags: flags | FLAG_READ_ONLY,
                block_size: (512, 4096, 1 << 20),
            }),
            "secondary" => Err(Refusal {
                code: REP_ERR_POLICY,
                // Longer than MAX_STRING, with multi-byte characters at the cut.
                message: "this node is secondary; the primary is bêta at 10.0.0.2:10809. "
                    .repeat(80),
            }),
            _ => Err(Refusal {
                code: REP_ERR_UNKNOWN,
                message: format!("no export named {name:?}"),
            }),
        }
    }
}

type HsResult = Result<(usize, Option<Outcome>), HandshakeError>;

/// Feed `client` in one call.
fn handshake_at_once(client: &[u8]) -> (HsResult, Vec<u8>, ServerHandshake<FuzzCatalog>) {
    let mut hs = ServerHandshake::new(FuzzCatalog);
    let r = hs.receive(client);
    let out = hs.take_output();
    (r, out, hs)
}

/// Feed `client` as the server does: never more than `wants()` bytes per call, in chunks
/// chosen by `rng`. Returns the same shape as one call with everything.
fn handshake_by_wants(
    client: &[u8],
    rng: &mut Rng,
) -> (HsResult, Vec<u8>, ServerHandshake<FuzzCatalog>) {
    let mut hs = ServerHandshake::new(FuzzCatalog);
    let mut out = hs.take_output();
    let mut used = 0;
    loop {
        let want = hs.wants();
        assert!(
            want <= (MAX_BUFFERED_OPTION as usize).max(64 * 1024),
            "wants() = {want} exceeds the memory bound"
        );
        let n = want.min(rng.chunk()).min(client.len() - used);
        if n == 0 {
            assert!(want > 0, "wants() is 0 before an outcome");
            return (Ok((used, None)), out, hs);
        }
        let r = hs.receive(&client[used..used + n]);
        out.extend(hs.take_output());
        match r {
            Ok((got, outcome)) => {
                assert_eq!(got, n, "a chunk within wants() is consumed whole");
                used += got;
                if let Some(o) = outcome {
                    return (Ok((used, Some(o))), out, hs);
                }
            }
            Err(e) => return (Err(e), out, hs),
        }
    }
}

/// Feed `client` in arbitrary chunks, ignoring `wants()`.
fn handshake_by_chunks(
    client: &[u8],
    rng: &mut Rng,
) -> (HsResult, Vec<u8>, ServerHandshake<FuzzCatalog>) {
    let mut hs = ServerHandshake::new(FuzzCatalog);
    let mut out = hs.take_output();
    let mut used = 0;
    while used < client.len() {
        let n = rng.chunk().min(client.len() - used);
        let r = hs.receive(&client[used..used + n]);
        out.extend(hs.take_output());
        match r {
            Ok((got, outcome)) => {
                used += got;
                if let Some(o) = outcome {
                    assert!(got <= n);
                    return (Ok((used, Some(o))), out, hs);
                }
                assert_eq!(got, n, "without an outcome every byte is consumed");
            }
            Err(e) => return (Err(e), out, hs),
        }
    }
    (Ok((used, None)), out, hs)
}

/// The server's output: the greeting, option replies, and for `NBD_OPT_EXPORT_NAME` the
/// export size and flags (plus 124 zero bytes unless the client said `NO_ZEROES`).
fn check_handshake_output(out: &[u8], result: &HsResult) {
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(be_u64(out, 0), NBDMAGIC);
    assert_eq!(be_u64(out, 8), IHAVEOPT);
    let mut b = &out[18..];
    while b.len() >= 20 && be_u64(b, 0) == OPT_REPLY_MAGIC {
        let kind = be_u32(b, 12);
        let len = be_u32(b, 16) as usize;
        assert!(b.len() >= 20 + len, "truncated option reply");
        let data = &b[20..20 + len];
        if kind & 0x8000_0000 != 0 {
            assert!(len <= MAX_STRING, "error message of {len} bytes");
            assert!(std::str::from_utf8(data).is_ok(), "error message not UTF-8");
        }
        match kind {
            REP_ACK => assert_eq!(len, 0),
            REP_INFO => assert!(len >= 2),
            REP_SERVER => assert!(len >= 4 && be_u32(data, 0) as usize <= len - 4),
            REP_META_CONTEXT => assert!(len > 4),
            _ => {}
        }
        b = &b[20 + len..];
    }
    match result {
        // EXPORT_NAME ends with size + flags (+ zeroes).
        Ok((_, Some(Outcome::Transmission(n)))) if !b.is_empty() => {
            assert!(b.len() == 10 || b.len() == 134, "tail of {} bytes", b.len());
            assert_eq!(be_u64(b, 0), n.export.size);
            assert!(b[10..].iter().all(|&c| c == 0));
        }
        _ => assert!(
            b.is_empty(),
            "{} bytes after the last option reply",
            b.len()
        ),
    }
}

/// `[seed u16 LE][client bytes...]`: the client's side of a handshake (and possibly the first
/// transmission bytes), fed whole, within `wants()` in chunks, and in arbitrary chunks; all
/// three must agree on the outcome, the consumed length and every byte of output.
pub fn nbd_handshake(data: &[u8]) {
    let seed = le_u64_padded(data, 0, 2) as u16;
    let client = data.get(2..).unwrap_or(&[]);
    let (r1, out1, mut hs1) = handshake_at_once(client);
    let (r2, out2, _) = handshake_by_wants(client, &mut Rng::new(seed));
    let (r3, out3, _) = handshake_by_chunks(client, &mut Rng::new(seed ^ 0x5a5a));
    assert_eq!(r1, r2, "whole vs within wants()");
    assert_eq!(r1, r3, "whole vs arbitrary chunks");
    assert_eq!(out1, out2);
    assert_eq!(out1, out3);
    check_handshake_output(&out1, &r1);
    match &r1 {
        Ok((used, Some(outcome))) => {
            assert!(*used <= client.len());
            assert_eq!(hs1.wants(), 0);
            assert_eq!(hs1.receive(b"x"), Err(HandshakeError::AlreadyFinished));
            if let Outcome::Transmission(n) = outcome {
                let looked_up = FuzzCatalog.lookup(&n.export.name);
                assert_eq!(looked_up.as_ref(), Ok(&n.export));
                assert!(n.base_allocation.is_none() || n.structured_replies);
            }
        }
        Ok((used, None)) => assert_eq!(*used, client.len()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

// ---------------------------------------------------------------------------------------
// nbd_request

/// `[28-byte request header][size u64 LE][limits flags u8]`, missing bytes zero.
pub fn nbd_request(data: &[u8]) {
    let mut raw = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    raw[..n].copy_from_slice(&data[..n]);
    let size = le_u64_padded(data, REQUEST_LEN, 8);
    let f = data.get(REQUEST_LEN + 8).copied().unwrap_or(0);
    let lim = ExportLimits {
        size,
        read_only: f & 1 != 0,
        structured_replies: f & 2 != 0,
        block_status: f & 4 != 0,
    };
    let h = match RequestHeader::decode(&raw) {
        Ok(h) => h,
        Err(e) => {
            assert_eq!(e.0, be_u32(&raw, 0));
            assert_ne!(e.0, REQUEST_MAGIC);
            let _ = e.to_string();
            return;
        }
    };
    let mut again = Vec::new();
    h.encode(&mut again);
    assert_eq!(again, raw, "encode(decode(x)) != x");
    assert_eq!(
        h.payload_len(),
        if h.kind == CMD_WRITE { h.length } else { 0 }
    );
    let in_range = |offset: u64, length: u32| {
        offset
            .checked_add(u64::from(length))
            .is_some_and(|e| e <= size)
    };
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match validate(&h, &lim) {
        Ok(cmd) => {
            let allowed = match h.kind {
                CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
                _ => CMD_FLAG_FUA,
            };
            assert_eq!(h.flags & !allowed, 0, "unknown flags accepted: {h:?}");
            let writes = matches!(
                cmd,
                Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
            );
            assert!(!(writes && lim.read_only), "write to a read-only export");
            match cmd {
                Command::Read { offset, length } => {
                    assert_eq!((h.kind, offset, length), (CMD_READ, h.offset, h.length));
                    assert!(in_range(offset, length) && length <= MAX_PAYLOAD);
                }
                Command::Write {
                    offset,
                    length,
                    fua: f,
                } => {
                    assert_eq!(
                        (h.kind, offset, length, f),
                        (CMD_WRITE, h.offset, h.length, fua)
                    );
                    assert!(in_range(offset, length) && length <= MAX_PAYLOAD);
                }
                Command::Disconnect => assert_eq!(h.kind, CMD_DISC),
                Command::Flush => {
                    assert_eq!((h.kind, h.offset, h.length), (CMD_FLUSH, 0, 0));
                }
                Command::Trim {
                    offset,
                    length,
                    fua: f,
                } => {
                    assert_eq!(
                        (h.kind, offset, length, f),
                        (CMD_TRIM, h.offset, h.length, fua)
                    );
                    assert!(in_range(offset, length));
                }
                Command::Cache { offset, length } => {
                    assert_eq!((h.kind, offset, length), (CMD_CACHE, h.offset, h.length));
                    assert!(in_range(offset, length));
                }
                Command::WriteZeroes {
                    offset,
                    length,
                    fua: f,
                    no_hole,
                } => {
                    assert_eq!(
                        (h.kind, offset, length, f, no_hole),
                        (
                            CMD_WRITE_ZEROES,
                            h.offset,
                            h.length,
                            fua,
                            h.flags & CMD_FLAG_NO_HOLE != 0
                        )
                    );
                    assert!(in_range(offset, length));
                }
                Command::BlockStatus {
                    offset,
                    length,
                    req_one,
                } => {
                    assert_eq!(
                        (h.kind, offset, length, req_one),
                        (
                            CMD_BLOCK_STATUS,
                            h.offset,
                            h.length,
                            h.flags & CMD_FLAG_REQ_ONE != 0
                        )
                    );
                    assert!(lim.structured_replies && lim.block_status);
                    assert!(in_range(offset, length) && length > 0);
                }
            }
        }
        Err(errno) => assert!(
            [EPERM, EINVAL, ENOSPC].contains(&errno),
            "unexpected error {errno} for {h:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------
// peer_frame

/// A stream that reads scripted bytes and records what is written to it.
struct Scripted<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The identity the fuzzed peer handshake runs as; the fuzzer plays "beta".
pub const PEER_ID: peer::Identity<'static> = peer::Identity {
    resource: "r0",
    node: "alpha",
    peer: "beta",
    size: 1 << 30,
    secret: b"fuzz-secret",
};

/// Encoding a decoded frame again must give the same frame.
fn check_frame(frame: &peer::Frame) {
    use peer::{Frame, Kind};
    let (kind, seq, offset, fua, data) = match frame {
        Frame::Control(m) => {
            let b = peer::encode_control(m);
            let h: [u8; peer::HEADER_LEN] = b[..peer::HEADER_LEN].try_into().unwrap();
            match peer::decode_frame(&h, b.slice(peer::HEADER_LEN..)) {
                Ok(Frame::Control(again)) => assert_eq!(&again, m),
                other => panic!("re-encoded {m:?} decodes as {other:?}"),
            }
            return;
        }
        Frame::Write {
            seq,
            offset,
            fua,
            data,
        } => (Kind::Write, *seq, *offset, *fua, data),
        Frame::ResyncData { seq, offset, data } => (Kind::ResyncData, *seq, *offset, false, data),
    };
    let h = peer::encode_data_header(kind, seq, offset, fua, data);
    let again = peer::decode_frame(&h, data.clone()).expect("a re-encoded data frame decodes");
    let same = match again {
        Frame::Write {
            seq: s,
            offset: o,
            fua: f,
            data: d,
        } => kind == Kind::Write && (s, o, f) == (seq, offset, fua) && d == data,
        Frame::ResyncData {
            seq: s,
            offset: o,
            data: d,
        } => kind == Kind::ResyncData && (s, o) == (seq, offset) && d == data,
        Frame::Control(_) => false,
    };
    assert!(same, "data frame does not round-trip");
}

/// A control frame's body must be exactly one message: anything after it is garbage.
fn check_control_body(body: &[u8]) {
    if let Ok((_, rest)) = postcard::take_from_bytes::<peer::Message>(body) {
        assert!(
            rest.is_empty(),
            "a control body with {} trailing bytes was accepted",
            rest.len()
        );
    }
}

/// `data` with the CRC of every complete frame recomputed, so that mutated bodies get past the
/// checksum to the message decoder; `None` if that changes nothing.
fn with_frame_crcs(data: &[u8]) -> Option<Vec<u8>> {
    let mut fixed = data.to_vec();
    let mut at = 0;
    while fixed.len() - at >= peer::HEADER_LEN {
        let len = be_u32(&fixed, at + 24) as usize;
        let start = at + peer::HEADER_LEN;
        if len > fixed.len() - start {
            break;
        }
        let crc = crc32fast::hash(&fixed[start..start + len]);
        fixed[at + 28..at + 32].copy_from_slice(&crc.to_be_bytes());
        at = start + len;
    }
    (fixed != data).then_some(fixed)
}

/// The bytes a peer sends: one frame through `decode_header`/`decode_frame`, the whole input
/// as a stream through `read_frame`, and the input as the peer's side of the handshake
/// (which must never succeed without the secret, and must send nothing but Hello before the
/// peer's Hello matched). All of it once as given and once with every frame's CRC corrected.
pub fn peer_frame(data: &[u8]) {
    peer_frame_once(data);
    if let Some(fixed) = with_frame_crcs(data) {
        peer_frame_once(&fixed);
    }
}

fn peer_frame_once(data: &[u8]) {
    if data.len() >= peer::HEADER_LEN {
        let h: [u8; peer::HEADER_LEN] = data[..peer::HEADER_LEN].try_into().unwrap();
        let body = &data[peer::HEADER_LEN..];
        if let Ok((kind, flags, seq, offset, len, crc)) = peer::decode_header(&h) {
            let cap = if kind == peer::Kind::Control {
                peer::MAX_CONTROL
            } else {
                peer::MAX_BODY
            };
            assert!(len <= cap);
            assert_eq!(h[4], kind as u8);
            assert_eq!(h[5], flags);
            assert_eq!(be_u64(&h, 8), seq);
            assert_eq!(be_u64(&h, 16), offset);
            assert_eq!(be_u32(&h, 24), len);
            assert_eq!(be_u32(&h, 28), crc);
        }
        match peer::decode_frame(&h, Bytes::copy_from_slice(body)) {
            Ok(frame) => {
                if let peer::Frame::Control(_) = frame {
                    check_control_body(body);
                }
                check_frame(&frame);
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
        }
    }

    let mut r = data;
    for _ in 0..64 {
        let before = r;
        match block_on(peer::read_frame(&mut r)) {
            Ok(frame) => {
                if let peer::Frame::Control(_) = frame {
                    let len = be_u32(before, 24) as usize;
                    check_control_body(&before[peer::HEADER_LEN..peer::HEADER_LEN + len]);
                }
                check_frame(&frame);
            }
            Err(_) => break,
        }
    }

    let mut s = Scripted {
        input: data,
        output: Vec::new(),
    };
    let r = block_on(peer::handshake(&mut s, &PEER_ID));
    assert!(r.is_err(), "the handshake succeeded without the secret");
    // What this side sent: its Hello, then Auth only if the peer's Hello matched.
    let mut sent = &s.output[..];
    let mut frames = Vec::new();
    while !sent.is_empty() {
        match block_on(peer::read_frame(&mut sent)) {
            Ok(peer::Frame::Control(m)) => frames.push(m),
            other => panic!("this side sent {other:?}"),
        }
    }
    assert!(matches!(frames.first(), Some(peer::Message::Hello { .. })));
    assert!(frames.len() <= 2, "sent {} frames", frames.len());
    if frames.len() == 2 {
        assert!(matches!(frames[1], peer::Message::Auth { .. }));
        let mut r = data;
        match block_on(peer::read_frame(&mut r)) {
            Ok(peer::Frame::Control(peer::Message::Hello {
                version,
                resource,
                node,
                size,
                ..
            })) => {
                assert_eq!(version, peer::PROTOCOL_VERSION);
                assert_eq!(resource, PEER_ID.resource);
                assert_eq!(node, PEER_ID.peer);
                assert_eq!(size, PEER_ID.size);
            }
            other => panic!("sent Auth after {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// witness_proto

fn check_witness_msg(m: &witness::Message, body: Option<&[u8]>) {
    let again = block_on(witness::read_msg(&mut &witness::encode(m)[..]))
        .expect("a re-encoded witness message decodes");
    assert_eq!(&again, m);
    if let Some(body) = body {
        if let Ok((_, rest)) = postcard::take_from_bytes::<witness::Message>(body) {
            assert!(
                rest.is_empty(),
                "a witness frame with {} trailing bytes was accepted",
                rest.len()
            );
        }
    }
    match m {
        // What the witness checks before anything else: names become file names.
        witness::Message::Hello { resource, node, .. } => {
            for name in [resource, node] {
                if witness::valid_name(name) {
                    assert!(!name.is_empty() && name.len() <= 200);
                    assert!(name != "." && name != "..");
                    assert!(!name.contains('/') && !name.contains('\0'));
                }
            }
        }
        // What a client prints.
        witness::Message::Reply(r) => {
            let _ = r.to_string();
        }
        witness::Message::Request(r) => {
            let _ = format!("{r:?}");
        }
        _ => {}
    }
}

/// A stream of witness frames, read with `read_msg` until the first error.
pub fn witness_proto(data: &[u8]) {
    let mut r = data;
    for _ in 0..64 {
        let before = r;
        match block_on(witness::read_msg(&mut r)) {
            Ok(m) => {
                let len = be_u32(before, 0) as usize;
                check_witness_msg(&m, Some(&before[4..4 + len]));
            }
            Err(e) => {
                assert!(matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ));
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// meta_blocks

const META_HEADER: usize = 16;
const SB_CRC_OFF: usize = 12;
const AL_CRC_OFF: usize = 8;
const BM_CRC_OFF: usize = 8;

fn fix_crc(b: &mut [u8], off: usize) {
    let crc = block_crc(b, off);
    b[off..off + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Block `i` of the payload, zero-padded to 4 KiB.
fn block(payload: &[u8], i: usize) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    if let Some(src) = payload.get(i * BLOCK_SIZE..) {
        let n = src.len().min(BLOCK_SIZE);
        b[..n].copy_from_slice(&src[..n]);
    }
    b
}

/// `[mode u8][flags u8][param u16 LE][n u32 LE][md_id u64 LE][4 KiB blocks...]`.
///
/// mode % 4: 0 superblock, 1 one activity-log transaction, 2 an activity-log ring,
/// 3 one bitmap block. flags bit 0: recompute each block's CRC (so mutations get past the
/// checksum); bit 1: tolerate a torn ring block (unclean shutdown); bit 2: leave the last
/// given ring block's CRC alone; bit 3: renumber the ring's transactions so that the newest
/// is near `u64::MAX - (flags >> 4)`. `param`: al-extents (clamped to 67..=65534) or, for bitmap
/// blocks, the block index. `n`: device extents, or for bitmap blocks the device's bits.
pub fn meta_blocks(data: &[u8]) {
    let mode = data.first().copied().unwrap_or(0) % 4;
    let flags = data.get(1).copied().unwrap_or(0);
    let fix = flags & 1 != 0;
    let param = le_u64_padded(data, 2, 2) as u32;
    let n = le_u64_padded(data, 4, 4);
    let md_id = le_u64_padded(data, 8, 8);
    let payload = data.get(META_HEADER..).unwrap_or(&[]);
    let al_extents = param.clamp(67, 65534);
    match mode {
        0 => {
            let mut b = block(payload, 0);
            if fix {
                fix_crc(&mut b, SB_CRC_OFF);
            }
            meta_superblock(&b);
        }
        1 => {
            let mut b = block(payload, 0);
            if fix {
                fix_crc(&mut b, AL_CRC_OFF);
            }
            meta_transaction(&b, md_id, al_extents, n);
        }
        2 => {
            let ring = actlog::ring_blocks(al_extents) as usize;
            let given = payload.len().div_ceil(BLOCK_SIZE).min(ring);
            let mut blocks: Vec<Vec<u8>> = (0..ring).map(|i| block(payload, i)).collect();
            if flags & 8 != 0 {
                rebase_ring(&mut blocks[..given], ring as u64, u64::from(flags >> 4));
            }
            let blocks: Vec<Vec<u8>> = blocks
                .into_iter()
                .enumerate()
                .map(|(i, mut b)| {
                    let keep = flags & 4 != 0 && i + 1 == given;
                    if fix && i < given && !keep {
                        fix_crc(&mut b, AL_CRC_OFF);
                    }
                    b
                })
                .collect();
            meta_ring(&blocks, md_id, al_extents, n, flags & 2 != 0);
        }
        _ => {
            let nbits = 1 + n % (3 * BITS_PER_BLOCK);
            let mut b = block(payload, 0);
            if fix {
                fix_crc(&mut b, BM_CRC_OFF);
            }
            meta_bitmap(&b, nbits, u64::from(param), md_id);
        }
    }
}

/// Shift the transaction numbers of the activity-log blocks (keeping their ring positions)
/// so that the newest is within `ring` of `u64::MAX - below`: the edge of the number space,
/// which mutations do not reach alone.
fn rebase_ring(blocks: &mut [Vec<u8>], ring: u64, below: u64) {
    let tr = |b: &[u8]| u64::from_le_bytes(b[24..32].try_into().unwrap());
    let ours = |b: &[u8]| b[0..8] == actlog::AL_MAGIC;
    let Some(newest) = blocks.iter().filter(|b| ours(b)).map(|b| tr(b)).max() else {
        return;
    };
    let top = u64::MAX - below;
    let target = top - (top % ring + ring - newest % ring) % ring;
    let delta = target.wrapping_sub(newest);
    for b in blocks.iter_mut().filter(|b| ours(b)) {
        let t = tr(b).wrapping_add(delta);
        b[24..32].copy_from_slice(&t.to_le_bytes());
    }
}

fn meta_superblock(b: &[u8]) {
    if let Ok(sb) = Superblock::decode(b) {
        assert_eq!(Superblock::decode(&sb.encode()).as_ref(), Ok(&sb));
        assert!(sb.encode() == b[..BLOCK_SIZE], "encode(decode(b)) != b");
        let l = sb.layout();
        assert!(l.bm_offset.checked_add(l.bm_blocks).is_some());
        assert_eq!(l.al_offset, 1);
    }
}

fn meta_transaction(b: &[u8], md_id: u64, al_extents: u32, n_extents: u64) {
    match Transaction::decode(b, md_id, al_extents, n_extents) {
        Ok(tx) => {
            assert!(tx.updates.len() <= UPDATES_PER_TX);
            assert!(tx.context_start < al_extents);
            for &(slot, extent) in &tx.updates {
                assert!(slot < al_extents && u64::from(extent) < n_extents);
            }
            assert!(tx
                .context
                .iter()
                .all(|&e| e == actlog::EMPTY || u64::from(e) < n_extents));
            let again = tx.encode(md_id, al_extents);
            assert_eq!(
                Transaction::decode(&again, md_id, al_extents, n_extents).as_ref(),
                Ok(&tx)
            );
            assert!(again == b[..BLOCK_SIZE], "encode(decode(b)) != b");
            let salvaged = Transaction::salvage_updates(b, md_id, tx.tr, n_extents);
            let updates: Vec<u32> = tx.updates.iter().map(|u| u.1).collect();
            assert_eq!(salvaged, updates);
        }
        Err(TxFault::BadChecksum) => {
            let tr = u64::from_le_bytes(b[24..32].try_into().unwrap());
            let salvaged = Transaction::salvage_updates(b, md_id, tr, n_extents);
            assert!(salvaged.len() <= UPDATES_PER_TX);
            assert!(salvaged.iter().all(|&e| u64::from(e) < n_extents));
        }
        Err(TxFault::Invalid(_)) => {}
    }
}

fn meta_ring(blocks: &[Vec<u8>], md_id: u64, al_extents: u32, n_extents: u64, torn: bool) {
    let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let ring = blocks.len() as u64;
    match scan_ring(&refs, md_id, al_extents, n_extents, torn) {
        Ok(st) => {
            assert!(st.hot.windows(2).all(|w| w[0] < w[1]), "hot not sorted");
            assert!(st.hot.iter().all(|&e| u64::from(e) < n_extents));
            assert!(st.hot.len() <= al_extents as usize);
            // The caller numbers the next transaction `newest + 1`.
            assert!(st.newest.checked_add(1).is_some(), "newest is u64::MAX");
            let newest = refs
                .iter()
                .filter_map(|b| Transaction::decode(b, md_id, al_extents, n_extents).ok())
                .map(|t| t.tr)
                .max();
            assert_eq!(newest, Some(st.newest));
            if let Some((pos, salvaged)) = &st.torn {
                assert!(torn);
                assert_eq!(u64::from(*pos), (st.newest + 1) % ring);
                assert!(salvaged.iter().all(|&e| u64::from(e) < n_extents));
            }
        }
        Err((pos, what)) => {
            assert!(u64::from(pos) < ring);
            assert!(!what.is_empty());
        }
    }
}

fn meta_bitmap(b: &[u8], nbits: u64, param: u64, md_id: u64) {
    let mut bm = Bitmap::new(nbits);
    let index = param % bm.blocks();
    match bm.decode_block(index, md_id, b) {
        Ok(()) => {
            let ones: u64 = bm.words().iter().map(|w| u64::from(w.count_ones())).sum();
            assert_eq!(bm.count(), ones);
            assert!(!bm.is_dirty(index));
            if !nbits.is_multiple_of(64) {
                let last = *bm.words().last().unwrap();
                assert_eq!(last >> (nbits % 64), 0, "bits beyond the device");
            }
            let mut again = vec![0u8; BLOCK_SIZE];
            bm.encode_block(index, md_id, &mut again);
            assert!(again == b[..BLOCK_SIZE], "encode(decode(b)) != b");
        }
        Err(BmFault::BadChecksum) | Err(BmFault::Invalid(_)) => {
            assert_eq!(bm.count(), 0, "a rejected block left bits behind");
        }
    }
}

// ---------------------------------------------------------------------------------------
// config

pub const CONFIG_PATH: &str = "/etc/tandem/fuzz.toml";

/// Arbitrary bytes (lossily converted to UTF-8) through `Config::parse`. An accepted
/// configuration must satisfy what the rest of tandem relies on.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new(CONFIG_PATH);
    match Config::parse(&text, path) {
        Ok(c) => {
            assert_eq!(c.path, path);
            assert_eq!(c.nodes.len(), 2);
            assert_ne!(c.nodes[0].name, c.nodes[1].name);
            for name in [&c.resource.name, &c.nodes[0].name, &c.nodes[1].name] {
                assert!(!name.is_empty());
                assert!(name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')));
            }
            for n in &c.nodes {
                assert!(!n.disk.as_os_str().is_empty());
                assert!(!n.meta.as_os_str().is_empty());
                assert!(!n.control.as_os_str().is_empty());
            }
            assert!(c.net.ping_timeout > c.net.ping_interval);
            assert!(!c.net.ping_interval.is_zero() && !c.net.connect_interval.is_zero());
            assert!(!c.net.peer_flush_interval.is_zero());
            assert_eq!(
                c.net.secret_file.is_some(),
                c.net.secret_file_line.is_some()
            );
            assert!(AL_EXTENTS_RANGE.contains(&c.activity_log.extents));
            match c.failover.fencing {
                Fencing::Witness => {
                    assert!(c.failover.witness.is_some());
                    assert!(c.failover.lease >= c.net.ping_timeout);
                    // The lease is sent to the witness in whole milliseconds, which grants
                    // only 1..=MAX_LEASE_MS.
                    let ms = c.failover.lease.as_millis();
                    assert!(
                        (1..=u128::from(witness::MAX_LEASE_MS)).contains(&ms),
                        "accepted a lease of {ms} ms that the witness always refuses"
                    );
                }
                Fencing::Handler => assert!(c.failover.fence_handler.is_some()),
                Fencing::None => {}
            }
            let _ = c.node_names();
            let _ = c.peer(&c.nodes[0].name).expect("a node has a peer");
        }
        Err(e) => {
            assert_eq!(e.path, path);
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.split('\n').count(), "line {line}");
            }
            let shown = e.to_string();
            assert!(shown.starts_with(CONFIG_PATH));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Seeds

/// The fuzz targets, in the order of the `fuzz/fuzz_targets` files.
pub const TARGETS: &[&str] = &[
    "nbd_handshake",
    "nbd_request",
    "peer_frame",
    "witness_proto",
    "meta_blocks",
    "config",
];

/// The entry point of a target by name.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "nbd_handshake" => nbd_handshake,
        "nbd_request" => nbd_request,
        "peer_frame" => peer_frame,
        "witness_proto" => witness_proto,
        "meta_blocks" => meta_blocks,
        "config" => config,
        _ => return None,
    })
}

/// Seed inputs for every target, made with the crate's own encoders:
/// `(target, file name, bytes)`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, data) in seeds_handshake() {
        out.push(("nbd_handshake", name, data));
    }
    for (name, data) in seeds_request() {
        out.push(("nbd_request", name, data));
    }
    for (name, data) in seeds_peer() {
        out.push(("peer_frame", name, data));
    }
    for (name, data) in seeds_witness() {
        out.push(("witness_proto", name, data));
    }
    for (name, data) in seeds_meta() {
        out.push(("meta_blocks", name, data));
    }
    for (name, data) in seeds_config() {
        out.push(("config", name, data));
    }
    out
}

fn opt(o: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(o);
    v.put_u32(payload.len() as u32);
    v.put_slice(payload);
    v
}

fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.put_u16(infos.len() as u16);
    for i in infos {
        v.put_u16(*i);
    }
    v
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.put_u32(queries.len() as u32);
    for q in queries {
        v.put_u32(q.len() as u32);
        v.put_slice(q.as_bytes());
    }
    v
}

fn request(kind: u16, flags: u16, offset: u64, length: u32) -> Vec<u8> {
    let mut v = Vec::new();
    RequestHeader {
        flags,
        kind,
        cookie: 0x1234_5678_9abc_def0,
        offset,
        length,
    }
    .encode(&mut v);
    v
}

fn seeds_handshake() -> Vec<(String, Vec<u8>)> {
    let fixed = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut clients: Vec<(&str, Vec<u8>)> = Vec::new();
    // qemu-nbd / qemu-img as a client: structured replies, base:allocation, GO.
    let mut qemu = fixed.to_vec();
    qemu.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    qemu.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_payload(FUZZ_EXPORT, &[META_BASE_ALLOCATION]),
    ));
    qemu.extend(opt(OPT_GO, &info_payload(FUZZ_EXPORT, &[INFO_BLOCK_SIZE])));
    qemu.extend(request(CMD_READ, 0, 0, 512));
    clients.push(("qemu", qemu));
    // libnbd (nbdinfo --list): list, then INFO of each export with names and descriptions.
    let mut libnbd = fixed.to_vec();
    libnbd.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    libnbd.extend(opt(OPT_LIST, &[]));
    for name in [FUZZ_EXPORT, "ro", "secondary", "nope"] {
        libnbd.extend(opt(OPT_LIST_META_CONTEXT, &meta_payload(name, &["base:"])));
        libnbd.extend(opt(
            OPT_INFO,
            &info_payload(name, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        ));
    }
    libnbd.extend(opt(OPT_ABORT, &[]));
    clients.push(("libnbd_list", libnbd));
    // The kernel's nbd-client: EXPORT_NAME, with and without zeroes.
    let mut old = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    old.extend(opt(OPT_EXPORT_NAME, FUZZ_EXPORT.as_bytes()));
    old.extend(request(CMD_DISC, 0, 0, 0));
    clients.push(("export_name_zeroes", old));
    let mut old = 0u32.to_be_bytes().to_vec();
    old.extend(opt(OPT_EXPORT_NAME, b""));
    clients.push(("export_name_not_fixed", old));
    let mut refused = fixed.to_vec();
    refused.extend(opt(OPT_EXPORT_NAME, b"secondary"));
    clients.push(("export_name_refused", refused));
    // Read-only export with GO and every info, after a LIST_META_CONTEXT with no queries.
    let mut ro = fixed.to_vec();
    ro.extend(opt(OPT_LIST_META_CONTEXT, &meta_payload("ro", &[])));
    ro.extend(opt(
        OPT_GO,
        &info_payload("ro", &[INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION]),
    ));
    clients.push(("go_ro", ro));
    // Refusals and oddities: unknown and unsupported options, STARTTLS, bad payloads, a
    // payload too big to buffer, SET_META_CONTEXT before structured replies.
    let mut odd = fixed.to_vec();
    odd.extend(opt(0x765_4321, b"abc"));
    odd.extend(opt(OPT_STARTTLS, &[]));
    odd.extend(opt(OPT_EXTENDED_HEADERS, &[]));
    odd.extend(opt(OPT_LIST, b"x"));
    odd.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_payload(FUZZ_EXPORT, &[META_BASE_ALLOCATION]),
    ));
    odd.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    odd.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    odd.extend(opt(OPT_INFO, &[0, 0, 0, 9, b'x']));
    odd.extend(opt(OPT_GO, &info_payload("secondary", &[])));
    odd.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_payload(FUZZ_EXPORT, &["x:y"]),
    ));
    odd.extend(opt(OPT_GO, &info_payload("", &[])));
    clients.push(("odd_then_go", odd));
    // A payload too big to buffer (skipped, then answered TOO_BIG) and one too long at all.
    let mut big = fixed.to_vec();
    let mut hdr = opt(OPT_INFO, &[]);
    hdr[12..16].copy_from_slice(&(MAX_BUFFERED_OPTION + 1).to_be_bytes());
    big.extend(&hdr);
    big.extend(vec![0u8; 300]);
    clients.push(("too_big_partial", big));
    let mut huge = fixed.to_vec();
    let mut hdr = opt(OPT_EXPORT_NAME, &[]);
    hdr[12..16].copy_from_slice(&(MAX_BUFFERED_OPTION + 1).to_be_bytes());
    huge.extend(&hdr);
    clients.push(("export_name_too_long", huge));
    let mut abort = fixed.to_vec();
    abort.extend(opt(OPT_ABORT, &[]));
    clients.push(("abort", abort));
    let mut not_fixed = FLAG_C_NO_ZEROES.to_be_bytes().to_vec();
    not_fixed.extend(opt(OPT_GO, &info_payload("", &[])));
    not_fixed.extend(opt(OPT_EXPORT_NAME, b"ro"));
    clients.push(("not_fixed_newstyle", not_fixed));
    let mut bad = fixed.to_vec();
    bad.extend(&opt(OPT_LIST, &[])[..4]);
    bad.extend([0u8; 12]);
    clients.push(("bad_magic", bad));
    clients.push(("unknown_flags", 0x8000_0003u32.to_be_bytes().to_vec()));
    clients
        .into_iter()
        .enumerate()
        .map(|(i, (name, c))| {
            let mut d = (i as u16).wrapping_mul(7919).to_le_bytes().to_vec();
            d.extend(c);
            (name.to_string(), d)
        })
        .collect()
}

fn seeds_request() -> Vec<(String, Vec<u8>)> {
    let size: u64 = 1 << 30;
    let limits = |flags: u8| {
        let mut v = size.to_le_bytes().to_vec();
        v.push(flags);
        v
    };
    let cases: &[(&str, Vec<u8>, u8)] = &[
        ("read", request(CMD_READ, 0, 4096, 65536), 0),
        (
            "read_fua_end",
            request(CMD_READ, CMD_FLAG_FUA, size - 512, 512),
            0,
        ),
        ("read_past_end", request(CMD_READ, 0, size - 512, 1024), 0),
        ("read_too_big", request(CMD_READ, 0, 0, MAX_PAYLOAD + 1), 0),
        ("write_fua", request(CMD_WRITE, CMD_FLAG_FUA, 8192, 4096), 0),
        ("write_ro", request(CMD_WRITE, 0, 0, 4096), 1),
        ("write_enospc", request(CMD_WRITE, 0, size, 1), 0),
        ("disconnect", request(CMD_DISC, 0, 0, 0), 0),
        ("flush", request(CMD_FLUSH, 0, 0, 0), 0),
        ("flush_bad", request(CMD_FLUSH, 0, 1, 0), 0),
        ("trim", request(CMD_TRIM, 0, 0, 1 << 20), 0),
        ("cache", request(CMD_CACHE, 0, 0, 1 << 20), 0),
        (
            "write_zeroes",
            request(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                0,
                1 << 20,
            ),
            0,
        ),
        (
            "block_status",
            request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20),
            6,
        ),
        (
            "block_status_unnegotiated",
            request(CMD_BLOCK_STATUS, 0, 0, 4096),
            2,
        ),
        ("unknown_flag", request(CMD_READ, CMD_FLAG_DF, 0, 4096), 0),
        ("unknown_cmd", request(99, 0, 0, 0), 0),
        ("overflow", request(CMD_TRIM, 0, u64::MAX - 10, 100), 0),
    ];
    let mut v: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(n, r, f)| {
            let mut d = r.clone();
            d.extend(limits(*f));
            (n.to_string(), d)
        })
        .collect();
    let mut bad = request(CMD_READ, 0, 0, 4096);
    bad[0] ^= 0xff;
    v.push(("bad_magic".into(), bad));
    v
}

/// Every peer `Message` variant.
pub fn peer_messages() -> Vec<peer::Message> {
    use crate::meta::Generations;
    use crate::node::{DiskState, Role};
    use peer::{Message, PeerState};
    let gens = Generations {
        current: 0x6A0F_0000_1234_5679,
        bitmap: 0x1111_2222_3333_4444,
        history: [0x5555_6666_7777_8888, 4],
    };
    vec![
        Message::Hello {
            version: peer::PROTOCOL_VERSION,
            resource: PEER_ID.resource.into(),
            node: PEER_ID.peer.into(),
            size: PEER_ID.size,
            challenge: [7; 32],
        },
        Message::Auth { response: [9; 32] },
        Message::State(PeerState {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            gens,
            crashed_primary: false,
            rolled_back: false,
            peer_unflushed: true,
            out_of_sync_bytes: 1 << 20,
            discard_my_data: false,
            epoch: 7,
            primary_epoch: 7,
        }),
        Message::State(PeerState {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            gens: Generations::just_created(),
            crashed_primary: true,
            rolled_back: true,
            peer_unflushed: false,
            out_of_sync_bytes: 0,
            discard_my_data: true,
            epoch: 0,
            primary_epoch: 0,
        }),
        Message::Bitmap {
            first: 3,
            words: vec![1, 2, u64::MAX],
            last: true,
        },
        Message::WriteAck { seq: 42 },
        Message::WriteFailed { seq: 43, errno: 5 },
        Message::Trim {
            seq: 44,
            offset: 4096,
            len: 1 << 20,
        },
        Message::Zero {
            seq: 45,
            offset: 0,
            len: 8192,
            may_trim: true,
        },
        Message::Flush { seq: 46 },
        Message::FlushAck { seq: 46 },
        Message::ResyncAck {
            seq: 47,
            offset: 1 << 22,
            len: 1 << 20,
        },
        Message::ResyncDone { gens },
        Message::VerifyRequest {
            seq: 48,
            offset: 0,
            len: 16384,
        },
        Message::VerifyReply {
            seq: 48,
            digests: vec![1, 2, 3, 0xdead_beef],
        },
        Message::Ping,
        Message::PingAck,
        Message::TakeOver { seq: 49 },
        Message::TakeOverReply {
            seq: 49,
            error: Some("cannot promote: outdated".into()),
        },
        Message::TakeOverReply {
            seq: 50,
            error: None,
        },
        Message::HandOver { seq: 51 },
        Message::Goodbye {
            reason: "disconnect".into(),
        },
        Message::Verifying { active: true },
    ]
}

fn seeds_peer() -> Vec<(String, Vec<u8>)> {
    let msgs = peer_messages();
    let mut v: Vec<(String, Vec<u8>)> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let name = format!("{m:?}");
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            (
                format!("control_{i:02}_{name}"),
                peer::encode_control(m).to_vec(),
            )
        })
        .collect();
    // A session: Hello, Auth, State, a write, resync data, acks.
    let mut session = Vec::new();
    for m in &msgs[..3] {
        session.extend_from_slice(&peer::encode_control(m));
    }
    let data = vec![0xabu8; 4096];
    session.extend(peer::encode_data_header(
        peer::Kind::Write,
        1,
        8192,
        true,
        &data,
    ));
    session.extend(&data);
    session.extend(peer::encode_data_header(
        peer::Kind::ResyncData,
        2,
        0,
        false,
        &data[..512],
    ));
    session.extend(&data[..512]);
    session.extend_from_slice(&peer::encode_control(&peer::Message::WriteAck { seq: 1 }));
    v.push(("session".into(), session));
    let small = [1u8, 2, 3];
    let mut w = peer::encode_data_header(peer::Kind::Write, 9, 0, false, &small).to_vec();
    w.extend(small);
    v.push(("write_small".into(), w));
    // A wrong-version Hello and one for another resource.
    let hello = |version: u32, resource: &str| {
        peer::encode_control(&peer::Message::Hello {
            version,
            resource: resource.into(),
            node: PEER_ID.peer.into(),
            size: PEER_ID.size,
            challenge: [1; 32],
        })
        .to_vec()
    };
    v.push(("hello_v3".into(), hello(3, "r0")));
    v.push(("hello_r1".into(), hello(2, "r1")));
    v
}

/// Every witness `Message` variant (and every `Request`, `Reply` and `Refusal`).
pub fn witness_messages() -> Vec<witness::Message> {
    use witness::{Message, Refusal, Reply, Request};
    let mut v = vec![
        Message::Hello {
            version: witness::WITNESS_PROTOCOL_VERSION,
            resource: "r0".into(),
            node: "alpha".into(),
            nonce: [7; 32],
        },
        Message::Hello {
            version: witness::WITNESS_PROTOCOL_VERSION,
            resource: "../etc".into(),
            node: "a/b".into(),
            nonce: [0; 32],
        },
        Message::Challenge {
            version: witness::WITNESS_PROTOCOL_VERSION,
            nonce: [1; 32],
            proof: [2; 32],
        },
        Message::Auth { proof: [3; 32] },
        Message::Welcome { epoch: 12 },
        Message::Refused {
            version: witness::WITNESS_PROTOCOL_VERSION,
            reason: "wrong shared secret".into(),
        },
    ];
    for r in [
        Request::Acquire {
            have_epoch: 3,
            lease_ms: 2000,
            outdate_peer: Some("beta".into()),
            force: false,
        },
        Request::Acquire {
            have_epoch: 0,
            lease_ms: witness::MAX_LEASE_MS,
            outdate_peer: None,
            force: true,
        },
        Request::Renew { epoch: 4 },
        Request::Release { epoch: 4 },
        Request::Outdate {
            epoch: 4,
            peer: "beta".into(),
        },
        Request::InSync {
            epoch: 4,
            peer: "beta".into(),
        },
        Request::Query,
    ] {
        v.push(Message::Request(r));
    }
    for r in [
        Reply::Granted { epoch: 5 },
        Reply::Renewed { epoch: 5 },
        Reply::Released,
        Reply::PeerOutdated { epoch: 5 },
        Reply::Ok,
        Reply::State {
            epoch: 5,
            holder: Some("alpha".into()),
            lease_remaining_ms: Some(1500),
            outdated: vec!["beta".into()],
        },
        Reply::State {
            epoch: 0,
            holder: None,
            lease_remaining_ms: None,
            outdated: vec![],
        },
    ] {
        v.push(Message::Reply(r));
    }
    for r in [
        Refusal::Outdated { epoch: 3 },
        Refusal::LeaseHeld {
            holder: "beta".into(),
            epoch: 7,
            remaining_ms: 1400,
        },
        Refusal::Superseded {
            epoch: 8,
            holder: Some("beta".into()),
        },
        Refusal::Superseded {
            epoch: 8,
            holder: None,
        },
        Refusal::Invalid {
            reason: "lease of 0 ms".into(),
        },
        Refusal::Unavailable {
            reason: "disk full".into(),
        },
    ] {
        v.push(Message::Reply(Reply::Refused(r)));
    }
    v
}

fn seeds_witness() -> Vec<(String, Vec<u8>)> {
    let msgs = witness_messages();
    let mut v: Vec<(String, Vec<u8>)> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("msg_{i:02}"), witness::encode(m)))
        .collect();
    // A client's whole conversation, and the witness's.
    let client: Vec<u8> = [0usize, 3, 6, 8, 12]
        .iter()
        .flat_map(|&i| witness::encode(&msgs[i]))
        .collect();
    v.push(("client_session".into(), client));
    let server: Vec<u8> = [2usize, 4, 13, 15, 18]
        .iter()
        .flat_map(|&i| witness::encode(&msgs[i]))
        .collect();
    v.push(("witness_session".into(), server));
    v
}

const SEED_MD_ID: u64 = 0xdead_beef_cafe_f00d;

fn meta_header(mode: u8, flags: u8, param: u16, n: u32) -> Vec<u8> {
    let mut v = vec![mode, flags];
    v.extend(param.to_le_bytes());
    v.extend(n.to_le_bytes());
    v.extend(SEED_MD_ID.to_le_bytes());
    v
}

fn seeds_meta() -> Vec<(String, Vec<u8>)> {
    use crate::meta::superblock::{MetaFlags, BYTES_PER_BIT, DEFAULT_AL_EXTENTS};
    use crate::meta::Generations;
    let mut v = Vec::new();
    // Superblocks as create-md and a running primary write them.
    let sb = Superblock {
        resource: "r0".into(),
        node: "alpha".into(),
        size: (1 << 30) + 1000,
        gens: Generations::just_created(),
        flags: MetaFlags {
            al_clean: true,
            ..Default::default()
        },
        epoch: 0,
        bytes_per_bit: BYTES_PER_BIT,
        al_extents: DEFAULT_AL_EXTENTS,
        md_id: SEED_MD_ID,
        boot_id: [0; 16],
        primary_epoch: 0,
    };
    let running = Superblock {
        gens: Generations {
            current: 0x6A0F_0000_1234_5679,
            bitmap: 0x1111_2222_3333_4444,
            history: [0x5555_6666_7777_8888, 4],
        },
        flags: MetaFlags {
            consistent: true,
            was_up_to_date: true,
            was_primary: true,
            ..Default::default()
        },
        epoch: 9,
        primary_epoch: 8,
        al_extents: 6161,
        size: 4 << 40,
        node: "β-node".into(),
        ..sb.clone()
    };
    for (name, s) in [
        ("superblock_created", &sb),
        ("superblock_running", &running),
    ] {
        let mut d = meta_header(0, 0, 0, 0);
        d.extend(s.encode());
        v.push((name.to_string(), d));
    }
    // An activity log as the file layer writes it: a fresh ring, then activations.
    for (al, n_extents) in [(67u32, 100u32), (1237, 5000)] {
        let ring_len = actlog::ring_blocks(al) as usize;
        let mut ring = vec![vec![0u8; BLOCK_SIZE]; ring_len];
        let mut log = actlog::ActLog::new(al, 0);
        let mut write = |log: &mut actlog::ActLog, tx: &Transaction, now: u64| {
            ring[log.position(tx.tr) as usize] = tx.encode(SEED_MD_ID, al);
            log.commit(tx, now);
        };
        for _ in 0..ring_len {
            let tx = log.build_reset();
            write(&mut log, &tx, 0);
        }
        let mut last = Vec::new();
        for step in 0..12u32 {
            let now = log.begin();
            let cold: Vec<u32> = (0..3)
                .map(|i| (step * 37 + i * 11) % n_extents)
                .filter(|&e| !log.touch(e, now))
                .collect();
            if cold.is_empty() {
                continue;
            }
            let plan = log.plan(&cold, now).expect("slots");
            let tx = log.build(&plan);
            last = tx.encode(SEED_MD_ID, al);
            write(&mut log, &tx, now);
        }
        let mut d = meta_header(1, 0, al as u16, n_extents);
        d.extend(&last);
        v.push((format!("al_tx_{al}"), d));
        let mut d = meta_header(2, 0, al as u16, n_extents);
        for b in &ring {
            d.extend(b);
        }
        v.push((format!("al_ring_{al}"), d));
        // The same ring after a crash tore the newest transaction.
        let newest = log.position(log.next_tr() - 1) as usize;
        let mut d = meta_header(2, 2, al as u16, n_extents);
        for (i, b) in ring.iter().enumerate() {
            let mut b = b.clone();
            if i == newest {
                b[2000] ^= 1;
            }
            d.extend(b);
        }
        v.push((format!("al_ring_torn_{al}"), d));
    }
    // Bitmap blocks with bits set, including the partial last word.
    let nbits = BITS_PER_BLOCK + 100;
    let mut bm = Bitmap::new(nbits);
    bm.set_range(3, 90, true);
    bm.set_range(BITS_PER_BLOCK + 60, BITS_PER_BLOCK + 100, true);
    for blk in 0..2u16 {
        let mut b = vec![0u8; BLOCK_SIZE];
        bm.encode_block(u64::from(blk), SEED_MD_ID, &mut b);
        // n = nbits - 1 so that 1 + n % (3 * BITS_PER_BLOCK) is nbits.
        let mut d = meta_header(3, 0, blk, (nbits - 1) as u32);
        d.extend(b);
        v.push((format!("bitmap_block_{blk}"), d));
    }
    v
}

/// The example configurations of README.md, DESIGN.md (as in config.rs's tests) and the
/// test harnesses, plus variants for every table and a few broken ones.
fn seeds_config() -> Vec<(String, Vec<u8>)> {
    let node = |name: &str, ip: &str, nbd: &str| {
        format!(
            "[[node]]\nname = \"{name}\"\ndisk = \"/dev/sdb\"\nmeta = \"/var/lib/tandem/r0.meta\"\n\
             replication = \"{ip}:7789\"\nnbd = \"{nbd}\"\ncontrol = \"/run/tandem/r0.sock\"\n\n"
        )
    };
    let nodes = format!(
        "{}{}",
        node("alpha", "10.0.0.1", "10.0.0.1:10809"),
        node("beta", "10.0.0.2", "10.0.0.2:10809")
    );
    let readme = format!(
        "[resource]\nname = \"r0\"\n\n{nodes}[net]\nsecret_file = \"/etc/tandem/r0.secret\"\n\n\
         [failover]\nfencing = \"witness\"\nwitness = \"10.0.0.3:7790\"\nlease = \"2s\"\n"
    );
    let design = r#"[resource]
name = "r0"
protocol = "C"

[[node]]
name = "alpha"
disk = "/var/lib/tandem/alpha.img"      # file or block device
meta = "/var/lib/tandem/alpha.meta"     # external metadata file
replication = "10.0.0.1:7789"
nbd = "10.0.0.1:10809"
control = "/var/lib/tandem/r0-alpha.sock"

[[node]]
name = "beta"
disk = "/var/lib/tandem/beta.img"
meta = "/var/lib/tandem/beta.meta"
replication = "10.0.0.2:7789"
nbd = "10.0.0.2:10809"
control = "/var/lib/tandem/r0-beta.sock"

[net]
ping_interval = "200ms"
ping_timeout = "1s"
secret_file = "/var/lib/tandem/r0.secret"   # peers authenticate each other (HMAC challenge)

[failover]
auto = true
fencing = "witness"                     # witness | handler | none
witness = "10.0.0.3:7790"
lease = "2s"
fence_handler = "/usr/local/sbin/fence-peer"   # for fencing = "handler"

[split_brain]
after_sb_0pri = "disconnect"
after_sb_1pri = "disconnect"
after_sb_2pri = "disconnect"

[resync]
rate = "0"          # bytes per second, 0 = unlimited
checksum = false    # compare block digests first; send only blocks that differ
"#
    .to_string();
    // The test harness's pair on loopback, unix NBD sockets, every optional table.
    let local = |name: &str, port: u16| {
        format!(
            "[[node]]\nname = \"{name}\"\ndisk = \"/tmp/t/{name}.img\"\nmeta = \"/tmp/t/{name}.meta\"\n\
             replication = \"127.0.0.1:{port}\"\nnbd = \"unix:/tmp/t/{name}.nbd\"\n\
             control = \"/tmp/t/{name}.sock\"\n\n"
        )
    };
    let pair = format!(
        "[resource]\nname = \"r0\"\n\n{}{}[net]\nsecret_file = \"/tmp/t/secret\"\n\
         ping_interval = \"100ms\"\nping_timeout = \"500ms\"\nconnect_interval = \"100ms\"\n\
         peer_flush_interval = \"250ms\"\n\n[failover]\nauto = false\nfencing = \"handler\"\n\
         fence_handler = \"/usr/local/sbin/fence-peer\"\nattach_timeout = \"1m 30s\"\n\n\
         [split_brain]\nafter_sb_0pri = \"discard-node-beta\"\nafter_sb_1pri = \"consensus\"\n\n\
         [resync]\nrate = 104857600\nchecksum = true\n\n[activity_log]\nextents = 6161\n",
        local("alpha", 7001),
        local("beta", 7002)
    );
    let none = format!(
        "[resource]\nname = \"r0\"\n\n{nodes}[failover]\nfencing = \"none\"\n\n\
         [resync]\nrate = \"100M\"\n\n[split_brain]\nafter_sb_0pri = \"discard-younger-primary\"\n\
         after_sb_1pri = \"discard-secondary\"\n"
    );
    let clash = format!(
        "[resource]\nname = \"r0\"\n\n{}{}[failover]\nfencing = \"none\"\n",
        node("alpha", "10.0.0.1", "10.0.0.1:10809"),
        node("beta", "10.0.0.1", "10.0.0.1:10809")
    );
    let bad_types = format!(
        "[resource]\nname = \"r0\"\nprotocol = \"A\"\n\n{nodes}[net]\nping_interval = 5\n\
         [activity_log]\nextents = 66\nwhen = 1979-05-27T07:32:00Z\n"
    );
    vec![
        ("readme".into(), readme.into_bytes()),
        ("design".into(), design.into_bytes()),
        ("pair_handler".into(), pair.into_bytes()),
        ("fencing_none".into(), none.into_bytes()),
        ("clash".into(), clash.into_bytes()),
        ("bad_types".into(), bad_types.into_bytes()),
        (
            "not_utf8".into(),
            b"[resource]\nname = \"r\xff0\"\n".to_vec(),
        ),
    ]
}
