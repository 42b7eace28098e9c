//! Requests to the peer over a link, and what their answers mean for the request's data.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::link::{Link, LinkLost, Reply};
use super::proto::{Kind, Message};

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
pub async fn peer_flush_loop(link: Arc<Link>, interval: Duration) {
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
