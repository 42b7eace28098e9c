//! Transmission phase: request decoding, validation against the export, reply encoding.

use bytes::BufMut;

use crate::consts::*;

pub const REQUEST_LEN: usize = 28;
/// Largest payload (WRITE) or read reply this server handles: the 32 MiB the spec says
/// clients may always use.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest invalid WRITE payload that is read and thrown away before the connection is
/// dropped as a denial of service.
pub const MAX_SKIPPED_PAYLOAD: u32 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request header whose magic is wrong: the stream is out of sync and must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRequestMagic(pub u32);

impl std::fmt::Display for BadRequestMagic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad request magic {:#010x}", self.0)
    }
}

impl std::error::Error for BadRequestMagic {}

impl RequestHeader {
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, BadRequestMagic> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Bytes of payload that follow this header on the wire, whether or not the request
    /// turns out to be valid.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// What the server has negotiated for one connection, as validation needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

/// Check a request against the spec's rules. `Err` carries the NBD error to reply with;
/// the connection stays up either way.
pub fn validate(h: &RequestHeader, lim: &ExportLimits) -> Result<Command, u32> {
    let allowed = match h.kind {
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(EINVAL),
    };
    if h.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (h.offset, h.length);
    let in_range = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= lim.size);
    let is_write = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if is_write && lim.read_only {
        return Err(EPERM);
    }
    match h.kind {
        CMD_READ if !in_range || length > MAX_PAYLOAD => Err(EINVAL),
        CMD_READ => Ok(Command::Read { offset, length }),
        CMD_WRITE => {
            if length > MAX_PAYLOAD {
                Err(EINVAL)
            } else if !in_range {
                Err(ENOSPC)
            } else {
                Ok(Command::Write {
                    offset,
                    length,
                    fua,
                })
            }
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => {
            if offset != 0 || length != 0 {
                Err(EINVAL)
            } else {
                Ok(Command::Flush)
            }
        }
        CMD_TRIM if !in_range => Err(EINVAL),
        CMD_TRIM => Ok(Command::Trim {
            offset,
            length,
            fua,
        }),
        CMD_CACHE if !in_range => Err(EINVAL),
        CMD_CACHE => Ok(Command::Cache { offset, length }),
        CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
        CMD_WRITE_ZEROES => Ok(Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
        }),
        CMD_BLOCK_STATUS => {
            if !lim.structured_replies || !lim.block_status || !in_range || length == 0 {
                Err(EINVAL)
            } else {
                Ok(Command::BlockStatus {
                    offset,
                    length,
                    req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                })
            }
        }
        _ => unreachable!("unknown commands were rejected above"),
    }
}

/// Map a host errno to the NBD error value sent to the client.
pub fn nbd_error_from_errno(errno: i32) -> u32 {
    match errno {
        libc_errno::EPERM | libc_errno::EROFS => EPERM,
        libc_errno::ENOSPC | libc_errno::EDQUOT | libc_errno::EFBIG => ENOSPC,
        libc_errno::EINVAL => EINVAL,
        libc_errno::ENOMEM => ENOMEM,
        libc_errno::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Linux errno values (kept here so the wire crate needs no libc).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

/// A simple reply header (16 bytes). For a successful READ the data follows.
pub fn put_simple_reply(out: &mut impl BufMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured reply chunk header (20 bytes); `length` bytes of payload follow.
pub fn put_chunk_header(out: &mut impl BufMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Header of an `OFFSET_DATA` chunk marked DONE; `data_len` bytes of data follow.
pub fn put_offset_data_header(out: &mut impl BufMut, cookie: u64, offset: u64, data_len: u32) {
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + data_len,
    );
    out.put_u64(offset);
}

/// The final `NONE` chunk (e.g. a zero-length structured READ).
pub fn put_none_chunk(out: &mut impl BufMut, cookie: u64) {
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// A final `ERROR` chunk with a message (truncated to keep the reply small).
pub fn put_error_chunk(out: &mut impl BufMut, cookie: u64, error: u32, message: &str) {
    let mut msg = message.as_bytes();
    if msg.len() > 1024 {
        msg = &msg[..1024];
        while std::str::from_utf8(msg).is_err() {
            msg = &msg[..msg.len() - 1];
        }
    }
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
}

/// A final `BLOCK_STATUS` chunk for one context: (length, flags) descriptors.
pub fn put_block_status_chunk(
    out: &mut impl BufMut,
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
) {
    let len = 4 + 8 * extents.len() as u32;
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.put_u32(context);
    for &(length, flags) in extents {
        out.put_u32(length);
        out.put_u32(flags);
    }
}
