//! A running link: pings, and every frame the peer sends (a secondary applies the primary's
//! writes and resync data; answers complete this node's requests; state and role changes).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::io::AsyncRead;

use super::decide::{peer_claim, PeerClaim};
use super::resync::{digests, resync_finished_as_target};
use super::runtime::Node;
use super::{DiskState, Role};
use crate::repl::link::{Link, Reply};
use crate::repl::proto::{read_frame, Frame, Message};

pub(super) fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub(super) async fn ping_loop(node: Arc<Node>, link: Arc<Link>, last_rx: Arc<AtomicU64>) {
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
pub(super) async fn read_loop<R: AsyncRead + Unpin>(
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
                        node.peer_in_sync(link.id);
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
                Message::Verifying { active } => {
                    // The digests are answered whatever the state shows.
                    if node.state().peer_verify(active) {
                        let state = if active { "started" } else { "finished" };
                        tracing::info!("{}'s verify against this node {state}", link.peer_node);
                        node.event("verify", json!({"state": state, "role": "target"}));
                    }
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
