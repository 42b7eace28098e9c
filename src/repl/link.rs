//! One authenticated connection to the peer: a bounded outgoing queue drained by a writer
//! task, and the table of requests waiting for the peer's acknowledgement.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::proto::{encode_control, encode_data_header, Kind, Message, PeerState, HEADER_LEN};
use super::unflushed::Unflushed;

/// Frames queued towards the peer. Bounded: a slow peer applies back-pressure to the
/// primary's writers instead of growing memory (invariant 7).
const QUEUE_DEPTH: usize = 256;

pub enum Outgoing {
    Control(Bytes),
    Data {
        header: [u8; HEADER_LEN],
        data: Bytes,
    },
    /// Fired once everything queued before it is written to the socket.
    Written(oneshot::Sender<()>),
}

/// The peer's answer to a request.
pub type Ack = Result<Reply, LinkLost>;

#[derive(Debug)]
pub enum Reply {
    Done,
    Failed(i32),
    Digests(Vec<u32>),
    /// The peer refused a request, saying why.
    Error(String),
}

#[derive(Debug, Clone, Copy)]
pub struct LinkLost;

pub struct Link {
    /// Unique in this process: which link a decision was made on.
    pub id: u64,
    tx: mpsc::Sender<Outgoing>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Ack>>>,
    seq: AtomicU64,
    closed: watch::Sender<bool>,
    lost: AtomicBool,
    /// Set before a goodbye: nothing but the goodbye is sent any more.
    quiet: AtomicBool,
    pub peer_node: String,
    /// The peer's state as last reported.
    pub peer: Mutex<PeerState>,
    /// What the peer acknowledged but has not flushed yet.
    pub unflushed: Unflushed,
}

impl Link {
    /// Create the link and the writer task that owns the socket's write half.
    pub fn start<W: AsyncWrite + Unpin + Send + 'static>(
        w: W,
        peer_node: String,
        peer: PeerState,
    ) -> std::sync::Arc<Link> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (closed, _) = watch::channel(false);
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let link = std::sync::Arc::new(Link {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            tx,
            pending: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(1),
            closed,
            lost: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            peer_node,
            peer: Mutex::new(peer),
            unflushed: Unflushed::default(),
        });
        let l = link.clone();
        tokio::spawn(async move {
            if let Err(e) = write_loop(w, rx, l.closed.subscribe()).await {
                tracing::debug!("peer link writer ended: {e}");
            }
            l.close();
        });
        link
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Register a request `seq` and return where its answer arrives. Register before sending.
    pub fn expect(&self, seq: u64) -> oneshot::Receiver<Ack> {
        let (tx, rx) = oneshot::channel();
        if self.is_lost() {
            let _ = tx.send(Err(LinkLost));
        } else {
            self.pending.lock().unwrap().insert(seq, tx);
        }
        rx
    }

    /// Deliver the peer's answer to request `seq`.
    pub fn complete(&self, seq: u64, reply: Reply) {
        if let Some(tx) = self.pending.lock().unwrap().remove(&seq) {
            let _ = tx.send(Ok(reply));
        }
    }

    /// A request that was registered but never sent: forget it, so failed sends do not pile
    /// up in the table.
    pub fn forget(&self, seq: u64) {
        self.pending.lock().unwrap().remove(&seq);
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }

    /// Queue the goodbye and wait until the writer has handed it to the socket (bounded: a
    /// peer that stopped reading must not hold up a shutdown).
    pub async fn say_goodbye(&self, reason: &str) {
        let msg = Message::Goodbye {
            reason: reason.into(),
        };
        if self.send(&msg).await.is_err() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Outgoing::Written(tx)).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx).await;
        }
    }

    /// From now on only a `Goodbye` is sent: no acknowledgement queued after this leaves,
    /// so a flush that starts now covers everything the peer will see acknowledged.
    pub fn quiesce(&self) {
        self.quiet.store(true, Ordering::Release);
    }

    pub async fn send(&self, msg: &Message) -> Result<(), LinkLost> {
        if self.quiet.load(Ordering::Acquire) && !matches!(msg, Message::Goodbye { .. }) {
            return Err(LinkLost);
        }
        self.tx
            .send(Outgoing::Control(encode_control(msg)))
            .await
            .map_err(|_| LinkLost)
    }

    pub async fn send_data(
        &self,
        kind: Kind,
        seq: u64,
        offset: u64,
        fua: bool,
        data: Bytes,
    ) -> Result<(), LinkLost> {
        if self.quiet.load(Ordering::Acquire) {
            return Err(LinkLost);
        }
        let header = encode_data_header(kind, seq, offset, fua, &data);
        self.tx
            .send(Outgoing::Data { header, data })
            .await
            .map_err(|_| LinkLost)
    }

    /// Send a request and wait for its answer (or for the link to die).
    pub async fn request(&self, seq: u64, msg: &Message) -> Ack {
        let rx = self.expect(seq);
        if let Err(e) = self.send(msg).await {
            self.forget(seq);
            return Err(e);
        }
        rx.await.unwrap_or(Err(LinkLost))
    }

    /// Tear the link down: every waiting request learns the link is lost.
    pub fn close(&self) {
        self.lost.store(true, Ordering::Release);
        let _ = self.closed.send(true);
        for (_, tx) in self.pending.lock().unwrap().drain() {
            let _ = tx.send(Err(LinkLost));
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    mut closed: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(256 * 1024);
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
            _ = closed.wait_for(|c| *c) => return Ok(()),
        };
        // Let the tasks that are ready run first: what they queue joins this batch, so the
        // peer sees one send per batch instead of one per request.
        tokio::task::yield_now().await;
        let mut next = Some(first);
        let mut written = Vec::new();
        while let Some(out) = next {
            match out {
                Outgoing::Written(tx) => written.push(tx),
                Outgoing::Control(b) => batch.extend_from_slice(&b),
                Outgoing::Data { header, data } => {
                    batch.extend_from_slice(&header);
                    if data.len() <= 64 * 1024 {
                        batch.extend_from_slice(&data);
                    } else {
                        w.write_all(&batch).await?;
                        batch.clear();
                        w.write_all(&data).await?;
                    }
                }
            }
            next = if batch.len() < 256 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            w.write_all(&batch).await?;
            batch.clear();
        }
        if !written.is_empty() {
            w.flush().await?;
            for tx in written {
                let _ = tx.send(());
            }
        }
    }
}
