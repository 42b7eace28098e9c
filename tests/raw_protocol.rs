//! Raw-socket protocol tests for what libnbd cannot send: malformed options, bad client flags,
//! oversized writes, EOF inside a payload, DISC with requests outstanding, unknown commands.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use nbd_wire::consts::*;

const IHAVEOPT_BYTES: [u8; 8] = IHAVEOPT.to_be_bytes();

struct Client {
    s: RawStream,
}

enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Client {
    /// Connect and read the greeting; send `flags` as client flags.
    fn start(server: &Server, flags: u32) -> Client {
        let mut s = server.connect_raw();
        s.set_read_timeout(Duration::from_secs(10));
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT_BYTES);
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Client { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT_BYTES.to_vec();
        v.extend(opt.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        self.s.write_all(&v).unwrap();
    }

    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).unwrap();
        (opt, kind, d)
    }

    /// GO for `name` with the given info requests; returns (size, flags) and checks ACK.
    fn go(&mut self, name: &str, infos: &[u16]) -> (u64, u16) {
        self.option(OPT_GO, &info_payload(name, infos));
        let mut export = None;
        loop {
            let (opt, kind, data) = self.opt_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    assert_eq!(data.len(), 12);
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
                REP_INFO => {}
                REP_ACK => return export.expect("INFO_EXPORT before ACK"),
                other => panic!(
                    "unexpected GO reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut v = Vec::with_capacity(28 + payload.len());
        v.extend(REQUEST_MAGIC.to_be_bytes());
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend(offset.to_be_bytes());
        v.extend(length.to_be_bytes());
        v.extend(payload);
        self.s.write_all(&v).unwrap();
    }

    fn reply(&mut self) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut r = [0u8; 12];
                self.s.read_exact(&mut r).unwrap();
                Reply::Simple {
                    error: u32::from_be_bytes(r[0..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(r[4..12].try_into().unwrap()),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut r = [0u8; 16];
                self.s.read_exact(&mut r).unwrap();
                let len = u32::from_be_bytes(r[12..16].try_into().unwrap()) as usize;
                let mut payload = vec![0u8; len];
                self.s.read_exact(&mut payload).unwrap();
                Reply::Chunk {
                    flags: u16::from_be_bytes(r[0..2].try_into().unwrap()),
                    kind: u16::from_be_bytes(r[2..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(r[4..12].try_into().unwrap()),
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// A simple reply's error for `cookie`.
    fn simple(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie);
                error
            }
            Reply::Chunk { .. } => panic!("expected a simple reply"),
        }
    }

    /// Read `len` bytes with simple replies.
    fn read_simple(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len, &[]);
        assert_eq!(self.simple(cookie), 0);
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        d
    }

    /// The server closed the connection (EOF, or reset).
    fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }
}

fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend(name.as_bytes());
    v.extend((infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend(i.to_be_bytes());
    }
    v
}

/// A client in transmission with simple replies.
fn transmission(server: &Server) -> Client {
    let mut c = Client::start(server, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("", &[]);
    c
}

fn server() -> Server {
    Server::start(ServerOpts::default())
}

/// The server still serves new clients (one bad connection did not take it down).
fn assert_serving(server: &Server) {
    let mut c = transmission(server);
    c.request(0, CMD_WRITE, 1, 0, 512, &[0x5a; 512]);
    assert_eq!(c.simple(1), 0);
    assert_eq!(c.read_simple(2, 0, 512), vec![0x5a; 512]);
}

#[test]
fn bad_client_flags_drop_the_connection() {
    let s = server();
    let mut c = Client::start(&s, 0x4);
    c.expect_closed();
    assert_serving(&s);
}

#[test]
fn garbage_in_the_handshake_closes_only_that_connection() {
    let s = server();
    let mut raw = s.connect_raw();
    raw.set_read_timeout(Duration::from_secs(10));
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    raw.write_all(&[1, 0, 0, 0]).unwrap(); // reserved client flags
    let mut c = Client { s: raw };
    c.expect_closed();
    // Valid flags, then garbage where an option header should be.
    let mut c = Client::start(&s, 3);
    c.s.write_all(&pattern(64, 7)).unwrap();
    c.expect_closed();
    assert_serving(&s);
}

#[test]
fn malformed_option_lengths_get_err_invalid_and_negotiation_continues() {
    let s = server();
    let mut c = Client::start(&s, 3);
    // namelen larger than the option allows.
    let mut p = info_payload("", &[]);
    p[3] = 100;
    c.option(OPT_GO, &p);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // Info count says 3 but only one follows.
    let mut p = info_payload("", &[INFO_NAME]);
    p[5] = 3;
    c.option(OPT_INFO, &p);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // Payload shorter than 6 bytes.
    c.option(OPT_GO, &[0, 0]);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // Unknown option with a payload is skipped by its length.
    c.option(0x7654321, &[0xff; 5000]);
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    // GO with an unknown info type: INFO_EXPORT is sent anyway, then ACK.
    let (size, flags) = c.go("", &[INFO_BLOCK_SIZE, 0x7777]);
    assert_eq!(size, 64 * MIB);
    let want = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_CACHE
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    c.request(0, CMD_READ, 9, 0, 16, &[]);
    assert_eq!(c.simple(9), 0);
}

#[test]
fn option_shorter_than_declared_then_eof_closes_only_that_connection() {
    let s = server();
    let mut c = Client::start(&s, 3);
    let mut v = IHAVEOPT_BYTES.to_vec();
    v.extend(OPT_GO.to_be_bytes());
    v.extend(100u32.to_be_bytes());
    v.extend([0u8; 10]);
    c.s.write_all(&v).unwrap();
    c.s.shutdown_write();
    c.expect_closed();
    assert_serving(&s);
}

#[test]
fn option_caps_drop_abusive_clients() {
    let s = server();
    let mut c = Client::start(&s, 3);
    for _ in 0..32 {
        c.option(0x1234, &[]);
        assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    }
    c.option(0x1234, &[]);
    c.expect_closed();
    // A declared option length beyond the cap is dropped without reading it.
    let mut c = Client::start(&s, 3);
    let mut v = IHAVEOPT_BYTES.to_vec();
    v.extend(0x1234u32.to_be_bytes());
    v.extend(u32::MAX.to_be_bytes());
    c.s.write_all(&v).unwrap();
    c.expect_closed();
    assert_serving(&s);
}

#[test]
fn export_name_padding_and_unknown_export() {
    let s = Server::start(ServerOpts {
        export: "disk",
        ..Default::default()
    });
    // Without NO_ZEROES: size, flags, then 124 zero bytes.
    let mut c = Client::start(&s, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"disk");
    let mut r = [0u8; 8 + 2 + 124];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 64 * MIB);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(c.read_simple(1, 0, 8), vec![0; 8]);
    // With NO_ZEROES the first request's reply follows the 10 bytes directly.
    let mut c = Client::start(&s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, b"disk");
    let mut r = [0u8; 10];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(c.read_simple(1, 0, 8), vec![0; 8]);
    // An unknown export can only be refused by disconnecting.
    let mut c = Client::start(&s, 3);
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    // GO names the problem.
    let mut c = Client::start(&s, 3);
    c.option(OPT_GO, &info_payload("nope", &[]));
    let (_, kind, msg) = c.opt_reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("disk"));
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_connection_survives() {
    let s = server();
    let mut c = transmission(&s);
    c.request(0, 0x99, 1, 0, 0, &[]);
    assert_eq!(c.simple(1), EINVAL);
    c.request(0, 8, 2, 0, 0, &[]); // RESIZE is not supported
    assert_eq!(c.simple(2), EINVAL);
    c.request(1 << 14, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(c.simple(3), EINVAL);
    // FUA is accepted on every command.
    c.request(CMD_FLAG_FUA, CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.simple(4), 0);
    c.request(CMD_FLAG_FUA, CMD_READ, 5, 0, 4, &[]);
    assert_eq!(c.simple(5), 0);
    let mut d = [0u8; 4];
    c.s.read_exact(&mut d).unwrap();
    // Block status without a negotiated context is invalid.
    c.request(0, CMD_BLOCK_STATUS, 6, 0, 4096, &[]);
    assert_eq!(c.simple(6), EINVAL);
    // An unknown flag on a WRITE: EINVAL, and the payload is still consumed.
    c.request(1 << 12, CMD_WRITE, 7, 0, 4096, &[0xee; 4096]);
    assert_eq!(c.simple(7), EINVAL);
    assert_eq!(c.read_simple(8, 0, 16), vec![0; 16]);
}

#[test]
fn invalid_writes_are_consumed_and_oversized_ones_disconnect() {
    let s = server();
    let mut c = transmission(&s);
    // Past the end: ENOSPC, payload skipped.
    c.request(0, CMD_WRITE, 1, 64 * MIB - 512, 4096, &[0xab; 4096]);
    assert_eq!(c.simple(1), ENOSPC);
    // 32 MiB is the largest accepted payload.
    let big = pattern(32 << 20, 3);
    c.request(0, CMD_WRITE, 2, 0, big.len() as u32, &big);
    assert_eq!(c.simple(2), 0);
    assert!(c.read_simple(3, 0, 32 << 20) == big);
    // Over 32 MiB: EINVAL after consuming the payload; the connection survives.
    let over = vec![0x11u8; (32 << 20) + 4096];
    c.request(0, CMD_WRITE, 4, 0, over.len() as u32, &over);
    assert_eq!(c.simple(4), EINVAL);
    assert!(c.read_simple(5, 0, 4096) == big[..4096]);
    // A header announcing a payload beyond any limit drops the connection.
    c.request(0, CMD_WRITE, 6, 0, 200 << 20, &[]);
    c.expect_closed();
    assert_serving(&s);
}

#[test]
fn eof_in_the_middle_of_a_write_applies_nothing() {
    let s = server();
    let mut c = transmission(&s);
    c.request(0, CMD_WRITE, 1, MIB, 65536, &[0x77; 32768]);
    c.s.shutdown_write();
    c.expect_closed();
    let mut c = transmission(&s);
    assert_eq!(c.read_simple(2, MIB, 65536), vec![0; 65536]);
}

#[test]
fn disc_with_requests_outstanding_answers_them_all_then_closes() {
    let s = server();
    let mut c = transmission(&s);
    let mut burst = Vec::new();
    for i in 0..8u64 {
        let data = vec![i as u8 + 1; 4096];
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend(0u16.to_be_bytes());
        v.extend(CMD_WRITE.to_be_bytes());
        v.extend((100 + i).to_be_bytes());
        v.extend((i * 4096).to_be_bytes());
        v.extend(4096u32.to_be_bytes());
        v.extend(data);
        burst.extend(v);
    }
    c.s.write_all(&burst).unwrap();
    c.request(0, CMD_FLUSH, 200, 0, 0, &[]);
    c.request(0, CMD_DISC, 300, 0, 0, &[]);
    let mut cookies: Vec<u64> = (0..9)
        .map(|_| match c.reply() {
            Reply::Simple { error: 0, cookie } => cookie,
            Reply::Simple { error, .. } => panic!("error {error}"),
            Reply::Chunk { .. } => panic!("chunk"),
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (100..108).chain([200]).collect::<Vec<_>>());
    c.expect_closed();
    let mut c = transmission(&s);
    for i in 0..8u64 {
        assert_eq!(c.read_simple(i, i * 4096, 4096), vec![i as u8 + 1; 4096]);
    }
}

#[test]
fn structured_replies_for_reads_and_block_status() {
    let s = server();
    let mut c = Client::start(&s, 3);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().1, REP_ACK);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend(1u32.to_be_bytes());
    meta.extend((META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend(META_BASE_ALLOCATION.as_bytes());
    c.option(OPT_SET_META_CONTEXT, &meta);
    let (_, kind, data) = c.opt_reply();
    assert_eq!(kind, REP_META_CONTEXT);
    let ctx = u32::from_be_bytes(data[0..4].try_into().unwrap());
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.go("", &[]);

    c.request(0, CMD_WRITE, 1, 4 * MIB, 65536, &[1; 65536]);
    assert_eq!(c.simple(1), 0);
    // Out-of-range read: an ERROR chunk with DONE, never a simple reply.
    c.request(0, CMD_READ, 2, 64 * MIB - 512, 1024, &[]);
    match c.reply() {
        Reply::Chunk {
            flags,
            kind,
            cookie,
            payload,
        } => {
            assert_eq!(
                (flags, kind, cookie),
                (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2)
            );
            assert_eq!(
                u32::from_be_bytes(payload[0..4].try_into().unwrap()),
                EINVAL
            );
        }
        Reply::Simple { .. } => panic!("simple reply to a structured read"),
    }
    c.request(0, CMD_READ, 3, 4 * MIB, 4096, &[]);
    match c.reply() {
        Reply::Chunk {
            flags,
            kind,
            payload,
            ..
        } => {
            assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
            assert_eq!(
                u64::from_be_bytes(payload[0..8].try_into().unwrap()),
                4 * MIB
            );
            assert_eq!(&payload[8..], &[1; 4096][..]);
        }
        Reply::Simple { .. } => panic!("simple reply to a structured read"),
    }
    // Block status over hole / data / hole.
    c.request(0, CMD_BLOCK_STATUS, 4, 0, (64 * MIB) as u32, &[]);
    match c.reply() {
        Reply::Chunk { kind, payload, .. } => {
            assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
            assert_eq!(u32::from_be_bytes(payload[0..4].try_into().unwrap()), ctx);
            let ext: Vec<(u32, u32)> = payload[4..]
                .chunks(8)
                .map(|e| {
                    (
                        u32::from_be_bytes(e[0..4].try_into().unwrap()),
                        u32::from_be_bytes(e[4..8].try_into().unwrap()),
                    )
                })
                .collect();
            assert_eq!(ext, vec![(4 << 20, 3), (65536, 0), ((60 << 20) - 65536, 3)]);
        }
        Reply::Simple { .. } => panic!("block status needs a chunk"),
    }
    // REQ_ONE: exactly one extent, no longer than asked.
    c.request(
        CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        5,
        4 * MIB - 4096,
        1 << 20,
        &[],
    );
    match c.reply() {
        Reply::Chunk { payload, .. } => {
            assert_eq!(payload.len(), 12);
            assert_eq!(&payload[4..12], &[0, 0, 0x10, 0, 0, 0, 0, 3]);
        }
        Reply::Simple { .. } => panic!("block status needs a chunk"),
    }
}

#[test]
fn huge_trim_allocates_nothing_proportional() {
    let s = Server::start(ServerOpts {
        size: 8 << 30,
        ..Default::default()
    });
    let pid = s.child.id();
    let mut c = transmission(&s);
    let data = pattern(1 << 20, 5);
    c.request(0, CMD_WRITE, 1, 2 << 30, data.len() as u32, &data);
    assert_eq!(c.simple(1), 0);
    c.request(0, CMD_TRIM, 2, 0, u32::MAX - 511, &[]);
    assert_eq!(c.simple(2), 0);
    c.request(0, CMD_WRITE_ZEROES, 3, 4 << 30, u32::MAX - 511, &[]);
    assert_eq!(c.simple(3), 0);
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 0, 1 << 30, &[]);
    assert_eq!(c.simple(4), 0);
    assert_eq!(c.read_simple(5, 2 << 30, 4096), vec![0; 4096]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 128 * 1024,
        "peak RSS {hwm_kib} KiB after a 4 GiB trim"
    );
    // The punched range is really deallocated on the host.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&s.disk).unwrap());
    assert!(
        blocks * 512 < (1u64 << 30) + (2 << 20),
        "disk holds {} bytes",
        blocks * 512
    );
}

#[test]
fn pipelined_requests_complete_out_of_order_with_matching_cookies() {
    let s = Server::start(ServerOpts {
        extra: &["--fault", "write:0-4096:delay=300ms"],
        ..Default::default()
    });
    let mut c = transmission(&s);
    // The delayed write is sent first; later requests must not wait behind it.
    c.request(0, CMD_WRITE, 1, 0, 4096, &[9; 4096]);
    for i in 0..64u64 {
        c.request(
            0,
            CMD_WRITE,
            10 + i,
            (i + 1) * 4096,
            4096,
            &pattern(4096, i),
        );
    }
    let mut order = Vec::new();
    for _ in 0..65 {
        match c.reply() {
            Reply::Simple { error: 0, cookie } => order.push(cookie),
            _ => panic!("bad reply"),
        }
    }
    assert_ne!(order[0], 1, "the delayed write held up the pipeline");
    assert_eq!(*order.last().unwrap(), 1);
    for i in 0..64u64 {
        assert_eq!(
            c.read_simple(100 + i, (i + 1) * 4096, 4096),
            pattern(4096, i)
        );
    }
}

#[test]
fn bad_request_magic_disconnects_only_that_client() {
    let s = server();
    let mut c = transmission(&s);
    c.s.write_all(&[0u8; 28]).unwrap();
    c.expect_closed();
    assert_serving(&s);
}

#[test]
fn abort_is_acknowledged() {
    let s = server();
    let mut c = Client::start(&s, 3);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.expect_closed();
}
