//! Establishing the peer link (accept or dial, authenticate, exchange state and bitmaps,
//! decide the sync direction) and running it (dispatching frames, pings, resync, verify).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncRead, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::link::{Link, LinkLost, Reply};
use super::proto::{
    self, read_frame, write_control, Frame, HandshakeError, Identity, Kind, Message,
};
use crate::node::decide::{handshake as decide, peer_claim, Direction, PeerClaim, Side, Verdict};
use crate::node::runtime::{Conn, Node, Progress};
use crate::node::{DiskState, Role};

/// Bitmap words per `Bitmap` message.
const BITMAP_CHUNK: usize = 8192;
/// Resync and verify work in chunks of this size, this many in flight.
const SYNC_CHUNK: u64 = 256 * 1024;
const SYNC_WINDOW: usize = 8;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept peers on the replication address and, if this node is the dialer, keep dialing
/// while the operator wants the link up. Exactly one side dials (the name that sorts first),
/// so the two never race to build two links.
pub async fn run(node: Arc<Node>) -> std::io::Result<()> {
    let listener = TcpListener::bind(&node.me.replication).await?;
    tracing::info!("replication listening on {}", node.me.replication);
    if node.me.name < node.peer_cfg.name {
        let n = node.clone();
        tokio::spawn(async move { dial_loop(n).await });
    }
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let n = node.clone();
        tokio::spawn(async move {
            if !n.state().want_connect || n.link().is_some() {
                tracing::info!(
                    "refusing replication connection from {addr}: {}",
                    busy_reason(&n)
                );
                return;
            }
            if let Err(e) = establish(n.clone(), sock).await {
                tracing::warn!("replication connection from {addr} dropped: {e}");
            }
        });
    }
}

fn busy_reason(n: &Node) -> &'static str {
    if n.link().is_some() {
        "already connected"
    } else {
        "StandAlone (run tandem connect)"
    }
}

async fn dial_loop(node: Arc<Node>) {
    let interval = node.cfg.net.connect_interval;
    loop {
        if node.state().want_connect && node.link().is_none() {
            match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TcpStream::connect(&node.peer_cfg.replication),
            )
            .await
            {
                Ok(Ok(sock)) => {
                    if let Err(e) = establish(node.clone(), sock).await {
                        tracing::info!("connecting to {} failed: {e}", node.peer_cfg.name);
                    }
                }
                Ok(Err(e)) => tracing::debug!("dialing {} failed: {e}", node.peer_cfg.replication),
                Err(_) => tracing::debug!("dialing {} timed out", node.peer_cfg.replication),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn establish(node: Arc<Node>, mut sock: TcpStream) -> Result<(), HandshakeError> {
    sock.set_nodelay(true)?;
    let id = Identity {
        resource: &node.cfg.resource.name,
        node: &node.me.name,
        peer: &node.peer_cfg.name,
        size: node.size,
        secret: &node.secret,
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, proto::handshake(&mut sock, &id)).await {
        Ok(r) => r?,
        Err(_) => return Err(HandshakeError::Protocol("handshake timed out".into())),
    }
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::with_capacity(256 * 1024, r);

    // Exchange state and bitmaps concurrently (large bitmaps must not deadlock).
    let mine = node.my_peer_state();
    let words: Vec<u64> = node.meta().bitmap_words().to_vec();
    let send = async {
        write_control(&mut w, &Message::State(mine.clone())).await?;
        let chunks: Vec<&[u64]> = if words.is_empty() {
            vec![&[][..]]
        } else {
            words.chunks(BITMAP_CHUNK).collect()
        };
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let first = (i * BITMAP_CHUNK) as u64;
            write_control(
                &mut w,
                &Message::Bitmap {
                    first,
                    words: c.to_vec(),
                    last: i + 1 == n,
                },
            )
            .await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let recv = async {
        let Frame::Control(Message::State(peer)) = read_frame(&mut r).await? else {
            return Err(HandshakeError::Protocol("expected State".into()));
        };
        let mut theirs = Vec::with_capacity(words.len());
        loop {
            match read_frame(&mut r).await? {
                Frame::Control(Message::Bitmap {
                    first,
                    words: ws,
                    last,
                }) => {
                    if first as usize != theirs.len()
                        || theirs.len() + ws.len() > words.len().max(1)
                    {
                        return Err(HandshakeError::Protocol(
                            "bitmap transfer out of order or too long".into(),
                        ));
                    }
                    theirs.extend(ws);
                    if last {
                        break;
                    }
                }
                _ => return Err(HandshakeError::Protocol("expected Bitmap".into())),
            }
        }
        Ok((peer, theirs))
    };
    let (sent, received) = tokio::join!(send, recv);
    sent?;
    let (peer, peer_words) = received?;
    if peer_words.len() != words.len() {
        return Err(HandshakeError::Protocol(
            "peer bitmap has the wrong size".into(),
        ));
    }
    if peer.epoch > mine.epoch && mine.role == Role::Primary {
        // The witness gave the peer a newer epoch: this node was superseded while away.
        node.lose_primary(format!(
            "{} holds newer epoch {} (mine is {})",
            node.peer_cfg.name, peer.epoch, mine.epoch
        ));
        return Err(HandshakeError::Protocol(
            "superseded by the peer's newer epoch; re-handshaking as secondary".into(),
        ));
    }
    if mine.role == Role::Primary && peer.role == Role::Primary && peer.epoch < mine.epoch {
        // A superseded primary (e.g. resumed after SIGSTOP) that has not noticed yet: it demotes
        // itself when it sees this epoch; try again then instead of refusing for good.
        return Err(HandshakeError::Protocol(format!(
            "{} still thinks it is primary at epoch {} (mine is {}); retrying once it steps down",
            node.peer_cfg.name, peer.epoch, mine.epoch
        )));
    }
    node.adopt_epoch(peer.epoch);

    let verdict = decide(
        &Side::of(&node.me.name, &mine),
        &Side::of(&node.peer_cfg.name, &peer),
        &node.cfg.split_brain,
    );
    let explain = verdict.explain();
    tracing::info!("sync handshake with {}: {explain}", node.peer_cfg.name);
    let (conn, full) = match &verdict {
        Verdict::NoSync { .. } => {
            // Equal generations but leftover out-of-sync blocks (after verify, or extents the
            // peer had not flushed when the link was lost).
            let leftover = mine.out_of_sync_bytes + peer.out_of_sync_bytes > 0;
            if leftover {
                let me_side = Side::of(&node.me.name, &mine);
                let peer_side = Side::of(&node.peer_cfg.name, &peer);
                match crate::node::decide::leftover_direction(&me_side, &peer_side) {
                    Ok(Direction::Source) => (Conn::SyncSource, false),
                    Ok(Direction::Target) => (Conn::SyncTarget, false),
                    Err(why) => {
                        return Err(HandshakeError::Protocol(format!(
                            "leftover out-of-sync blocks, but {why}; retrying"
                        )))
                    }
                }
            } else {
                if node.state().disk == DiskState::Outdated && peer.disk == DiskState::UpToDate {
                    // Same data as an UpToDate peer: not outdated after all.
                    let _ = node.persist(|sb| sb.flags.outdated = false);
                    node.state().disk = DiskState::UpToDate;
                }
                (Conn::Connected, false)
            }
        }
        Verdict::Sync {
            direction: Direction::Source,
            full,
            ..
        } => (Conn::SyncSource, *full),
        Verdict::Sync {
            direction: Direction::Target,
            full,
            ..
        } => (Conn::SyncTarget, *full),
        Verdict::SplitBrain { .. } => {
            {
                let mut st = node.state();
                st.split_brain = Some(explain.clone());
                st.want_connect = false;
                st.conn = Conn::StandAlone;
            }
            tracing::error!(
                "split brain detected with {}: {explain}",
                node.peer_cfg.name
            );
            node.event(
                "split-brain",
                json!({"peer": node.peer_cfg.name, "detail": explain}),
            );
            return Ok(());
        }
        Verdict::Refuse { reason, .. } => {
            {
                let mut st = node.state();
                st.last_refusal = Some(explain.clone());
                st.want_connect = false;
                st.conn = Conn::StandAlone;
            }
            tracing::error!("refusing to connect to {}: {reason}", node.peer_cfg.name);
            node.event(
                "connection",
                json!({"state": "StandAlone", "refused": reason, "detail": explain}),
            );
            return Ok(());
        }
    };

    // Both sides hold the union of the two bitmaps (or everything, for a full sync).
    {
        let mut meta = node.meta();
        if full {
            meta.set_all_out_of_sync();
        } else {
            meta.merge_bitmap(&peer_words)
                .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        }
        meta.flush_bitmap()
            .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    }
    if conn == Conn::SyncTarget {
        node.persist(|sb| sb.flags.consistent = false)
            .map_err(|e| HandshakeError::Protocol(e.message))?;
    }

    let peer_up_to_date = peer.disk == DiskState::UpToDate;
    let link = Link::start(w, node.peer_cfg.name.clone(), peer);
    if let Err(why) = node.set_link(link.clone()) {
        link.close();
        return Err(HandshakeError::Protocol(why.into()));
    }
    // A promotion (new generation, role) while the states were in flight made the decision
    // stale: start over with what is true now.
    let now = node.my_peer_state();
    if now.gens != mine.gens || now.role != mine.role || now.disk != mine.disk {
        node.drop_link(
            "peer changed during the handshake; re-handshaking",
            "this node changed during the handshake; re-handshaking",
        )
        .await;
        return Err(HandshakeError::Protocol(
            "local state changed during the handshake".into(),
        ));
    }
    // Writes held by fencing go to this link now.
    node.set_fence(crate::node::failover::Fence::Clear);
    {
        let mut st = node.state();
        st.conn = conn;
        st.discard_my_data = false;
        st.last_refusal = None;
        if conn == Conn::SyncTarget {
            st.disk = DiskState::Inconsistent;
            // Whatever the copy was, it becomes the source's.
            node.lapsed_in.store(0, Ordering::Relaxed);
        }
        let total = node.meta().out_of_sync_bytes();
        if matches!(conn, Conn::SyncSource | Conn::SyncTarget) {
            st.resync = Some(Progress::new(total));
        }
    }
    tracing::info!("connected to {} as {}", node.peer_cfg.name, conn.as_str());
    if let Some(why) = crate::node::decide::nobody_promotable(
        &Side::of(&node.me.name, &node.my_peer_state()),
        &Side::of(&node.peer_cfg.name, &link.peer.lock().unwrap()),
    ) {
        tracing::error!("{why}");
        node.event("failover", json!({"no_promotable": why}));
    }
    node.event(
        "connection",
        json!({"state": conn.as_str(), "peer": node.peer_cfg.name, "full_sync": full, "decision": explain}),
    );

    if conn == Conn::Connected && peer_up_to_date {
        let n = node.clone();
        tokio::spawn(async move { n.peer_in_sync().await });
    }
    node.retake_lost_role();
    node.settle_identical_pair();
    let last_rx = Arc::new(AtomicU64::new(now_ms()));
    tokio::spawn(ping_loop(node.clone(), link.clone(), last_rx.clone()));
    tokio::spawn(peer_flush_loop(
        link.clone(),
        node.cfg.net.peer_flush_interval,
    ));
    if conn == Conn::SyncSource {
        tokio::spawn(resync_source(node.clone(), link.clone()));
    } else {
        // A write that failed between the exchange of bitmaps and now marked blocks.
        resync_while_connected(&node);
    }
    let (reason, orderly) = match read_loop(&node, &link, r, &last_rx).await {
        Ok(end) => end,
        Err(e) => (format!("{e}"), false),
    };
    node.link_lost(&link, &reason, orderly);
    Ok(())
}

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

async fn ping_loop(node: Arc<Node>, link: Arc<Link>, last_rx: Arc<AtomicU64>) {
    let interval = node.cfg.net.ping_interval;
    let timeout = node.cfg.net.ping_timeout.as_millis() as u64;
    let mut closed = link.closed();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        if now_ms().saturating_sub(last_rx.load(Ordering::Relaxed)) > timeout {
            node.link_lost(
                &link,
                &format!("peer did not answer for {timeout} ms"),
                false,
            );
            return;
        }
        if link.send(&Message::Ping).await.is_err() {
            return;
        }
    }
}

/// Dispatch frames from the peer until the link ends; returns why it ended and whether the
/// peer ended it in an orderly way (it said goodbye).
async fn read_loop<R: AsyncRead + Unpin>(
    node: &Arc<Node>,
    link: &Arc<Link>,
    mut r: R,
    last_rx: &AtomicU64,
) -> std::io::Result<(String, bool)> {
    let mut closed = link.closed();
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut r) => f?,
            // Closed by whoever handled it first (then this is a no-op), or by the writer
            // failing: a real loss.
            _ = closed.wait_for(|c| *c) => return Ok(("link closed (send failed)".into(), false)),
        };
        last_rx.store(now_ms(), Ordering::Relaxed);
        match frame {
            Frame::Write {
                seq,
                offset,
                fua,
                data,
            } => {
                refuse_while_primary(node)?;
                let len = data.len() as u64;
                let n = node.clone();
                let mut write = Box::pin(async move { n.store.write(offset, data, fua).await });
                // A page-cache write finishes on its first poll: apply it here without a task
                // of its own. Anything the engine has to wait for continues in a task.
                let first_poll = {
                    let mut noop = std::task::Context::from_waker(std::task::Waker::noop());
                    write.as_mut().poll(&mut noop)
                };
                match first_poll {
                    std::task::Poll::Ready(r) => ack_apply(node, link, seq, offset, len, r).await,
                    std::task::Poll::Pending => {
                        let (n, l) = (node.clone(), link.clone());
                        tokio::spawn(async move {
                            let r = write.await;
                            ack_apply(&n, &l, seq, offset, len, r).await;
                        });
                    }
                }
            }
            Frame::ResyncData { seq, offset, data } => {
                let (n, l) = (node.clone(), link.clone());
                tokio::spawn(async move {
                    let len = data.len() as u64;
                    match n.store.write(offset, data, false).await {
                        Ok(()) => {
                            n.meta().mark_in_sync(offset, len);
                            if let Some(p) = n.state().resync.as_mut() {
                                p.done_bytes += len;
                            }
                            let _ = l.send(&Message::ResyncAck { seq, offset, len }).await;
                        }
                        Err(e) => {
                            let errno = e.raw_os_error().unwrap_or(libc::EIO);
                            let _ = l.send(&Message::WriteFailed { seq, errno }).await;
                        }
                    }
                });
            }
            Frame::Control(msg) => match msg {
                Message::Trim { seq, offset, len } => {
                    refuse_while_primary(node)?;
                    let (n, l) = (node.clone(), link.clone());
                    tokio::spawn(async move {
                        let r = n.store.discard(offset, len).await;
                        ack_apply(&n, &l, seq, offset, len, r).await;
                    });
                }
                Message::Zero {
                    seq,
                    offset,
                    len,
                    may_trim,
                } => {
                    refuse_while_primary(node)?;
                    let (n, l) = (node.clone(), link.clone());
                    tokio::spawn(async move {
                        let r = n.store.write_zeroes(offset, len, may_trim).await;
                        ack_apply(&n, &l, seq, offset, len, r).await;
                    });
                }
                Message::Flush { seq } => {
                    let (n, l) = (node.clone(), link.clone());
                    tokio::spawn(async move {
                        match n.store.flush().await {
                            Ok(()) => {
                                let _ = l.send(&Message::FlushAck { seq }).await;
                            }
                            Err(e) => {
                                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                                let _ = l.send(&Message::WriteFailed { seq, errno }).await;
                            }
                        }
                    });
                }
                Message::WriteAck { seq }
                | Message::FlushAck { seq }
                | Message::ResyncAck { seq, .. } => link.complete(seq, Reply::Done),
                Message::WriteFailed { seq, errno } => link.complete(seq, Reply::Failed(errno)),
                Message::VerifyRequest { seq, offset, len } => {
                    let (n, l) = (node.clone(), link.clone());
                    tokio::spawn(async move {
                        let digests = digests(&n, offset, len).await.unwrap_or_default();
                        let _ = l.send(&Message::VerifyReply { seq, digests }).await;
                    });
                }
                Message::VerifyReply { seq, digests } => {
                    link.complete(seq, Reply::Digests(digests))
                }
                Message::ResyncDone { gens } => {
                    let source = link.peer.lock().unwrap().disk;
                    resync_finished_as_target(node, gens, source).map_err(std::io::Error::other)?;
                    node.announce().await;
                    node.retake_lost_role();
                    node.settle_identical_pair();
                }
                Message::State(ps) => {
                    let my_epoch = node.meta().superblock().epoch;
                    match peer_claim(node.role(), my_epoch, ps.role, ps.epoch) {
                        PeerClaim::Fine => {}
                        // Steps down and drops this link.
                        PeerClaim::Superseded(why) => node.lose_primary(why),
                        PeerClaim::TwoPrimaries(why) => {
                            return Err(std::io::Error::other(why));
                        }
                    }
                    // The peer finished its resync (or was UpToDate all along): lift its
                    // outdated mark.
                    let lift_outdated_mark = ps.disk == DiskState::UpToDate
                        && node.role() == Role::Primary
                        && node.meta().superblock().flags.peer_outdated;
                    node.adopt_epoch(ps.epoch);
                    *link.peer.lock().unwrap() = ps;
                    node.bump();
                    if lift_outdated_mark {
                        let n = node.clone();
                        tokio::spawn(async move { n.peer_in_sync().await });
                    }
                    // E.g. a resync between two Outdated copies ended on the peer's side.
                    node.settle_identical_pair();
                }
                Message::TakeOver { seq } => {
                    let n = node.clone();
                    let l = link.clone();
                    tokio::spawn(async move {
                        let error = n.promote(false).await.err().map(|e| e.message);
                        let _ = l.send(&Message::TakeOverReply { seq, error }).await;
                    });
                }
                Message::HandOver { seq } => {
                    let n = node.clone();
                    let l = link.clone();
                    tokio::spawn(async move {
                        let to = n.peer_cfg.name.clone();
                        let error = n.switchover(&to).await.err().map(|e| e.message);
                        let _ = l.send(&Message::TakeOverReply { seq, error }).await;
                    });
                }
                Message::TakeOverReply { seq, error } => {
                    link.complete(seq, error.map_or(Reply::Done, Reply::Error))
                }
                Message::Ping => {
                    let _ = link.send(&Message::PingAck).await;
                }
                Message::PingAck => {}
                Message::Goodbye { reason } => {
                    // The peer flushed everything it acknowledged before saying goodbye.
                    link.unflushed.take();
                    return Ok((format!("peer said goodbye: {reason}"), true));
                }
                other => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("unexpected message from peer: {other:?}"),
                    ))
                }
            },
        }
    }
}

/// A primary applies only its own writes: one from the peer means the peer thinks it is
/// primary too. Applying and acknowledging it would let two nodes acknowledge writes; end
/// the link instead (the handshake then decides by epoch).
fn refuse_while_primary(node: &Node) -> std::io::Result<()> {
    if node.role() == Role::Primary {
        return Err(std::io::Error::other(
            "the peer sent a write, but this node is primary",
        ));
    }
    Ok(())
}

/// Acknowledge an applied replicated write; a failed one is reported and marked out of sync
/// locally too, so the next resync repairs it.
async fn ack_apply(n: &Node, l: &Link, seq: u64, offset: u64, len: u64, r: std::io::Result<()>) {
    let msg = match r {
        Ok(()) => Message::WriteAck { seq },
        Err(e) => {
            if len > 0 {
                n.meta().mark_out_of_sync(offset, len);
            }
            tracing::error!("applying replicated write at {offset} failed: {e}");
            // This copy now lacks an acknowledged write: it must not take over.
            n.outdate_myself(&format!("a replicated write at {offset} failed: {e}"));
            Message::WriteFailed {
                seq,
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            }
        }
    };
    let _ = l.send(&msg).await;
}

/// The resync from the peer is complete: this copy is now the source's. It is as current as
/// the source was: a copy of an Outdated source is Outdated too (it may lack what the source
/// lacks), so a resync never turns stale data into data that promotes automatically.
///
/// If that cannot be recorded the resync is not finished: the error ends the link, and the
/// next handshake resyncs again from what the metadata on disk says.
fn resync_finished_as_target(
    node: &Node,
    gens: crate::meta::Generations,
    source: DiskState,
) -> Result<(), String> {
    let size = node.size;
    let disk = if source == DiskState::Outdated {
        DiskState::Outdated
    } else {
        DiskState::UpToDate
    };
    let result = {
        let mut meta = node.meta();
        meta.mark_in_sync(0, size);
        meta.flush_bitmap().and_then(|_| {
            meta.update(|sb| {
                sb.gens.adopt(&gens);
                sb.flags.consistent = true;
                sb.flags.outdated = disk == DiskState::Outdated;
                sb.flags.crashed_primary = false;
            })
        })
    };
    if let Err(e) = result {
        let why = format!("recording the finished resync failed: {e}");
        tracing::error!("{why}");
        return Err(why);
    }
    {
        let mut st = node.state();
        st.disk = disk;
        st.conn = Conn::Connected;
        st.resync = None;
    }
    tracing::info!("resync finished: this node is {}", disk.as_str());
    node.event(
        "resync",
        json!({"state": "finished", "disk": disk.as_str()}),
    );
    Ok(())
}

/// Why one chunk of a resync did not land.
enum ChunkError {
    LinkLost,
    /// This node could not read it, or the peer could not write it: the bits stay, and the
    /// chunk is tried again after a pause (a failing disk may heal; nothing signals that).
    Failed(String),
}

impl From<LinkLost> for ChunkError {
    fn from(_: LinkLost) -> Self {
        ChunkError::LinkLost
    }
}

/// First pause after a pass in which chunks failed; doubled per failing pass up to the max.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Push every out-of-sync block to the peer, a window of chunks at a time, holding the range
/// lock of each chunk from read until the peer acknowledged it, so an application write to
/// the same blocks is ordered after it on the peer. Bits clear only when the peer has the data.
/// Runs until no bit is left or the link is lost: chunks that fail are retried.
pub async fn resync_source(node: Arc<Node>, link: Arc<Link>) {
    let mut pause = RETRY_FIRST;
    loop {
        match resync_round(node.clone(), link.clone()).await {
            // Bits set between the last pass and the switch back to Connected: another round.
            Round::Finished if claim_online_resync(&node, &link) => pause = RETRY_FIRST,
            Round::Finished | Round::Stopped => return,
            Round::Retry => {
                if !pause_unless_lost(&link, pause).await {
                    return;
                }
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

/// A primary connected to its peer with blocks marked out of sync (a write failed on its disk
/// or on the peer's while the link stayed up) pushes them to the peer now: left for the next
/// handshake, they stayed marked for as long as the link lived.
pub fn resync_while_connected(node: &Arc<Node>) {
    let Some(link) = node.link() else { return };
    if claim_online_resync(node, &link) {
        tokio::spawn(resync_source(node.clone(), link));
    }
}

/// Connected → SyncSource, when this node is primary on `link` and has bits. Only the caller
/// that made the switch runs the resync.
fn claim_online_resync(node: &Node, link: &Arc<Link>) -> bool {
    let total = {
        let mut st = node.state();
        let current = node.link().is_some_and(|l| Arc::ptr_eq(&l, link));
        if st.role != Role::Primary || st.conn != Conn::Connected || !current {
            return false;
        }
        let total = node.meta().out_of_sync_bytes();
        if total == 0 {
            return false;
        }
        st.conn = Conn::SyncSource;
        st.resync = Some(Progress::new(total));
        total
    };
    tracing::warn!("{total} bytes marked out of sync while connected: resyncing them to the peer");
    node.event(
        "resync",
        json!({"state": "started", "role": "source", "reason": "marked while connected", "total_bytes": total}),
    );
    true
}

enum Round {
    Finished,
    /// The link was lost.
    Stopped,
    /// Every block landed but the end could not be made durable or recorded: go again.
    Retry,
}

/// Wait `pause`; false if the link was lost meanwhile.
async fn pause_unless_lost(link: &Link, pause: Duration) -> bool {
    let mut closed = link.closed();
    tokio::select! {
        _ = tokio::time::sleep(pause) => !link.is_lost(),
        _ = closed.wait_for(|c| *c) => false,
    }
}

/// One resync to the end.
async fn resync_round(node: Arc<Node>, link: Arc<Link>) -> Round {
    let rate = node.cfg.resync.rate;
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    let mut pause = RETRY_FIRST;
    loop {
        let mut cursor = 0u64;
        let mut tasks = tokio::task::JoinSet::new();
        let mut failed: (u64, Option<String>) = (0, None);
        let mut note = |r: Result<Result<(), ChunkError>, tokio::task::JoinError>| match r {
            Ok(Err(ChunkError::LinkLost)) => Err(LinkLost),
            Ok(Err(ChunkError::Failed(why))) => {
                failed.0 += 1;
                failed.1.get_or_insert(why);
                Ok(())
            }
            _ => Ok(()),
        };
        while let Some((offset, len)) = {
            let next = node.meta().next_out_of_sync(cursor);
            next
        } {
            let len = len.min(SYNC_CHUNK);
            cursor = offset + len;
            while tasks.len() >= SYNC_WINDOW {
                if let Some(r) = tasks.join_next().await {
                    if note(r).is_err() {
                        return Round::Stopped;
                    }
                }
            }
            if link.is_lost() {
                return Round::Stopped;
            }
            if rate > 0 {
                sent_bytes += len;
                let due = Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let (n, l) = (node.clone(), link.clone());
            tasks.spawn(async move { sync_chunk(&n, &l, offset, len).await });
        }
        while let Some(r) = tasks.join_next().await {
            if note(r).is_err() {
                return Round::Stopped;
            }
        }
        if link.is_lost() {
            return Round::Stopped;
        }
        // Writes that failed meanwhile set bits behind the cursor: go again.
        let left = node.meta().out_of_sync_bytes();
        if left == 0 {
            break;
        }
        if let Some(p) = node.state().resync.as_mut() {
            p.total_bytes = p.done_bytes + left;
        }
        if let (n, Some(why)) = failed {
            tracing::error!(
                "resync: {n} chunk(s) did not land ({why}); {left} bytes still out of sync, \
                 trying again in {pause:?}"
            );
            if !pause_unless_lost(&link, pause).await {
                return Round::Stopped;
            }
            pause = (pause * 2).min(RETRY_MAX);
        } else {
            pause = RETRY_FIRST;
        }
    }
    // The target must not call itself UpToDate with the data still in its page cache.
    match peer_flush(&link).await {
        Replicated::Acked => {}
        Replicated::LinkLost => return Round::Stopped,
        Replicated::PeerFailed => {
            tracing::error!("the resync target failed to flush; the resync is not finished");
            return Round::Retry;
        }
    }
    let gens = {
        let mut meta = node.meta();
        let r = meta.flush_bitmap().and_then(|_| {
            meta.update(|sb| {
                sb.gens.clear_bitmap();
                sb.flags.crashed_primary = false;
            })
        });
        if let Err(e) = r {
            tracing::error!("recording the finished resync failed: {e}");
            return Round::Retry;
        }
        meta.superblock().gens
    };
    if link.send(&Message::ResyncDone { gens }).await.is_err() {
        return Round::Stopped;
    }
    let done = {
        let mut st = node.state();
        if st.conn == Conn::SyncSource {
            st.conn = Conn::Connected;
        }
        st.resync.take()
    };
    // The target's view of this node still has the bits of the handshake.
    node.announce().await;
    let (synced, sent, secs) = done.map_or((0, 0, 0.0), |p| {
        (
            p.done_bytes,
            p.transferred_bytes,
            p.started.elapsed().as_secs_f64(),
        )
    });
    tracing::info!("resync finished as source: {synced} bytes brought in sync, {sent} bytes sent, in {secs:.2} s");
    node.event(
        "resync",
        json!({"state": "finished", "role": "source", "synced_bytes": synced, "transferred_bytes": sent, "seconds": secs}),
    );
    Round::Finished
}

async fn sync_chunk(node: &Node, link: &Link, offset: u64, len: u64) -> Result<(), ChunkError> {
    let _guard = node.locks.lock(offset, len).await;
    let data = node
        .store
        .read(offset, len as usize)
        .await
        .map_err(|e| ChunkError::Failed(format!("reading at {offset}: {e}")))?;
    // With `checksum = true`, ask for the target's block digests first and send only the
    // blocks that differ (most blocks marked after a crash are in fact identical).
    let theirs = if node.cfg.resync.checksum {
        let seq = link.next_seq();
        match link
            .request(seq, &Message::VerifyRequest { seq, offset, len })
            .await?
        {
            Reply::Digests(d) => Some(d),
            other => return Err(peer_refused(offset, other)),
        }
    } else {
        None
    };
    let mut waits = Vec::new();
    let mut sent = 0u64;
    for (i, block) in data.chunks(4096).enumerate() {
        if theirs.as_ref().and_then(|t| t.get(i)) == Some(&crc32fast::hash(block)) {
            continue;
        }
        // Coalesce with the previous differing block when adjacent.
        let at = i * 4096;
        match waits.last_mut() {
            Some((start, end, _)) if *end == at => *end = at + block.len(),
            _ => waits.push((at, at + block.len(), None)),
        }
    }
    for (start, end, rx) in waits.iter_mut() {
        let seq = link.next_seq();
        *rx = Some(link.expect(seq));
        link.send_data(
            Kind::ResyncData,
            seq,
            offset + *start as u64,
            false,
            data.slice(*start..*end),
        )
        .await?;
        sent += (*end - *start) as u64;
    }
    for (_, _, rx) in waits {
        match rx
            .expect("registered above")
            .await
            .unwrap_or(Err(LinkLost))?
        {
            Reply::Done => {}
            other => return Err(peer_refused(offset, other)),
        }
    }
    link.unflushed.resynced(offset, len);
    node.meta().mark_in_sync(offset, len);
    if let Some(p) = node.state().resync.as_mut() {
        p.done_bytes += len;
        p.transferred_bytes += sent;
    }
    Ok(())
}

fn peer_refused(offset: u64, reply: Reply) -> ChunkError {
    ChunkError::Failed(match reply {
        Reply::Failed(errno) => format!(
            "the peer could not write at {offset}: {}",
            std::io::Error::from_raw_os_error(errno)
        ),
        other => format!("unexpected answer from the peer at {offset}: {other:?}"),
    })
}

/// CRC32 of each 4 KiB block of a range.
async fn digests(node: &Node, offset: u64, len: u64) -> std::io::Result<Vec<u32>> {
    let data: Bytes = node.store.read(offset, len as usize).await?;
    Ok(data.chunks(4096).map(crc32fast::hash).collect())
}

/// Online verify from this node: compare digests of every block with the peer's, under the
/// range lock so in-flight writes do not show as differences. Differing blocks are marked
/// out of sync; a later reconnect resyncs them.
pub async fn verify(node: Arc<Node>) -> Result<Progress, String> {
    let link = node.link().ok_or("not connected to the peer")?;
    {
        let mut st = node.state();
        if st.conn != Conn::Connected {
            return Err(format!("cannot verify while {}", st.conn.as_str()));
        }
        st.conn = Conn::VerifySource;
        st.verify = Some(Progress::new(node.size));
    }
    node.event("verify", json!({"state": "started"}));
    let mut offset = 0;
    let result = loop {
        if offset >= node.size {
            break Ok(());
        }
        let len = SYNC_CHUNK.min(node.size - offset);
        let _guard = node.locks.lock(offset, len).await;
        let mine = match digests(&node, offset, len).await {
            Ok(d) => d,
            Err(e) => break Err(format!("local read failed: {e}")),
        };
        let seq = link.next_seq();
        let theirs = match link
            .request(seq, &Message::VerifyRequest { seq, offset, len })
            .await
        {
            Ok(Reply::Digests(d)) => d,
            _ => break Err("peer link lost during verify".to_string()),
        };
        let mut mismatched = 0;
        for (i, (a, b)) in mine
            .iter()
            .zip(theirs.iter().chain(std::iter::repeat(&!0)))
            .enumerate()
        {
            if a != b {
                let at = offset + i as u64 * 4096;
                let l = 4096.min(offset + len - at);
                node.meta().mark_out_of_sync(at, l);
                mismatched += l;
            }
        }
        if let Some(p) = node.state().verify.as_mut() {
            p.done_bytes += len;
            p.mismatched_bytes += mismatched;
        }
        offset += len;
    };
    let progress = {
        let mut st = node.state();
        if st.conn == Conn::VerifySource {
            st.conn = Conn::Connected;
        }
        let p = st.verify.take();
        st.last_verify = p.clone();
        p
    };
    let _ = node.meta().flush_bitmap();
    let p = progress.unwrap_or_else(|| Progress::new(node.size));
    node.event(
        "verify",
        json!({"state": "finished", "mismatched_bytes": p.mismatched_bytes, "error": result.as_ref().err()}),
    );
    result.map(|_| p)
}

/// What became of an operation sent to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicated {
    /// The peer has it.
    Acked,
    /// The peer is connected but failed to apply it (its copy is now behind).
    PeerFailed,
    /// The link was lost before the peer answered: the peer may or may not have it.
    LinkLost,
}

fn replicated(ack: Result<Reply, LinkLost>) -> Replicated {
    match ack {
        Ok(Reply::Done) => Replicated::Acked,
        Ok(_) => Replicated::PeerFailed,
        Err(LinkLost) => Replicated::LinkLost,
    }
}

/// Replicate a write-like control operation and wait for the peer's answer.
pub async fn replicate_control(link: &Link, seq: u64, msg: Message) -> Replicated {
    replicated(link.request(seq, &msg).await)
}

/// Flush the peer's disk; on success everything it acknowledged before is durable there.
pub async fn peer_flush(link: &Link) -> Replicated {
    let epoch = link.unflushed.flush_sent();
    let seq = link.next_seq();
    let r = replicated(link.request(seq, &Message::Flush { seq }).await);
    if r == Replicated::Acked {
        link.unflushed.flushed(epoch);
    }
    r
}

/// Between a peer's acknowledgement and its own flush a crash of its operating system loses
/// the write; without client flushes, ask for one every `interval` so that window stays short
/// and a link loss marks little for resync.
async fn peer_flush_loop(link: Arc<Link>, interval: Duration) {
    let mut closed = link.closed();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        if !link.unflushed.is_empty() && peer_flush(&link).await == Replicated::LinkLost {
            return;
        }
    }
}

/// Send an application write to the peer and wait for its acknowledgement.
pub async fn replicate_write(
    link: &Link,
    seq: u64,
    offset: u64,
    data: Bytes,
    fua: bool,
) -> Replicated {
    let rx = link.expect(seq);
    if link
        .send_data(Kind::Write, seq, offset, fua, data)
        .await
        .is_err()
    {
        link.forget(seq);
        return Replicated::LinkLost;
    }
    replicated(rx.await.unwrap_or(Err(LinkLost)))
}
