//! Netlink and generic-netlink message encoding and parsing, without sockets.
//!
//! Layouts (all native-endian): `nlmsghdr` {len u32, type u16, flags u16, seq u32, pid u32},
//! then `genlmsghdr` {cmd u8, version u8, reserved u16}, then attributes {len u16, type u16,
//! payload padded to 4 bytes}; `len` counts the 4-byte header and the unpadded payload.

use std::io;

pub const NLMSG_HDRLEN: usize = 16;
pub const GENL_HDRLEN: usize = 4;
pub const NLA_HDRLEN: usize = 4;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
/// On an error message: the echoed request was cut to its header.
pub const NLM_F_CAPPED: u16 = 0x100;
/// On an error message: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

pub const NLA_F_NESTED: u16 = 1 << 15;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// Extended ack: a human-readable error message (NUL-terminated string).
pub const NLMSGERR_ATTR_MSG: u16 = 1;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Builds one generic-netlink message.
pub struct MsgBuilder {
    buf: Vec<u8>,
    /// Offsets of the headers of nested attributes not yet closed.
    open: Vec<usize>,
}

impl MsgBuilder {
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid 0: the kernel
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MsgBuilder {
            buf,
            open: Vec::new(),
        }
    }

    pub fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        assert!(len <= u16::MAX as usize, "attribute too long");
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn put_u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn put_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    pub fn put_u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's NLA_NUL_STRING and nla_strcmp expect.
    pub fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(kind, &v)
    }

    /// Open a nested attribute; attributes put until the matching `end_nested` go inside.
    pub fn begin_nested(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nested(&mut self) -> &mut Self {
        let at = self.open.pop().expect("end_nested without begin_nested");
        // The contents are already padded, so this length is aligned too.
        let len = self.buf.len() - at;
        assert!(len <= u16::MAX as usize, "nested attribute too long");
        self.buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.open.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One netlink message inside a received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub payload: &'a [u8],
}

/// Split a datagram into its netlink messages.
pub fn messages(mut buf: &[u8]) -> io::Result<Vec<Message<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(invalid(format!(
                "{} trailing bytes, shorter than a netlink header",
                buf.len()
            )));
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(invalid(format!(
                "netlink message length {len} with {} bytes left",
                buf.len()
            )));
        }
        out.push(Message {
            kind: u16::from_ne_bytes(buf[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
            pid: u32::from_ne_bytes(buf[12..16].try_into().unwrap()),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// An attribute: its type without the NESTED / NET_BYTEORDER bits, and its unpadded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    pub fn u16(&self) -> io::Result<u16> {
        Ok(u16::from_ne_bytes(self.fixed::<2>()?))
    }

    pub fn u32(&self) -> io::Result<u32> {
        Ok(u32::from_ne_bytes(self.fixed::<4>()?))
    }

    pub fn u64(&self) -> io::Result<u64> {
        Ok(u64::from_ne_bytes(self.fixed::<8>()?))
    }

    /// A string, with any NUL terminator removed.
    pub fn str(&self) -> String {
        let end = self
            .payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.payload.len());
        String::from_utf8_lossy(&self.payload[..end]).into_owned()
    }

    pub fn nested(&self) -> io::Result<Vec<Attr<'a>>> {
        attrs(self.payload)
    }

    fn fixed<const N: usize>(&self) -> io::Result<[u8; N]> {
        self.payload.try_into().map_err(|_| {
            invalid(format!(
                "attribute {} has {} bytes, expected {N}",
                self.kind,
                self.payload.len()
            ))
        })
    }
}

/// Parse a run of attributes.
pub fn attrs(mut buf: &[u8]) -> io::Result<Vec<Attr<'_>>> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes(buf[0..2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[2..4].try_into().unwrap()) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(invalid(format!(
                "attribute {kind} length {len} with {} bytes left",
                buf.len()
            )));
        }
        out.push(Attr {
            kind,
            payload: &buf[NLA_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    // Fewer than 4 bytes left is padding the kernel also ignores (nla_for_each_attr).
    Ok(out)
}

pub fn find<'a>(attrs: &[Attr<'a>], kind: u16) -> Option<Attr<'a>> {
    attrs.iter().copied().find(|a| a.kind == kind)
}

/// The generic-netlink part of a message.
#[derive(Debug, Clone, Copy)]
pub struct Genl<'a> {
    pub cmd: u8,
    pub version: u8,
    pub attrs: &'a [u8],
}

pub fn genl(payload: &[u8]) -> io::Result<Genl<'_>> {
    if payload.len() < GENL_HDRLEN {
        return Err(invalid("generic netlink message shorter than its header"));
    }
    Ok(Genl {
        cmd: payload[0],
        version: payload[1],
        attrs: &payload[GENL_HDRLEN..],
    })
}

/// An NLMSG_ERROR message: errno 0 is an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// Positive errno, 0 for an ack.
    pub errno: i32,
    /// Sequence number of the request it answers (from the echoed header).
    pub seq: u32,
    /// The extended-ack message, if the kernel gave one.
    pub text: Option<String>,
}

impl ErrorMsg {
    pub fn into_result(self) -> io::Result<()> {
        if self.errno == 0 {
            return Ok(());
        }
        let e = io::Error::from_raw_os_error(self.errno);
        Err(match self.text {
            Some(t) => io::Error::new(e.kind(), format!("{e}: {t}")),
            None => e,
        })
    }
}

pub fn error_msg(m: &Message) -> io::Result<ErrorMsg> {
    let p = m.payload;
    if p.len() < 4 + NLMSG_HDRLEN {
        return Err(invalid("netlink error message too short"));
    }
    let error = i32::from_ne_bytes(p[0..4].try_into().unwrap());
    let orig_len = u32::from_ne_bytes(p[4..8].try_into().unwrap()) as usize;
    let seq = u32::from_ne_bytes(p[12..16].try_into().unwrap());
    let mut text = None;
    if m.flags & NLM_F_ACK_TLVS != 0 {
        let echoed = if m.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            orig_len
        };
        let at = align4(4 + echoed);
        if at <= p.len() {
            text = find(&attrs(&p[at..])?, NLMSGERR_ATTR_MSG).map(|a| a.str());
        }
    }
    Ok(ErrorMsg {
        errno: error.checked_neg().unwrap_or(libc::EINVAL),
        seq,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes(b[i..i + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_ne_bytes(b[i..i + 4].try_into().unwrap())
    }

    #[test]
    fn header_fields_and_length() {
        let m = MsgBuilder::new(0x1234, NLM_F_REQUEST | NLM_F_ACK, 77, 3, 1).finish();
        assert_eq!(m.len(), NLMSG_HDRLEN + GENL_HDRLEN);
        assert_eq!(u32_at(&m, 0), 20);
        assert_eq!(u16_at(&m, 4), 0x1234);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&m, 8), 77);
        assert_eq!(u32_at(&m, 12), 0);
        assert_eq!(&m[16..20], &[3, 1, 0, 0]);
    }

    #[test]
    fn attributes_are_padded_but_lengths_are_not() {
        let mut b = MsgBuilder::new(16, NLM_F_REQUEST, 1, 3, 1);
        b.put_str(2, "nbd_mc_group"); // 12 chars + NUL = 13 bytes
        b.put_u32(1, 9);
        let m = b.finish();
        let a = &m[20..];
        assert_eq!(u16_at(a, 0), 4 + 13);
        assert_eq!(u16_at(a, 2), 2);
        assert_eq!(&a[4..17], b"nbd_mc_group\0");
        assert_eq!(&a[17..20], &[0, 0, 0], "padding is zero");
        // The next attribute starts on the 4-byte boundary.
        assert_eq!(u16_at(a, 20), 8);
        assert_eq!(u16_at(a, 22), 1);
        assert_eq!(u32_at(a, 24), 9);
        assert_eq!(m.len(), 20 + 20 + 8);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
    }

    #[test]
    fn nested_attributes_round_trip() {
        let mut b = MsgBuilder::new(30, NLM_F_REQUEST, 5, 1, 1);
        b.put_u64(2, 1 << 30);
        b.begin_nested(7);
        b.begin_nested(1);
        b.put_u32(1, 42);
        b.end_nested();
        b.end_nested();
        b.put_u64(8, 30);
        let m = b.finish();
        let msgs = messages(&m).unwrap();
        assert_eq!(msgs.len(), 1);
        let g = genl(msgs[0].payload).unwrap();
        assert_eq!((g.cmd, g.version), (1, 1));
        let top = attrs(g.attrs).unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].u64().unwrap(), 1 << 30);
        // Nested attributes carry NLA_F_NESTED on the wire; parsing strips it.
        assert_eq!(u16_at(g.attrs, 12 + 2), 7 | NLA_F_NESTED);
        assert_eq!(top[1].kind, 7);
        assert_eq!(top[1].payload.len(), 4 + 4 + 4);
        let items = top[1].nested().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, 1);
        let fd = items[0].nested().unwrap();
        assert_eq!(
            fd,
            vec![Attr {
                kind: 1,
                payload: &42u32.to_ne_bytes()
            }]
        );
        assert_eq!(top[2].u64().unwrap(), 30);
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut a = MsgBuilder::new(20, 0, 1, 4, 1);
        a.put_str(1, "x"); // odd length: the next message starts after padding
        let a = a.finish();
        let mut b = MsgBuilder::new(20, 0, 2, 4, 1);
        b.put_u32(1, 3);
        let b = b.finish();
        let mut d = a.clone();
        d.extend_from_slice(&b);
        let msgs = messages(&d).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].seq, 1);
        assert_eq!(msgs[1].seq, 2);
        let at = attrs(genl(msgs[1].payload).unwrap().attrs).unwrap();
        assert_eq!(at[0].u32().unwrap(), 3);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(messages(&[1, 2, 3]).is_err());
        let mut m = MsgBuilder::new(20, 0, 1, 4, 1).finish();
        m[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(messages(&m).is_err());
        // An attribute claiming more bytes than there are.
        let bad = [12u8, 0, 1, 0, 0, 0, 0, 0];
        assert!(attrs(&bad).is_err());
        // Shorter than its own header.
        let bad = [2u8, 0, 1, 0];
        assert!(attrs(&bad).is_err());
        // Wrong width for a fixed-size read.
        let a = Attr {
            kind: 1,
            payload: &[1, 2],
        };
        assert!(a.u32().is_err());
        assert!(genl(&[1, 2]).is_err());
    }

    /// An error message as the kernel builds it (netlink_ack).
    fn error_message(errno: i32, req: &[u8], capped: bool, text: Option<&str>) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(-errno).to_ne_bytes());
        if capped {
            p.extend_from_slice(&req[..NLMSG_HDRLEN]);
        } else {
            p.extend_from_slice(req);
        }
        p.resize(align4(p.len()), 0);
        let mut flags = 0;
        if capped {
            flags |= NLM_F_CAPPED;
        }
        if let Some(t) = text {
            flags |= NLM_F_ACK_TLVS;
            let mut s = t.as_bytes().to_vec();
            s.push(0);
            p.extend_from_slice(&((4 + s.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            p.extend_from_slice(&s);
            p.resize(align4(p.len()), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + p.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&9u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&p);
        m
    }

    #[test]
    fn acks_and_errors() {
        let mut req = MsgBuilder::new(30, NLM_F_REQUEST | NLM_F_ACK, 9, 1, 1);
        req.put_str(1, "abc"); // odd payload: the echoed request is padded
        let req = req.finish();

        let ack = error_message(0, &req, true, None);
        let m = messages(&ack).unwrap();
        assert_eq!(m[0].kind, NLMSG_ERROR);
        let e = error_msg(&m[0]).unwrap();
        assert_eq!((e.errno, e.seq, e.text.as_deref()), (0, 9, None));
        assert!(e.into_result().is_ok());

        for capped in [true, false] {
            let err = error_message(libc::EBUSY, &req, capped, Some("nbd0 already in use"));
            let m = messages(&err).unwrap();
            let e = error_msg(&m[0]).unwrap();
            assert_eq!(e.errno, libc::EBUSY);
            assert_eq!(e.text.as_deref(), Some("nbd0 already in use"));
            let r = e.into_result().unwrap_err();
            assert_eq!(r.raw_os_error(), None); // wrapped with the text
            assert!(r.to_string().contains("already in use"), "{r}");
        }

        let plain = error_message(libc::ENOENT, &req, false, None);
        let e = error_msg(&messages(&plain).unwrap()[0]).unwrap();
        assert_eq!(
            e.into_result().unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );

        let short = Message {
            kind: NLMSG_ERROR,
            flags: 0,
            seq: 0,
            pid: 0,
            payload: &[0; 8],
        };
        assert!(error_msg(&short).is_err());
    }
}
