use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BufMut;
use proptest::prelude::*;

use crate::consts::*;
use crate::handshake::{MAX_BUFFERED_OPTION, MAX_OPTIONS, MAX_OPTION_LEN};
use crate::transmission::*;
use crate::*;

/// Records the largest single allocation made by the current thread, so property tests can
/// prove the decoders never allocate beyond their declared caps whatever the input says.
struct TrackingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: delegates to the system allocator; only observes sizes.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

struct OneExport;

const SIZE: u64 = 1 << 30;

impl ExportCatalog for OneExport {
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "test disk".into())]
    }
    fn lookup(&self, name: &str) -> Result<ExportInfo, Refusal> {
        if name == "disk" || name == "other" {
            Ok(ExportInfo {
                name: name.into(),
                description: "test disk".into(),
                size: SIZE,
                transmission_flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                block_size: (1, 4096, MAX_PAYLOAD),
            })
        } else {
            Err(Refusal {
                code: REP_ERR_UNKNOWN,
                message: format!("no export {name:?}"),
            })
        }
    }
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(opt);
    v.put_u32(data.len() as u32);
    v.put_slice(data);
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

/// Parse option replies: (option, type, data).
fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(
            u64::from_be_bytes(b[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        out.push((opt, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    out
}

/// A handshake past the greeting and client flags.
fn started(client_flags: u32) -> ServerHandshake<OneExport> {
    let mut hs = ServerHandshake::new(OneExport);
    let greeting = hs.take_output();
    assert_eq!(greeting.len(), 18);
    assert_eq!(&greeting[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        &greeting[16..18],
        &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
    );
    assert_eq!(hs.receive(&client_flags.to_be_bytes()).unwrap(), (4, None));
    hs
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let mut hs = ServerHandshake::new(OneExport);
    assert_eq!(
        hs.receive(&4u32.to_be_bytes()),
        Err(HandshakeError::UnknownClientFlags(4))
    );
}

#[test]
fn unknown_option_is_skipped_and_negotiation_continues() {
    let mut hs = started(3);
    let (used, done) = hs.receive(&option(0x765_4321, &[0xaa; 1000])).unwrap();
    assert_eq!((used, done), (1016, None));
    let r = replies(&hs.take_output());
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].0, r[0].1), (0x765_4321, REP_ERR_UNSUP));
    for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS] {
        hs.receive(&option(opt, &[])).unwrap();
        assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_UNSUP);
    }
    let (_, done) = hs
        .receive(&option(OPT_GO, &info_payload("disk", &[])))
        .unwrap();
    assert!(matches!(done, Some(Outcome::Transmission(_))));
}

#[test]
fn export_name_pads_unless_no_zeroes() {
    for (flags, expect_len) in [(1u32, 8 + 2 + 124), (3, 10)] {
        let mut hs = started(flags);
        let (_, done) = hs.receive(&option(OPT_EXPORT_NAME, b"disk")).unwrap();
        let Some(Outcome::Transmission(n)) = done else {
            panic!("no transmission")
        };
        assert!(!n.structured_replies);
        let out = hs.take_output();
        assert_eq!(out.len(), expect_len);
        assert_eq!(&out[0..8], &SIZE.to_be_bytes());
        assert!(out[10..].iter().all(|&b| b == 0));
    }
}

#[test]
fn export_name_unknown_disconnects() {
    let mut hs = started(3);
    assert!(matches!(
        hs.receive(&option(OPT_EXPORT_NAME, b"nope")),
        Err(HandshakeError::ExportNameRefused(_))
    ));
}

#[test]
fn plain_newstyle_client_may_only_send_export_name() {
    let mut hs = started(0);
    hs.receive(&option(OPT_LIST, &[])).unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    let (_, done) = hs.receive(&option(OPT_EXPORT_NAME, b"disk")).unwrap();
    assert!(done.is_some());
}

#[test]
fn go_sends_export_info_ignores_unknown_infos_and_acks() {
    let mut hs = started(3);
    let (_, done) = hs
        .receive(&option(
            OPT_GO,
            &info_payload("disk", &[INFO_BLOCK_SIZE, 0x7777, INFO_NAME]),
        ))
        .unwrap();
    assert!(matches!(done, Some(Outcome::Transmission(_))));
    let r = replies(&hs.take_output());
    let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(kinds, vec![REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    let export = &r[0].2;
    assert_eq!(export.len(), 12);
    assert_eq!(&export[0..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&export[2..10], &SIZE.to_be_bytes());
    let bs = &r[1].2;
    assert_eq!(bs.len(), 14);
    assert_eq!(&bs[2..6], &1u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs[10..14], &MAX_PAYLOAD.to_be_bytes());
    assert_eq!(&r[2].2[2..], b"disk");
}

#[test]
fn info_then_go_report_the_same_and_info_does_not_finish() {
    let mut hs = started(3);
    let (_, done) = hs
        .receive(&option(OPT_INFO, &info_payload("disk", &[])))
        .unwrap();
    assert!(done.is_none());
    let info = replies(&hs.take_output());
    hs.receive(&option(OPT_GO, &info_payload("disk", &[])))
        .unwrap();
    let go = replies(&hs.take_output());
    let strip =
        |v: Vec<(u32, u32, Vec<u8>)>| v.into_iter().map(|(_, k, d)| (k, d)).collect::<Vec<_>>();
    assert_eq!(strip(info), strip(go));
}

#[test]
fn malformed_go_and_unknown_export_get_errors() {
    let mut hs = started(3);
    let mut bad = info_payload("disk", &[]);
    bad[3] = 200; // namelen > optlen - 6
    hs.receive(&option(OPT_GO, &bad)).unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    let mut extra = info_payload("disk", &[1]);
    extra.push(0); // trailing byte
    hs.receive(&option(OPT_INFO, &extra)).unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    hs.receive(&option(OPT_GO, &info_payload("nope", &[])))
        .unwrap();
    let r = replies(&hs.take_output());
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert_eq!(r[0].2, b"no export \"nope\"");
}

#[test]
fn list_and_abort() {
    let mut hs = started(3);
    hs.receive(&option(OPT_LIST, &[])).unwrap();
    let r = replies(&hs.take_output());
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2[0..4], &4u32.to_be_bytes());
    assert_eq!(&r[0].2[4..8], b"disk");
    assert_eq!(&r[0].2[8..], b"test disk");
    assert_eq!(r[1].1, REP_ACK);
    hs.receive(&option(OPT_LIST, b"x")).unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    let (_, done) = hs.receive(&option(OPT_ABORT, b"ignored")).unwrap();
    assert_eq!(done, Some(Outcome::Aborted));
    assert_eq!(replies(&hs.take_output())[0].1, REP_ACK);
    assert_eq!(hs.receive(b"x"), Err(HandshakeError::AlreadyFinished));
}

#[test]
fn meta_context_rules() {
    let mut hs = started(3);
    // SET before structured replies is invalid.
    hs.receive(&option(
        OPT_SET_META_CONTEXT,
        &meta_payload("disk", &[META_BASE_ALLOCATION]),
    ))
    .unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    hs.receive(&option(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ACK);
    hs.receive(&option(OPT_STRUCTURED_REPLY, &[])).unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    // LIST with no queries lists everything, with id 0.
    hs.receive(&option(OPT_LIST_META_CONTEXT, &meta_payload("disk", &[])))
        .unwrap();
    let r = replies(&hs.take_output());
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[0..4], &0u32.to_be_bytes());
    assert_eq!(&r[0].2[4..], META_BASE_ALLOCATION.as_bytes());
    assert_eq!(r[1].1, REP_ACK);
    // Unknown namespaces are ignored.
    hs.receive(&option(
        OPT_SET_META_CONTEXT,
        &meta_payload("disk", &["qemu:dirty-bitmap:x"]),
    ))
    .unwrap();
    assert_eq!(replies(&hs.take_output()).len(), 1);
    hs.receive(&option(
        OPT_SET_META_CONTEXT,
        &meta_payload("disk", &["x-foo:bar", META_BASE_ALLOCATION]),
    ))
    .unwrap();
    let r = replies(&hs.take_output());
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[0..4], &1u32.to_be_bytes());
    let (_, done) = hs
        .receive(&option(OPT_GO, &info_payload("disk", &[])))
        .unwrap();
    let Some(Outcome::Transmission(n)) = done else {
        panic!()
    };
    assert!(n.structured_replies);
    assert_eq!(n.base_allocation, Some(1));
}

#[test]
fn meta_context_for_another_export_is_dropped_at_go() {
    let mut hs = started(3);
    hs.receive(&option(OPT_STRUCTURED_REPLY, &[])).unwrap();
    hs.receive(&option(
        OPT_SET_META_CONTEXT,
        &meta_payload("other", &[META_BASE_ALLOCATION]),
    ))
    .unwrap();
    let (_, done) = hs
        .receive(&option(OPT_GO, &info_payload("disk", &[])))
        .unwrap();
    let Some(Outcome::Transmission(n)) = done else {
        panic!()
    };
    assert_eq!(n.base_allocation, None);
}

#[test]
fn caps_on_option_count_and_length() {
    let mut hs = started(3);
    for _ in 0..MAX_OPTIONS {
        hs.receive(&option(99, &[])).unwrap();
    }
    assert_eq!(
        hs.receive(&option(99, &[])),
        Err(HandshakeError::TooManyOptions)
    );

    let mut hs = started(3);
    let mut hdr = Vec::new();
    hdr.put_u64(IHAVEOPT);
    hdr.put_u32(99);
    hdr.put_u32(MAX_OPTION_LEN + 1);
    assert!(matches!(
        hs.receive(&hdr),
        Err(HandshakeError::OptionTooLong { .. })
    ));

    // A known option beyond the buffering cap is skipped, not buffered.
    let mut hs = started(3);
    let mut hdr = Vec::new();
    hdr.put_u64(IHAVEOPT);
    hdr.put_u32(OPT_GO);
    hdr.put_u32(MAX_BUFFERED_OPTION + 1);
    hs.receive(&hdr).unwrap();
    assert!(hs.wants() <= 64 * 1024);
    hs.receive(&vec![0u8; MAX_BUFFERED_OPTION as usize + 1])
        .unwrap();
    assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_TOO_BIG);
}

#[test]
fn bad_option_magic_disconnects() {
    let mut hs = started(3);
    let mut v = option(OPT_LIST, &[]);
    v[0] ^= 1;
    assert!(matches!(
        hs.receive(&v),
        Err(HandshakeError::BadOptionMagic(_))
    ));
}

#[test]
fn receive_never_reads_past_the_handshake() {
    let mut hs = started(3);
    let mut input = option(OPT_GO, &info_payload("disk", &[]));
    let go_len = input.len();
    input.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]); // start of a request
    let (used, done) = hs.receive(&input).unwrap();
    assert_eq!(used, go_len);
    assert!(done.is_some());
    assert_eq!(hs.wants(), 0);
}

fn request(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: 7,
        offset,
        length,
    }
}

const LIM: ExportLimits = ExportLimits {
    size: 1 << 20,
    read_only: false,
    structured_replies: true,
    block_status: true,
};

#[test]
fn validation_follows_the_spec_table() {
    let ro = ExportLimits {
        read_only: true,
        ..LIM
    };
    let cases: &[(RequestHeader, ExportLimits, Result<(), u32>)] = &[
        (request(CMD_READ, 0, 0, 4096), LIM, Ok(())),
        (request(CMD_READ, CMD_FLAG_FUA, 0, 4096), LIM, Ok(())),
        (request(CMD_READ, 0, (1 << 20) - 1, 2), LIM, Err(EINVAL)),
        (request(CMD_READ, 0, u64::MAX, 2), LIM, Err(EINVAL)),
        (request(CMD_READ, CMD_FLAG_DF, 0, 1), LIM, Err(EINVAL)),
        (request(CMD_READ, 1 << 15, 0, 1), LIM, Err(EINVAL)),
        (request(CMD_READ, 0, 0, 0), LIM, Ok(())),
        (request(CMD_WRITE, 0, (1 << 20) - 1, 2), LIM, Err(ENOSPC)),
        (request(CMD_WRITE, 0, 0, 1), ro, Err(EPERM)),
        (request(CMD_WRITE, 0, 0, 0), LIM, Ok(())),
        (request(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), LIM, Err(EINVAL)),
        (request(CMD_WRITE_ZEROES, 0, 1 << 20, 1), LIM, Err(ENOSPC)),
        (
            request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 1),
            LIM,
            Ok(()),
        ),
        (
            request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1),
            LIM,
            Err(EINVAL),
        ),
        (request(CMD_WRITE_ZEROES, 0, 0, 1), ro, Err(EPERM)),
        (request(CMD_TRIM, 0, 1 << 20, 1), LIM, Err(EINVAL)),
        (request(CMD_TRIM, 0, 0, 1 << 20), ro, Err(EPERM)),
        (request(CMD_TRIM, CMD_FLAG_FUA, 0, 1 << 20), LIM, Ok(())),
        (request(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), LIM, Ok(())),
        (request(CMD_FLUSH, 0, 0, 1), LIM, Err(EINVAL)),
        (request(CMD_CACHE, 0, 0, 1 << 20), LIM, Ok(())),
        (request(CMD_CACHE, CMD_FLAG_NO_HOLE, 0, 1), LIM, Err(EINVAL)),
        (
            request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512),
            LIM,
            Ok(()),
        ),
        (request(CMD_BLOCK_STATUS, 0, 0, 0), LIM, Err(EINVAL)),
        (
            request(CMD_BLOCK_STATUS, 0, 0, 1),
            ExportLimits {
                block_status: false,
                ..LIM
            },
            Err(EINVAL),
        ),
        (request(CMD_READ, 0, 0, 1), ro, Ok(())),
        (request(0x99, 0, 0, 0), LIM, Err(EINVAL)),
        (request(8, 0, 0, 0), LIM, Err(EINVAL)),
    ];
    for (req, lim, want) in cases {
        assert_eq!(
            validate(req, lim).map(|_| ()),
            *want,
            "{req:?} ro={}",
            lim.read_only
        );
    }
}

#[test]
fn request_round_trip_and_bad_magic() {
    let r = request(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    let mut b = Vec::new();
    r.encode(&mut b);
    let arr: [u8; REQUEST_LEN] = b.clone().try_into().unwrap();
    assert_eq!(RequestHeader::decode(&arr), Ok(r));
    assert_eq!(r.payload_len(), 512);
    let mut bad = arr;
    bad[0] = 0;
    assert!(RequestHeader::decode(&bad).is_err());
}

#[test]
fn reply_encoders() {
    let mut b = Vec::new();
    put_simple_reply(&mut b, 9, EINVAL);
    assert_eq!(b.len(), 16);
    b.clear();
    put_offset_data_header(&mut b, 9, 4096, 512);
    assert_eq!(b.len(), 28);
    assert_eq!(&b[16..20], &(520u32).to_be_bytes());
    b.clear();
    put_error_chunk(&mut b, 9, EIO, &"é".repeat(2000));
    let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
    assert_eq!(b.len(), 20 + len);
    assert!(std::str::from_utf8(&b[26..]).is_ok());
    b.clear();
    put_block_status_chunk(&mut b, 9, 1, &[(4096, 3), (512, 0)]);
    assert_eq!(b.len(), 20 + 4 + 16);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary client bytes in arbitrary chunks: the machine answers or errors, never panics,
    /// never buffers more than its caps, and its output stays proportional to the options.
    #[test]
    fn handshake_survives_any_input(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..64,
        flags in 0u32..4,
    ) {
        let mut input = flags.to_be_bytes().to_vec();
        input.extend_from_slice(&data);
        LARGEST.with(|m| m.set(0));
        let mut hs = ServerHandshake::new(OneExport);
        hs.take_output();
        let mut fed = 0;
        for piece in input.chunks(chunk) {
            match hs.receive(piece) {
                Ok((used, done)) => {
                    fed += used;
                    prop_assert!(used <= piece.len());
                    if done.is_some() { break; }
                }
                Err(_) => break,
            }
            prop_assert!(hs.output_len() <= 64 * 1024);
            hs.take_output();
        }
        prop_assert!(fed <= input.len());
        let largest = LARGEST.with(|m| m.get());
        prop_assert!(largest <= MAX_BUFFERED_OPTION as usize, "allocated {} bytes", largest);
    }

    /// Option headers may declare any length; only known options up to the buffering cap
    /// are ever allocated for, and longer ones are skipped or refused.
    #[test]
    fn declared_option_lengths_never_drive_allocation(
        opt in 0u32..16,
        len in prop_oneof![0u32..=2 * MAX_OPTION_LEN, any::<u32>()],
    ) {
        let mut hs = started(3);
        let mut hdr = Vec::new();
        hdr.put_u64(IHAVEOPT);
        hdr.put_u32(opt);
        hdr.put_u32(len);
        LARGEST.with(|m| m.set(0));
        let r = hs.receive(&hdr);
        let largest = LARGEST.with(|m| m.get());
        prop_assert!(largest <= MAX_BUFFERED_OPTION as usize, "allocated {} bytes", largest);
        if len > MAX_OPTION_LEN {
            prop_assert!(r.is_err());
        }
        prop_assert!(hs.wants() <= (MAX_BUFFERED_OPTION as usize).max(64 * 1024));
    }

    /// Well-formed option streams with random options and payloads always parse in step.
    #[test]
    fn handshake_consumes_exact_option_lengths(
        opts in proptest::collection::vec((12u32..200, proptest::collection::vec(any::<u8>(), 0..300)), 0..20)
    ) {
        let mut hs = started(3);
        let mut input = Vec::new();
        for (o, d) in &opts { input.extend(option(*o, d)); }
        input.extend(option(OPT_GO, &info_payload("disk", &[])));
        let (used, done) = hs.receive(&input).unwrap();
        prop_assert_eq!(used, input.len());
        prop_assert!(matches!(done, Some(Outcome::Transmission(_))));
        let r = replies(&hs.take_output());
        prop_assert_eq!(r.iter().filter(|x| x.1 == REP_ERR_UNSUP).count(), opts.len());
    }

    #[test]
    fn request_decoder_and_validation_never_panic(
        bytes in proptest::array::uniform28(any::<u8>()),
        size in 0u64..(1 << 40),
        ro in any::<bool>(), sr in any::<bool>(), bs in any::<bool>(),
    ) {
        let lim = ExportLimits { size, read_only: ro, structured_replies: sr, block_status: bs };
        if let Ok(h) = RequestHeader::decode(&bytes) {
            if let Ok(cmd) = validate(&h, &lim) {
                let range = match cmd {
                    Command::Read { offset, length } | Command::Write { offset, length, .. }
                    | Command::Trim { offset, length, .. } | Command::Cache { offset, length }
                    | Command::WriteZeroes { offset, length, .. }
                    | Command::BlockStatus { offset, length, .. } => Some((offset, length)),
                    Command::Disconnect | Command::Flush => None,
                };
                if let Some((o, l)) = range {
                    prop_assert!(o + u64::from(l) <= size);
                    let data_cmd = matches!(cmd, Command::Read { .. } | Command::Write { .. });
                    prop_assert!(l <= MAX_PAYLOAD || !data_cmd);
                }
                if ro {
                    let writes = matches!(cmd, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                    prop_assert!(!writes);
                }
            }
        }
    }
}
