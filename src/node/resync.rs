//! Resync, on both sides, and online verify: the source pushes every out-of-sync block in
//! windows of chunks under range locks; verify compares block digests with the peer's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use super::records;
use super::runtime::{Node, Progress};
use super::DiskState;
use crate::repl::link::{Link, LinkLost, Reply};
use crate::repl::proto::{Kind, Message};
use crate::repl::requests::{peer_flush, Replicated};

/// Resync and verify work in chunks of this size, this many in flight.
const SYNC_CHUNK: u64 = 256 * 1024;
const SYNC_WINDOW: usize = 8;

/// The resync from the peer is complete: this copy is now the source's. It is as current as
/// the source was: a copy of an Outdated source is Outdated too (it may lack what the source
/// lacks), so a resync never turns stale data into data that promotes automatically.
///
/// If that cannot be recorded the resync is not finished: the error ends the link, and the
/// next handshake resyncs again from what the metadata on disk says.
pub(super) fn resync_finished_as_target(
    node: &Node,
    gens: crate::meta::Generations,
    source: DiskState,
) -> Result<(), String> {
    // Recorded first; applied to the state only once it is.
    let result = {
        let mut st = node.state();
        records::resync_done_as_target(&mut node.meta(), &mut st, gens, source)
    };
    let disk = match result {
        Ok(disk) => disk,
        Err(e) => {
            let why = format!("recording the finished resync failed: {e}");
            tracing::error!("{why}");
            return Err(why);
        }
    };
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
        if !node.link().is_some_and(|l| Arc::ptr_eq(&l, link)) {
            return false;
        }
        let total = node.meta().out_of_sync_bytes();
        if !st.claim_online_resync(total) {
            return false;
        }
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
    // What this copy sends must outlive a power loss here: the target's copy, which may be
    // the only other durable one, is overwritten with it (found by the simulator).
    node.flush_as_source_or_log("a resync round").await;
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
    let gens = match records::resync_done_as_source(&mut node.meta()) {
        Ok(gens) => gens,
        Err(e) => {
            tracing::error!("recording the finished resync failed: {e}");
            return Round::Retry;
        }
    };
    if link.send(&Message::ResyncDone { gens }).await.is_err() {
        return Round::Stopped;
    }
    let done = node.state().resync_done_as_source();
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
pub(super) async fn digests(node: &Node, offset: u64, len: u64) -> std::io::Result<Vec<u32>> {
    let data: Bytes = node.store.read(offset, len as usize).await?;
    Ok(data.chunks(4096).map(crc32fast::hash).collect())
}

/// Online verify from this node: compare digests of every block with the peer's, under the
/// range lock so in-flight writes do not show as differences. Differing blocks are marked
/// out of sync; a later reconnect resyncs them.
pub async fn verify(node: Arc<Node>) -> Result<Progress, String> {
    let link = node.link().ok_or("not connected to the peer")?;
    node.state().verify_started(node.size)?;
    let _ = link.send(&Message::Verifying { active: true }).await;
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
    let progress = node.state().verify_ended();
    let _ = link.send(&Message::Verifying { active: false }).await;
    let _ = node.meta().flush_bitmap();
    let p = progress.unwrap_or_else(|| Progress::new(node.size));
    node.event(
        "verify",
        json!({"state": "finished", "mismatched_bytes": p.mismatched_bytes, "error": result.as_ref().err()}),
    );
    result.map(|_| p)
}
