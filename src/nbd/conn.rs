//! The transmission phase of one connection.
//!
//! The reader parses requests and spawns one task per request, so requests run concurrently
//! and complete in any order. Replies go through a channel to a single writer task that
//! writes each reply whole and batches whatever replies are ready into one write. In-flight
//! requests are bounded per connection and, by payload bytes, across the server; when a
//! bound is reached the reader stops reading the socket, which pushes back on the client.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use nbd_wire::consts::*;
use nbd_wire::transmission::{
    nbd_error_from_errno, put_block_status_chunk, put_error_chunk, put_none_chunk,
    put_offset_data_header, put_simple_reply, MAX_SKIPPED_PAYLOAD, REQUEST_LEN,
};
use nbd_wire::{validate, Command, ExportLimits, Negotiated, RequestHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::{Export, MAX_IN_FLIGHT_PER_CONN};
use crate::store::{AlignedBuf, Extent};

/// Most extents returned for one BLOCK_STATUS request.
const MAX_EXTENTS: usize = 1024;
/// Replies smaller than this are copied into the batch buffer; larger data is written as is.
const COPY_LIMIT: usize = 64 * 1024;
const BATCH_LIMIT: usize = 256 * 1024;

enum Reply {
    /// Completion without data: success, or an error for any command.
    Done { cookie: u64, error: u32, read: bool },
    /// A successful READ.
    Data {
        cookie: u64,
        offset: u64,
        data: Bytes,
    },
    /// A successful BLOCK_STATUS for `base:allocation`.
    Extents {
        cookie: u64,
        context: u32,
        extents: Vec<(u32, u32)>,
    },
}

struct ClientCount(Arc<Export>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.send_modify(|n| *n -= 1);
    }
}

pub(super) async fn run<R, W>(
    reader: R,
    writer: W,
    neg: Negotiated,
    export: Arc<Export>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    export.clients.send_modify(|n| *n += 1);
    let _count = ClientCount(export.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_replies(writer, rx, neg.structured_replies));
    let mut conn = Conn {
        reader: BufReader::with_capacity(128 * 1024, reader),
        limits: ExportLimits {
            size: neg.export.size,
            read_only: export.read_only,
            structured_replies: neg.structured_replies,
            block_status: neg.base_allocation.is_some(),
        },
        context: neg.base_allocation.unwrap_or(0),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONN)),
        export,
        tx,
    };
    let mut kick = conn.export.kick.subscribe();
    let read_result = tokio::select! {
        r = conn.read_requests(&mut shutdown) => r,
        _ = kick.changed() => Ok(()),
        // The writer only ends early when the socket broke; stop reading then too.
        w = &mut writer => {
            return match w {
                Ok(r) => r,
                Err(e) => Err(io::Error::other(e)),
            };
        }
    };
    // Every in-flight task holds a sender; the writer drains their replies and then closes.
    drop(conn);
    let write_result = writer.await.map_err(io::Error::other)?;
    read_result.and(write_result)
}

struct Conn<R> {
    reader: BufReader<R>,
    limits: ExportLimits,
    context: u32,
    in_flight: Arc<Semaphore>,
    export: Arc<Export>,
    tx: mpsc::UnboundedSender<Reply>,
}

impl<R: AsyncRead + Unpin> Conn<R> {
    async fn read_requests(&mut self, shutdown: &mut watch::Receiver<bool>) -> io::Result<()> {
        loop {
            let mut hdr = [0u8; REQUEST_LEN];
            tokio::select! {
                r = self.reader.read_exact(&mut hdr) => match r {
                    Ok(_) => {}
                    // A client may close without NBD_CMD_DISC (fio does).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                },
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            }
            let h = RequestHeader::decode(&hdr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            match validate(&h, &self.limits) {
                Ok(Command::Disconnect) => return Ok(()),
                Ok(cmd) => self.start(h.cookie, cmd).await?,
                Err(error) => {
                    self.skip_payload(h.payload_len()).await?;
                    let read = h.kind == CMD_READ;
                    let _ = self.tx.send(Reply::Done {
                        cookie: h.cookie,
                        error,
                        read,
                    });
                }
            }
        }
    }

    /// Consume the payload of a rejected WRITE so the stream stays in step.
    async fn skip_payload(&mut self, len: u32) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if len > MAX_SKIPPED_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("write payload of {len} bytes is beyond any limit; disconnecting"),
            ));
        }
        let skipped = tokio::io::copy(
            &mut (&mut self.reader).take(u64::from(len)),
            &mut tokio::io::sink(),
        )
        .await?;
        if skipped != u64::from(len) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    async fn start(&mut self, cookie: u64, cmd: Command) -> io::Result<()> {
        let data_len = match cmd {
            Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
            _ => 0,
        };
        let permits = Permits {
            _request: self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed"),
            _bytes: self
                .export
                .budget
                .clone()
                .acquire_many_owned(data_len.div_ceil(1024) as u32)
                .await
                .expect("semaphore never closed"),
        };
        let payload = match cmd {
            Command::Write { length, .. } => {
                let mut buf = AlignedBuf::for_overwrite(length as usize);
                // EOF inside the payload: the write is not applied, the connection ends.
                self.reader.read_exact(buf.as_mut_slice()).await?;
                Some(Bytes::from_owner(buf))
            }
            _ => None,
        };
        let tx = self.tx.clone();
        let store = self.export.store.clone();
        let context = self.context;
        tokio::spawn(async move {
            let reply = execute(&*store, cookie, cmd, payload, context).await;
            let _ = tx.send(reply);
            drop(permits);
        });
        Ok(())
    }
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

async fn execute(
    store: &dyn crate::store::BlockStore,
    cookie: u64,
    cmd: Command,
    payload: Option<Bytes>,
    context: u32,
) -> Reply {
    let done = |r: io::Result<()>, read: bool| Reply::Done {
        cookie,
        error: r.err().map_or(0, |e| to_nbd_error(&e)),
        read,
    };
    match cmd {
        Command::Read { length: 0, .. } => done(Ok(()), true),
        Command::Read { offset, length } => match store.read(offset, length as usize).await {
            Ok(data) => Reply::Data {
                cookie,
                offset,
                data,
            },
            Err(e) => done(Err(e), true),
        },
        Command::Write { length: 0, .. } => done(Ok(()), false),
        Command::Write { offset, fua, .. } => done(
            store.write(offset, payload.unwrap_or_default(), fua).await,
            false,
        ),
        Command::Flush => done(store.flush().await, false),
        Command::Trim { length: 0, .. } | Command::WriteZeroes { length: 0, .. } => {
            done(Ok(()), false)
        }
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            let mut r = store.discard(offset, u64::from(length)).await;
            if r.is_ok() && fua {
                r = store.flush().await;
            }
            done(r, false)
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
        } => {
            let mut r = store
                .write_zeroes(offset, u64::from(length), !no_hole)
                .await;
            if r.is_ok() && fua {
                r = store.flush().await;
            }
            done(r, false)
        }
        Command::Cache { offset, length } => {
            done(store.cache(offset, u64::from(length)).await, false)
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let max = if req_one { 1 } else { MAX_EXTENTS };
            match store.extents(offset, u64::from(length), max).await {
                Ok(extents) => Reply::Extents {
                    cookie,
                    context,
                    extents: descriptors(&extents, length, req_one),
                },
                Err(e) => done(Err(e), false),
            }
        }
        Command::Disconnect => unreachable!("handled by the reader"),
    }
}

/// `base:allocation` descriptors: non-empty, each within u32, one only with REQ_ONE.
fn descriptors(extents: &[Extent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(extents.len().max(1));
    for e in extents {
        let len = e.length.min(u64::from(length)) as u32;
        if len == 0 {
            continue;
        }
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(last) if last.1 == flags && last.0.checked_add(len).is_some() => last.0 += len,
            _ => out.push((len, flags)),
        }
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    if req_one {
        out.truncate(1);
        out[0].0 = out[0].0.min(length);
    }
    out
}

fn to_nbd_error(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(errno) => nbd_error_from_errno(errno),
        None => EIO,
    }
}

fn error_text(error: u32) -> &'static str {
    match error {
        EPERM => "operation not permitted",
        EIO => "input/output error",
        ENOMEM => "out of memory",
        EINVAL => "invalid request",
        ENOSPC => "no space left on device",
        ESHUTDOWN => "server shutting down",
        _ => "error",
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(BATCH_LIMIT + COPY_LIMIT);
    while let Some(first) = rx.recv().await {
        // Requests finishing in this round of the scheduler share one send (without the
        // yield, a request task wakes this one straight away and each reply goes alone).
        tokio::task::yield_now().await;
        let mut next = Some(first);
        while let Some(reply) = next {
            if let Some(large) = encode(&mut buf, reply, structured) {
                w.write_all(&buf).await?;
                buf.clear();
                w.write_all(&large).await?;
            }
            next = if buf.len() < BATCH_LIMIT {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !buf.is_empty() {
            w.write_all(&buf).await?;
            buf.clear();
        }
    }
    w.shutdown().await
}

/// Append a reply to `buf`. Returns data too large to copy, which must be written after `buf`.
fn encode(buf: &mut Vec<u8>, reply: Reply, structured: bool) -> Option<Bytes> {
    let data = match reply {
        Reply::Done {
            cookie,
            error: 0,
            read: true,
        } if structured => {
            put_none_chunk(buf, cookie);
            return None;
        }
        Reply::Done {
            cookie,
            error,
            read: true,
        } if structured => {
            put_error_chunk(buf, cookie, error, error_text(error));
            return None;
        }
        Reply::Done { cookie, error, .. } => {
            put_simple_reply(buf, cookie, error);
            return None;
        }
        Reply::Extents {
            cookie,
            context,
            extents,
        } => {
            put_block_status_chunk(buf, cookie, context, &extents);
            return None;
        }
        Reply::Data {
            cookie,
            offset,
            data,
        } => {
            if structured {
                put_offset_data_header(buf, cookie, offset, data.len() as u32);
            } else {
                put_simple_reply(buf, cookie, 0);
            }
            data
        }
    };
    if data.len() <= COPY_LIMIT {
        buf.extend_from_slice(&data);
        None
    } else {
        Some(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool) -> Extent {
        Extent { length, hole }
    }

    #[test]
    fn descriptors_merge_clip_and_obey_req_one() {
        let e = [
            ext(4096, true),
            ext(4096, true),
            ext(8192, false),
            ext(1 << 40, true),
        ];
        assert_eq!(
            descriptors(&e, 1 << 20, false),
            vec![
                (8192, STATE_HOLE | STATE_ZERO),
                (8192, 0),
                (1 << 20, STATE_HOLE | STATE_ZERO)
            ]
        );
        assert_eq!(
            descriptors(&e, 512, true),
            vec![(512, STATE_HOLE | STATE_ZERO)]
        );
        assert_eq!(descriptors(&[], 100, false), vec![(100, 0)]);
        assert_eq!(descriptors(&[ext(0, false)], 100, true), vec![(100, 0)]);
    }

    #[test]
    fn structured_reads_never_get_simple_replies() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            Reply::Done {
                cookie: 1,
                error: EINVAL,
                read: true,
            },
            true,
        );
        assert_eq!(&buf[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&buf[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        buf.clear();
        encode(
            &mut buf,
            Reply::Done {
                cookie: 1,
                error: 0,
                read: true,
            },
            true,
        );
        assert_eq!(&buf[6..8], &REPLY_TYPE_NONE.to_be_bytes());
        buf.clear();
        encode(
            &mut buf,
            Reply::Done {
                cookie: 1,
                error: EINVAL,
                read: false,
            },
            true,
        );
        assert_eq!(&buf[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn large_read_data_is_not_copied() {
        let mut buf = Vec::new();
        let data = Bytes::from(vec![7u8; COPY_LIMIT + 1]);
        let rest = encode(
            &mut buf,
            Reply::Data {
                cookie: 1,
                offset: 0,
                data: data.clone(),
            },
            false,
        );
        assert_eq!(buf.len(), 16);
        assert_eq!(rest, Some(data));
    }
}
