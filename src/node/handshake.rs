//! Establishing the peer link: accept or dial, authenticate, exchange states and bitmaps,
//! decide the sync direction, then run the link until it is lost.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};

use super::decide::{handshake as decide, handshake_epochs, plan, EpochCheck, LinkPlan, Side};
use super::dispatch::{now_ms, ping_loop, read_loop};
use super::resync::{resync_source, resync_while_connected};
use super::runtime::{Conn, Node};
use super::DiskState;
use crate::repl::link::Link;
use crate::repl::proto::{
    self, read_frame, write_control, Frame, HandshakeError, Identity, Message,
};
use crate::repl::requests::peer_flush_loop;

/// Bitmap words per `Bitmap` message.
const BITMAP_CHUNK: usize = 8192;
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

    // Whichever way a resync goes, the source's copy is durable before the target records
    // itself Inconsistent (once both states are known): else a power loss here could roll
    // back the only consistent copy below what the target held (found by the simulator).
    node.flush_as_source_or_log("the sync handshake").await;
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
    match handshake_epochs(mine.role, mine.epoch, peer.role, peer.epoch) {
        EpochCheck::Proceed => {}
        EpochCheck::Superseded(why) => {
            node.lose_primary(format!("superseded by {}: {why}", node.peer_cfg.name));
            return Err(HandshakeError::Protocol(format!(
                "{why}; re-handshaking as secondary"
            )));
        }
        EpochCheck::PeerStale(why) => {
            return Err(HandshakeError::Protocol(format!(
                "{why}; retrying once it steps down"
            )));
        }
    }
    node.adopt_epoch(peer.epoch);

    let me_side = Side::of(&node.me.name, &mine);
    let peer_side = Side::of(&node.peer_cfg.name, &peer);
    let verdict = decide(&me_side, &peer_side, &node.cfg.split_brain);
    let explain = verdict.explain();
    tracing::info!("sync handshake with {}: {explain}", node.peer_cfg.name);
    let (conn, full) = match plan(&verdict, &me_side, &peer_side) {
        LinkPlan::InSync { proven_current } => {
            if proven_current {
                // Same data as an UpToDate peer: not outdated after all.
                let mut st = node.state();
                let _ = super::records::proven_current(&mut node.meta(), &mut st);
            }
            (Conn::Connected, false)
        }
        LinkPlan::Resync { direction, full } => (Conn::resyncing(direction), full),
        LinkPlan::Retry(why) => {
            return Err(HandshakeError::Protocol(format!("{why}; retrying")));
        }
        LinkPlan::SplitBrain => {
            node.state().split_brain_found(explain.clone());
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
        LinkPlan::Refuse(reason) => {
            node.state().handshake_refused(explain.clone());
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
    if node.state().conn() != Conn::Connecting {
        // `disconnect` while the states were in flight: the operator wants the link down.
        node.drop_link("peer disconnected by operator", "disconnected by operator")
            .await;
        return Err(HandshakeError::Protocol(
            "disconnected by the operator during the handshake".into(),
        ));
    }
    // Only a sync target that really has the link records that its copy is Inconsistent
    // (before it reads a single resync block): recorded earlier, a handshake abandoned after
    // it left an UpToDate node whose metadata says Inconsistent once it restarts (found by
    // the simulator, seed 1020).
    if conn == Conn::SyncTarget {
        let recorded = super::records::sync_target(&mut node.meta());
        if let Err(e) = recorded {
            node.drop_link(
                "peer could not record the resync",
                "recording the resync failed",
            )
            .await;
            return Err(HandshakeError::Protocol(e.to_string()));
        }
    }
    // Writes held by fencing go to this link now.
    node.set_fence(crate::node::failover::Fence::Clear);
    node.state()
        .handshake_done(conn, node.meta().out_of_sync_bytes());
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
        node.peer_in_sync(link.id);
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
