//! The server side of the fixed-newstyle handshake as a sans-IO state machine.
//!
//! The driver writes [`ServerHandshake::take_output`] to the socket, reads at most
//! [`ServerHandshake::wants`] bytes and passes them to [`ServerHandshake::receive`], until an
//! [`Outcome`] or an error. Reading no more than `wants()` guarantees that no byte of the
//! transmission phase is swallowed by the handshake. Memory is bounded by the caps below
//! whatever the client sends: unknown option payloads are skipped, never buffered.

use bytes::BufMut;

use crate::consts::*;

/// Options a client may send before the connection is dropped (nbdkit uses 32 as well).
pub const MAX_OPTIONS: u32 = 32;
/// Largest option payload read into memory; longer payloads of known options are skipped
/// and answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_BUFFERED_OPTION: u32 = 64 * 1024;
/// Longest option payload tolerated at all; anything longer drops the connection.
pub const MAX_OPTION_LEN: u32 = 1024 * 1024;

/// What the server knows of one export, as the handshake needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum payload) for `NBD_INFO_BLOCK_SIZE`.
    pub block_size: (u32, u32, u32),
}

/// Why an export cannot be used right now: an option reply error code and a message for
/// the client (e.g. "this node is secondary; the primary is beta at 10.0.0.2:10809").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u32,
    pub message: String,
}

/// The server's exports, consulted during negotiation.
pub trait ExportCatalog {
    /// (name, description) pairs for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// The export a client named, or why it cannot have it.
    fn lookup(&self, name: &str) -> Result<ExportInfo, Refusal>;
}

/// The result of a finished negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enter transmission with this export.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`; the ACK is in the output. Close after sending it.
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
}

/// Reasons to drop the connection during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    UnknownClientFlags(u32),
    BadOptionMagic(u64),
    TooManyOptions,
    OptionTooLong {
        option: u32,
        length: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` can only be refused by disconnecting.
    ExportNameRefused(String),
    /// Bytes arrived after the handshake finished.
    AlreadyFinished,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownClientFlags(x) => write!(f, "client sent unknown flags {x:#x}"),
            Self::BadOptionMagic(m) => write!(f, "bad option magic {m:#x}"),
            Self::TooManyOptions => write!(f, "more than {MAX_OPTIONS} options"),
            Self::OptionTooLong { option, length } => {
                write!(
                    f,
                    "option {option} of {length} bytes exceeds {MAX_OPTION_LEN}"
                )
            }
            Self::ExportNameRefused(m) => write!(f, "export refused: {m}"),
            Self::AlreadyFinished => write!(f, "data after the handshake finished"),
        }
    }
}

impl std::error::Error for HandshakeError {}

const BASE_ALLOCATION_ID: u32 = 1;

enum State {
    ClientFlags,
    OptionHeader,
    /// Reading the payload of a known option into `payload`.
    Payload {
        option: u32,
        length: u32,
    },
    /// Discarding a payload, then answering `reply` to `option`.
    Skip {
        option: u32,
        remaining: u32,
        reply: u32,
    },
    Finished,
}

pub struct ServerHandshake<C> {
    catalog: C,
    state: State,
    /// Partial fixed-size frame (client flags or an option header).
    frame: Vec<u8>,
    payload: Vec<u8>,
    out: Vec<u8>,
    fixed_newstyle: bool,
    no_zeroes: bool,
    options_seen: u32,
    structured: bool,
    /// Export name that `base:allocation` was selected for by the last SET_META_CONTEXT.
    meta_export: Option<String>,
}

impl<C: ExportCatalog> ServerHandshake<C> {
    pub fn new(catalog: C) -> Self {
        let mut out = Vec::with_capacity(18);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Self {
            catalog,
            state: State::ClientFlags,
            frame: Vec::with_capacity(16),
            payload: Vec::new(),
            out,
            fixed_newstyle: false,
            no_zeroes: false,
            options_seen: 0,
            structured: false,
            meta_export: None,
        }
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Bytes that are pending in the output buffer.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// How many bytes the machine can take next without reading past its current frame;
    /// 0 once finished.
    pub fn wants(&self) -> usize {
        match &self.state {
            State::ClientFlags => 4 - self.frame.len(),
            State::OptionHeader => 16 - self.frame.len(),
            State::Payload { length, .. } => *length as usize - self.payload.len(),
            State::Skip { remaining, .. } => (*remaining as usize).min(64 * 1024),
            State::Finished => 0,
        }
    }

    /// Feed bytes from the client. Returns how many were consumed and, once negotiation ends,
    /// the outcome. Unconsumed bytes belong to the next call (or to the transmission phase).
    pub fn receive(&mut self, mut data: &[u8]) -> Result<(usize, Option<Outcome>), HandshakeError> {
        let total = data.len();
        if matches!(self.state, State::Finished) && !data.is_empty() {
            return Err(HandshakeError::AlreadyFinished);
        }
        while !data.is_empty() {
            let take = self.wants().min(data.len());
            let (chunk, rest) = data.split_at(take);
            data = rest;
            if let Some(outcome) = self.step(chunk)? {
                self.state = State::Finished;
                return Ok((total - data.len(), Some(outcome)));
            }
            // A zero-length payload completes without input; step again with nothing.
            while self.wants() == 0 && !matches!(self.state, State::Finished) {
                if let Some(outcome) = self.step(&[])? {
                    self.state = State::Finished;
                    return Ok((total - data.len(), Some(outcome)));
                }
            }
        }
        Ok((total, None))
    }

    fn step(&mut self, chunk: &[u8]) -> Result<Option<Outcome>, HandshakeError> {
        match self.state {
            State::ClientFlags => {
                self.frame.extend_from_slice(chunk);
                if self.frame.len() == 4 {
                    let flags = u32::from_be_bytes(self.frame[..4].try_into().unwrap());
                    self.frame.clear();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    self.fixed_newstyle = flags & FLAG_C_FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                Ok(None)
            }
            State::OptionHeader => {
                self.frame.extend_from_slice(chunk);
                if self.frame.len() == 16 {
                    let magic = u64::from_be_bytes(self.frame[0..8].try_into().unwrap());
                    let option = u32::from_be_bytes(self.frame[8..12].try_into().unwrap());
                    let length = u32::from_be_bytes(self.frame[12..16].try_into().unwrap());
                    self.frame.clear();
                    self.on_header(magic, option, length)?;
                }
                Ok(None)
            }
            State::Payload { option, length } => {
                self.payload.extend_from_slice(chunk);
                if self.payload.len() == length as usize {
                    let payload = std::mem::take(&mut self.payload);
                    self.state = State::OptionHeader;
                    return self.on_option(option, &payload);
                }
                Ok(None)
            }
            State::Skip {
                option,
                remaining,
                reply,
            } => {
                let remaining = remaining - chunk.len() as u32;
                if remaining == 0 {
                    self.state = State::OptionHeader;
                    if option == OPT_ABORT {
                        self.reply(option, REP_ACK, &[]);
                        return Ok(Some(Outcome::Aborted));
                    }
                    self.reply(option, reply, message_for(reply).as_bytes());
                } else {
                    self.state = State::Skip {
                        option,
                        remaining,
                        reply,
                    };
                }
                Ok(None)
            }
            State::Finished => Err(HandshakeError::AlreadyFinished),
        }
    }

    fn on_header(&mut self, magic: u64, option: u32, length: u32) -> Result<(), HandshakeError> {
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        self.options_seen += 1;
        if self.options_seen > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions);
        }
        if length > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong { option, length });
        }
        let skip_reply = if !self.fixed_newstyle && option != OPT_EXPORT_NAME {
            Some(REP_ERR_INVALID)
        } else {
            match option {
                OPT_ABORT => Some(REP_ACK),
                OPT_EXPORT_NAME
                | OPT_LIST
                | OPT_INFO
                | OPT_GO
                | OPT_STRUCTURED_REPLY
                | OPT_LIST_META_CONTEXT
                | OPT_SET_META_CONTEXT => (length > MAX_BUFFERED_OPTION).then_some(REP_ERR_TOO_BIG),
                _ => Some(REP_ERR_UNSUP),
            }
        };
        if option == OPT_EXPORT_NAME && length > MAX_BUFFERED_OPTION {
            return Err(HandshakeError::OptionTooLong { option, length });
        }
        self.state = match skip_reply {
            Some(reply) => State::Skip {
                option,
                remaining: length,
                reply,
            },
            None => {
                self.payload = Vec::with_capacity(length as usize);
                State::Payload { option, length }
            }
        };
        Ok(())
    }

    fn on_option(
        &mut self,
        option: u32,
        payload: &[u8],
    ) -> Result<Option<Outcome>, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => return self.export_name(payload).map(Some),
            OPT_LIST => {
                if !payload.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for (name, description) in self.catalog.list() {
                        let mut data = Vec::with_capacity(4 + name.len() + description.len());
                        data.put_u32(name.len() as u32);
                        data.put_slice(name.as_bytes());
                        data.put_slice(description.as_bytes());
                        self.reply(option, REP_SERVER, &data);
                    }
                    self.reply(option, REP_ACK, &[]);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    self.reply_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured {
                    self.reply_error(
                        option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
            }
            OPT_INFO | OPT_GO => return Ok(self.info_go(option, payload)),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, payload),
            _ => unreachable!("only buffered options reach on_option"),
        }
        Ok(None)
    }

    fn export_name(&mut self, payload: &[u8]) -> Result<Outcome, HandshakeError> {
        let name = std::str::from_utf8(payload)
            .map_err(|_| HandshakeError::ExportNameRefused("export name is not UTF-8".into()))?;
        if name.len() > MAX_STRING {
            return Err(HandshakeError::ExportNameRefused(
                "export name too long".into(),
            ));
        }
        let export = self
            .catalog
            .lookup(name)
            .map_err(|r| HandshakeError::ExportNameRefused(r.message))?;
        self.out.put_u64(export.size);
        self.out.put_u16(export.transmission_flags);
        if !self.no_zeroes {
            self.out.put_bytes(0, 124);
        }
        Ok(Outcome::Transmission(self.negotiated(export)))
    }

    fn negotiated(&self, export: ExportInfo) -> Negotiated {
        let base_allocation = (self.structured
            && self.meta_export.as_deref() == Some(&export.name))
        .then_some(BASE_ALLOCATION_ID);
        Negotiated {
            export,
            structured_replies: self.structured,
            base_allocation,
        }
    }

    fn info_go(&mut self, option: u32, payload: &[u8]) -> Option<Outcome> {
        let Some((name, infos)) = parse_info_request(payload) else {
            self.reply_error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO payload");
            return None;
        };
        let export = match self.catalog.lookup(name) {
            Ok(e) => e,
            Err(refusal) => {
                self.reply_error(option, refusal.code, &refusal.message);
                return None;
            }
        };
        let mut data = Vec::with_capacity(14);
        data.put_u16(INFO_EXPORT);
        data.put_u64(export.size);
        data.put_u16(export.transmission_flags);
        self.reply(option, REP_INFO, &data);

        let (min, pref, max) = export.block_size;
        data.clear();
        data.put_u16(INFO_BLOCK_SIZE);
        data.put_u32(min);
        data.put_u32(pref);
        data.put_u32(max);
        self.reply(option, REP_INFO, &data);

        let wants = |t: u16| infos.clone().any(|i| i == t);
        if wants(INFO_NAME) {
            data.clear();
            data.put_u16(INFO_NAME);
            data.put_slice(export.name.as_bytes());
            self.reply(option, REP_INFO, &data);
        }
        if wants(INFO_DESCRIPTION) && !export.description.is_empty() {
            data.clear();
            data.put_u16(INFO_DESCRIPTION);
            data.put_slice(export.description.as_bytes());
            self.reply(option, REP_INFO, &data);
        }
        self.reply(option, REP_ACK, &[]);
        (option == OPT_GO).then(|| Outcome::Transmission(self.negotiated(export)))
    }

    fn meta_context(&mut self, option: u32, payload: &[u8]) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
            if !self.structured {
                self.reply_error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                );
                return;
            }
        }
        let Some((name, queries)) = parse_meta_request(payload) else {
            self.reply_error(option, REP_ERR_INVALID, "malformed meta context payload");
            return;
        };
        if let Err(refusal) = self.catalog.lookup(name) {
            self.reply_error(option, refusal.code, &refusal.message);
            return;
        }
        let matched = if set {
            queries.clone().any(|q| q == META_BASE_ALLOCATION)
        } else {
            queries.clone().next().is_none()
                || queries
                    .clone()
                    .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
        };
        if matched {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut data = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
            data.put_u32(id);
            data.put_slice(META_BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &data);
            if set {
                self.meta_export = Some(name.to_owned());
            }
        }
        self.reply(option, REP_ACK, &[]);
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.put_u64(OPT_REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn reply_error(&mut self, option: u32, kind: u32, message: &str) {
        let message = truncate_utf8(message, MAX_STRING);
        self.reply(option, kind, message.as_bytes());
    }
}

fn message_for(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "option not supported",
        REP_ERR_TOO_BIG => "option payload too large",
        REP_ERR_INVALID => "only NBD_OPT_EXPORT_NAME is allowed without fixed newstyle",
        _ => "",
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// `u32 namelen, name, u16 n, n × u16`, exactly filling the payload.
fn parse_info_request(p: &[u8]) -> Option<(&str, impl Iterator<Item = u16> + Clone + '_)> {
    let namelen = be_u32(p, 0)? as usize;
    if namelen > MAX_STRING || p.len() < 6 || namelen > p.len() - 6 {
        return None;
    }
    let name = std::str::from_utf8(&p[4..4 + namelen]).ok()?;
    let n = be_u16(p, 4 + namelen)? as usize;
    let rest = &p[6 + namelen..];
    if rest.len() != 2 * n {
        return None;
    }
    Some((
        name,
        rest.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    ))
}

/// `u32 namelen, name, u32 nqueries, nqueries × (u32 len, query)`, exactly filling the payload.
fn parse_meta_request(p: &[u8]) -> Option<(&str, impl Iterator<Item = &str> + Clone + '_)> {
    let namelen = be_u32(p, 0)? as usize;
    if namelen > MAX_STRING || namelen > p.len().saturating_sub(4) {
        return None;
    }
    let name = std::str::from_utf8(&p[4..4 + namelen]).ok()?;
    let count = be_u32(p, 4 + namelen)? as usize;
    let queries = &p[8 + namelen..];
    // Validate the whole list once, so the iterator below cannot fail.
    let mut at = 0;
    for _ in 0..count {
        let len = be_u32(queries, at)? as usize;
        let q = queries.get(at + 4..(at + 4).checked_add(len)?)?;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(q).ok()?;
        at += 4 + len;
    }
    if at != queries.len() {
        return None;
    }
    let iter = QueryIter { rest: queries };
    Some((name, iter))
}

#[derive(Clone)]
struct QueryIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for QueryIter<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let len = be_u32(self.rest, 0)? as usize;
        let q = std::str::from_utf8(&self.rest[4..4 + len]).ok()?;
        self.rest = &self.rest[4 + len..];
        Some(q)
    }
}
