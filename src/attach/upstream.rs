//! The client side of NBD towards the pair: negotiate with whichever node serves, forward
//! requests on one connection, and after losing it, replay every unanswered request on the
//! next primary.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use nbd_wire::consts::*;
use nbd_wire::transmission::RequestHeader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Between rounds over the nodes while none accepts.
const RETRY: Duration = Duration::from_millis(20);
/// One connection and handshake attempt; a node that does not answer must not stall the round.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A node that has answered nothing for this long while requests wait may be stopped (alive
/// to TCP, silent to NBD): look whether another node serves as primary.
const STALL: Duration = Duration::from_secs(1);

/// A request as the pair will see it.
#[derive(Clone, Debug)]
pub enum Op {
    Read { len: u32 },
    Write { data: Bytes, fua: bool },
    Flush,
    Trim { len: u32 },
    Zero { len: u32, no_hole: bool },
    Cache { len: u32 },
}

impl Op {
    fn header(&self, cookie: u64, offset: u64) -> RequestHeader {
        let (kind, flags, length) = match self {
            Op::Read { len } => (CMD_READ, 0, *len),
            Op::Write { data, fua } => (
                CMD_WRITE,
                if *fua { CMD_FLAG_FUA } else { 0 },
                data.len() as u32,
            ),
            Op::Flush => (CMD_FLUSH, 0, 0),
            Op::Trim { len } => (CMD_TRIM, 0, *len),
            Op::Zero { len, no_hole } => (
                CMD_WRITE_ZEROES,
                if *no_hole { CMD_FLAG_NO_HOLE } else { 0 },
                *len,
            ),
            Op::Cache { len } => (CMD_CACHE, 0, *len),
        };
        RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
    }
}

struct Pending {
    op: Op,
    offset: u64,
    done: oneshot::Sender<io::Result<Bytes>>,
    /// When it was last sent (a replay sends it again).
    sent: Instant,
}

/// A request submitted by the local NBD server.
pub struct Submit {
    pub op: Op,
    pub offset: u64,
    pub done: oneshot::Sender<io::Result<Bytes>>,
}

/// Where the pair's nodes serve NBD, and what to ask for.
#[derive(Clone, Debug)]
pub struct Target {
    pub export: String,
    /// `(node name, HOST:PORT)` in config order.
    pub nodes: Vec<(String, String)>,
    pub size: u64,
    /// Give up with EIO after this long without a primary.
    pub timeout: Duration,
}

/// Errors an upstream node returns when it is not (or no longer) the primary: the request is
/// replayed on the next primary instead of reaching the client.
fn not_primary(error: u32) -> bool {
    error == ESHUTDOWN
}

type Table = Arc<Mutex<BTreeMap<u64, Pending>>>;

/// Run the forwarding loop until `rx` closes.
pub async fn run(target: Target, mut rx: mpsc::Receiver<Submit>, status: Arc<Mutex<String>>) {
    let table: Table = Arc::new(Mutex::new(BTreeMap::new()));
    let mut cookie = 1u64;
    let mut outage_since: Option<Instant> = None;
    loop {
        let (stream, node) = match connect_any(&target).await {
            Ok(x) => x,
            Err(why) => {
                let since = *outage_since.get_or_insert_with(Instant::now);
                *status.lock().unwrap() = format!("no primary: {why}");
                if since.elapsed() > target.timeout {
                    fail_all(
                        &table,
                        &format!("no primary for {:?}: {why}", target.timeout),
                    );
                    // Fail what arrives meanwhile too, until a primary answers again.
                    while let Ok(s) = rx.try_recv() {
                        let _ = s.done.send(Err(io::Error::from_raw_os_error(libc::EIO)));
                    }
                }
                if rx.is_closed() && table.lock().unwrap().is_empty() {
                    return;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if let Some(since) = outage_since.take() {
            tracing::info!(
                "following {node}: {} request(s) replayed after {} ms without a primary",
                table.lock().unwrap().len(),
                since.elapsed().as_millis()
            );
        } else {
            tracing::info!("following {node}");
        }
        *status.lock().unwrap() = format!("following {node}");
        let mut current = (stream, node);
        loop {
            let (stream, node) = current;
            let (r, w) = stream.into_split();
            let others: Vec<(String, String)> = target
                .nodes
                .iter()
                .filter(|(n, _)| *n != node)
                .cloned()
                .collect();
            let stalled = watch_stall(&table, &target, &others);
            match serve(r, w, &table, &mut rx, &mut cookie, stalled).await {
                Ended::Closed => return,
                Ended::Lost(why) => {
                    tracing::warn!("lost {node}: {why}; looking for the primary");
                    outage_since = Some(Instant::now());
                    break;
                }
                Ended::Moved(stream, to) => {
                    tracing::warn!(
                        "{node} answered nothing for {STALL:?} and {to} serves as primary: \
                         following {to}, replaying {} request(s)",
                        table.lock().unwrap().len()
                    );
                    *status.lock().unwrap() = format!("following {to}");
                    current = (stream, to);
                }
            }
        }
    }
}

/// Ends when requests have waited `STALL` without any reply and another node completes the
/// NBD handshake (only a primary serves): the current node is stopped or cut off, and a
/// new primary took over. Its requests are replayed there (a superseded primary can no
/// longer acknowledge them: the new one refuses its writes).
async fn watch_stall(table: &Table, target: &Target, others: &[(String, String)]) -> Ended {
    loop {
        tokio::time::sleep(STALL / 4).await;
        let stalled = {
            let t = table.lock().unwrap();
            t.values().map(|p| p.sent).min()
        }
        .is_some_and(|oldest| oldest.elapsed() > STALL);
        if !stalled {
            continue;
        }
        for (name, addr) in others {
            if let Ok(Ok((s, size, _))) =
                tokio::time::timeout(CONNECT_TIMEOUT, negotiate(addr, &target.export)).await
            {
                if size == target.size {
                    return Ended::Moved(s, name.clone());
                }
            }
        }
    }
}

fn fail_all(table: &Table, why: &str) {
    let drained: Vec<Pending> = std::mem::take(&mut *table.lock().unwrap())
        .into_values()
        .collect();
    if !drained.is_empty() {
        tracing::error!("failing {} request(s) with EIO: {why}", drained.len());
    }
    for p in drained {
        let _ = p.done.send(Err(io::Error::from_raw_os_error(libc::EIO)));
    }
}

/// Try every node once; the first that completes the handshake is the primary.
async fn connect_any(target: &Target) -> Result<(TcpStream, String), String> {
    let mut why = Vec::new();
    for (name, addr) in &target.nodes {
        match tokio::time::timeout(CONNECT_TIMEOUT, negotiate(addr, &target.export)).await {
            Ok(Ok((s, size, _))) if size == target.size => return Ok((s, name.clone())),
            Ok(Ok((_, size, _))) => why.push(format!(
                "{name} exports {size} bytes, expected {}",
                target.size
            )),
            Ok(Err(e)) => why.push(format!("{name}: {e}")),
            Err(_) => why.push(format!("{name}: no answer within {CONNECT_TIMEOUT:?}")),
        }
    }
    Err(why.join("; "))
}

/// Fixed-newstyle handshake with NBD_OPT_GO; returns the stream, the export size and its
/// transmission flags (the kernel client must know whether it may send FLUSH, FUA, TRIM).
pub async fn negotiate(addr: &str, export: &str) -> io::Result<(TcpStream, u64, u16)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap());
    let opt = u64::from_be_bytes(hello[8..16].try_into().unwrap());
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a newstyle NBD server",
        ));
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    let mut out = BytesMut::new();
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    out.put_u32(cflags);
    out.put_u64(IHAVEOPT);
    out.put_u32(OPT_GO);
    out.put_u32(4 + export.len() as u32 + 2);
    out.put_u32(export.len() as u32);
    out.put_slice(export.as_bytes());
    out.put_u16(0);
    s.write_all(&out).await?;
    let mut size = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        if magic != OPT_REPLY_MAGIC || len > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad option reply",
            ));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match kind {
            REP_ACK => break,
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let flags = u16::from_be_bytes([data[10], data[11]]);
                size = Some((u64::from_be_bytes(data[2..10].try_into().unwrap()), flags));
            }
            REP_INFO => {}
            k if k & 0x8000_0000 != 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    String::from_utf8_lossy(&data).into_owned(),
                ))
            }
            _ => {}
        }
    }
    let (size, flags) = size
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "server sent no export size"))?;
    Ok((s, size, flags))
}

enum Ended {
    /// The local server is gone and nothing is pending.
    Closed,
    Lost(String),
    /// The current node went silent and this one serves: follow it.
    Moved(TcpStream, String),
}

/// Forward requests on one negotiated connection: first replay what is pending, then take new
/// requests, until the connection fails or the primary says it is not primary any more.
async fn serve<R, W>(
    r: R,
    w: W,
    table: &Table,
    rx: &mut mpsc::Receiver<Submit>,
    cookie: &mut u64,
    stalled: impl std::future::Future<Output = Ended>,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let mut r = BufReader::with_capacity(256 * 1024, r);
    // Replay in submission order, under fresh cookies so stale replies cannot match.
    let replay: Vec<(u64, Pending)> = std::mem::take(&mut *table.lock().unwrap())
        .into_iter()
        .collect();
    for (_, mut p) in replay {
        let c = *cookie;
        *cookie += 1;
        p.sent = Instant::now();
        if let Err(e) = send(&mut w, &p.op, c, p.offset).await {
            table.lock().unwrap().insert(c, p);
            return Ended::Lost(format!("replaying: {e}"));
        }
        table.lock().unwrap().insert(c, p);
    }
    if let Err(e) = w.flush().await {
        return Ended::Lost(format!("replaying: {e}"));
    }
    let writer = async {
        loop {
            let Some(s) = rx.recv().await else {
                // The local server is gone: let the reader finish what is pending.
                while !table.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return Ended::Closed;
            };
            let mut next = Some(s);
            while let Some(s) = next {
                let c = *cookie;
                *cookie += 1;
                let header_op = s.op.clone();
                table.lock().unwrap().insert(
                    c,
                    Pending {
                        op: s.op,
                        offset: s.offset,
                        done: s.done,
                        sent: Instant::now(),
                    },
                );
                if let Err(e) = send(&mut w, &header_op, c, s.offset).await {
                    return Ended::Lost(format!("sending: {e}"));
                }
                next = rx.try_recv().ok();
                if next.is_none() {
                    // Let the requests that are about to be submitted join this batch: one
                    // send (and one wake-up of the node) for many requests.
                    tokio::task::yield_now().await;
                    next = rx.try_recv().ok();
                }
            }
            if let Err(e) = w.flush().await {
                return Ended::Lost(format!("sending: {e}"));
            }
        }
    };
    let reader = async {
        loop {
            let mut h = [0u8; 16];
            if let Err(e) = r.read_exact(&mut h).await {
                return Ended::Lost(format!("reading: {e}"));
            }
            let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let c = u64::from_be_bytes(h[8..16].try_into().unwrap());
            if magic != SIMPLE_REPLY_MAGIC {
                return Ended::Lost(format!("bad reply magic {magic:#x}"));
            }
            let read_len = match table.lock().unwrap().get(&c) {
                Some(Pending {
                    op: Op::Read { len },
                    ..
                }) if error == 0 => Some(*len as usize),
                Some(_) => None,
                None => return Ended::Lost(format!("reply to unknown cookie {c}")),
            };
            let data = match read_len {
                Some(len) => {
                    let mut buf = BytesMut::zeroed(len);
                    if let Err(e) = r.read_exact(&mut buf).await {
                        return Ended::Lost(format!("reading: {e}"));
                    }
                    buf.freeze()
                }
                None => Bytes::new(),
            };
            if not_primary(error) {
                // Leave it pending: it is replayed on the next primary.
                return Ended::Lost("the node is no longer primary".into());
            }
            if let Some(p) = table.lock().unwrap().remove(&c) {
                let _ = p.done.send(if error == 0 {
                    Ok(data)
                } else {
                    Err(io::Error::from_raw_os_error(nbd_to_errno(error)))
                });
            }
        }
    };
    tokio::select! {
        e = writer => e,
        e = reader => e,
        e = stalled => e,
    }
}

async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    op: &Op,
    cookie: u64,
    offset: u64,
) -> io::Result<()> {
    let mut hdr = BytesMut::with_capacity(28);
    op.header(cookie, offset).encode(&mut hdr);
    w.write_all(&hdr).await?;
    if let Op::Write { data, .. } = op {
        w.write_all(data).await?;
    }
    Ok(())
}

fn nbd_to_errno(e: u32) -> i32 {
    match e {
        EPERM => libc::EPERM,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}
