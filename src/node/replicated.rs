//! The store the primary serves NBD from: every write goes to the local disk and to the peer,
//! and is acknowledged only when both have it (protocol C). Without the peer the primary keeps
//! serving, records the blocks in the out-of-sync bitmap, and first starts a new data
//! generation (persisted before the first write acknowledged without the peer).

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use bytes::Bytes;
use serde_json::Value;

use super::failover::Hold;
use super::resync::resync_while_connected;
use super::runtime::Node;
use super::Role;
use crate::meta::Meta;
use crate::repl::link::Link;
use crate::repl::proto::Message;
use crate::repl::ranges::RangeLocks;
use crate::repl::requests::{peer_flush, replicate_control, replicate_write, Replicated};
use crate::store::{BlockStore, Extent, IoFuture, SharedStore};

/// What the replicated store needs from its node, and nothing more (so it can be tested
/// without one).
pub trait Host: Send + Sync + 'static {
    fn role(&self) -> Role;
    /// This node's own disk.
    fn local(&self) -> &SharedStore;
    fn locks(&self) -> &RangeLocks;
    fn meta(&self) -> MutexGuard<'_, Meta>;
    /// The live link to the peer, if any.
    fn link(&self) -> Option<Arc<Link>>;
    /// The peer did not answer a write over `failed`: what fencing allows.
    fn hold_for_fencing(&self, failed: Option<&Arc<Link>>) -> impl Future<Output = Hold> + Send;
    /// This node was primary when the peer was last lost (chooses the new generation).
    fn primary_when_peer_lost(&self) -> bool;
    fn event(&self, kind: &str, detail: Value);
    /// Blocks were marked out of sync; resync them if the link is up.
    fn marked_out_of_sync(&self);
}

impl Host for Arc<Node> {
    fn role(&self) -> Role {
        Node::role(self)
    }
    fn local(&self) -> &SharedStore {
        &self.store
    }
    fn locks(&self) -> &RangeLocks {
        &self.locks
    }
    fn meta(&self) -> MutexGuard<'_, Meta> {
        Node::meta(self)
    }
    fn link(&self) -> Option<Arc<Link>> {
        Node::link(self)
    }
    fn hold_for_fencing(&self, failed: Option<&Arc<Link>>) -> impl Future<Output = Hold> + Send {
        Node::hold_for_fencing(self, failed)
    }
    fn primary_when_peer_lost(&self) -> bool {
        Node::primary_when_peer_lost(self)
    }
    fn event(&self, kind: &str, detail: Value) {
        Node::event(self, kind, detail)
    }
    fn marked_out_of_sync(&self) {
        resync_while_connected(self)
    }
}

/// Writes larger than this that cannot pin their extents fail instead of waiting (a range
/// spanning more extents than the activity log holds can never be pinned).
const AL_WAIT_MAX: u64 = 64 * 1024 * 1024;

pub struct ReplicatedStore<H: Host = Arc<Node>> {
    node: H,
    /// Activity-log updates are failing: logged once when they start and once when they stop,
    /// not per write.
    al_failing: std::sync::atomic::AtomicBool,
    /// Writes waiting for a pinned activity-log slot, and the signal that one was released.
    al_waiters: std::sync::atomic::AtomicUsize,
    al_released: tokio::sync::Notify,
}

impl<H: Host> ReplicatedStore<H> {
    pub fn new(node: H) -> Self {
        Self {
            node,
            al_failing: std::sync::atomic::AtomicBool::new(false),
            al_waiters: std::sync::atomic::AtomicUsize::new(0),
            al_released: tokio::sync::Notify::new(),
        }
    }

    fn check_primary(&self) -> io::Result<()> {
        // ESHUTDOWN: "not primary (any more)"; `attach` replays such requests elsewhere.
        if self.node.role() != Role::Primary {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        Ok(())
    }

    /// Before data lands in `[offset, offset+len)`: its activity-log extents are on disk and
    /// pinned until the write is on both nodes or marked out of sync. When every slot is
    /// pinned by in-flight writes, wait for one to finish.
    async fn activate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut waiting = false;
        let r = loop {
            // Enabled before the attempt, so a release between the attempt and the wait wakes
            // it; counted as a waiter before that attempt, so the releaser knows to signal.
            let released = self.al_released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let attempt = self.node.meta().activate_pinned(offset, len);
            match attempt {
                Err(crate::meta::MetaError::Invalid { .. }) if len <= AL_WAIT_MAX => {
                    if waiting {
                        released.await;
                    } else {
                        waiting = true;
                        self.al_waiters.fetch_add(1, Ordering::SeqCst);
                    }
                }
                r => break r,
            }
        };
        if waiting {
            self.al_waiters.fetch_sub(1, Ordering::SeqCst);
        }
        let failing = &self.al_failing;
        match r {
            Ok(_) => {
                // A load, not a swap, on the write path while nothing fails.
                if failing.load(Ordering::Relaxed) && failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!("activity-log updates work again");
                }
                Ok(())
            }
            Err(e) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::error!("writes fail: cannot update the activity log: {e}");
                }
                Err(io::Error::other(e))
            }
        }
    }

    /// The peer does not have `[offset, offset+len)`: make sure a new generation is on disk
    /// (DRBD's lazy bump: only when the bitmap generation is not already set), then mark.
    /// Before the bump, the data disk is flushed: what both nodes acknowledged until now is
    /// then durable here, so a copy with a bitmap generation is never rolled back by a power
    /// loss in a range the peer holds (`Meta::open` trusts it; see `MetaFlags::rolled_back`).
    async fn degraded(&self, offset: u64, len: u64) -> io::Result<()> {
        let bitmap = self.node.meta().superblock().gens.bitmap;
        let skip = crate::mutation::active(crate::mutation::Mutation::SourceFlush);
        if super::rules::needs_split_generation(bitmap) && !skip {
            self.node.local().flush().await?;
        }
        let was_primary = self.node.primary_when_peer_lost();
        let started =
            super::records::written_without_peer(&mut self.node.meta(), was_primary, offset, len)
                .map_err(io::Error::other)?;
        if started {
            tracing::warn!("writing without the peer: started a new data generation");
            self.node.event(
                "generation",
                serde_json::json!({"reason": "first write without the peer"}),
            );
        }
        Ok(())
    }

    /// Run a write-like operation locally and on the peer, under the range lock. When the
    /// link is lost before the peer answered, the operation is held until fencing decides:
    /// resent on a new link, acknowledged without the peer, or failed.
    async fn both<F>(
        &self,
        offset: u64,
        len: u64,
        local: F,
        remote: impl Fn(u64) -> Remote,
    ) -> io::Result<()>
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        self.check_primary()?;
        let _guard = self.node.locks().lock(offset, len).await;
        self.activate(offset, len).await?;
        // Returns the peer's answer and the link it went to (the one a retry must not reuse).
        let send = |link: Option<Arc<Link>>| {
            let remote = &remote;
            async move {
                let Some(link) = link else {
                    return (Replicated::LinkLost, None);
                };
                let seq = link.next_seq();
                let (r, durable) = match remote(seq) {
                    Remote::Write(data, fua) => {
                        (replicate_write(&link, seq, offset, data, fua).await, fua)
                    }
                    Remote::Control(msg) => (replicate_control(&link, seq, msg).await, false),
                };
                // Kept until the peer flushes (a FUA write already is on its disk).
                if r == Replicated::Acked && !durable {
                    link.unflushed.acked(offset, len);
                }
                (r, Some(link))
            }
        };
        // The frame is queued for the peer first; the local write waits one scheduler round, so
        // the link writer sends this round's frames before the local copies are made and both
        // nodes write at the same time.
        let local = async {
            tokio::task::yield_now().await;
            local.await
        };
        let ((mut peer, mut via), local) = tokio::join!(send(self.node.link()), local);
        let held = loop {
            if peer != Replicated::LinkLost {
                break Ok(());
            }
            match self.node.hold_for_fencing(via.as_ref()).await {
                Hold::Retry(link) => (peer, via) = send(Some(link)).await,
                Hold::Degraded => break Ok(()),
                Hold::Fail(why) => break Err(why),
            }
        };
        // Without the peer's acknowledgement the write may be acknowledged only once the new
        // generation is on disk; if that fails, the client gets the error.
        let result = match &held {
            Err(why) => {
                tracing::debug!("write at {offset} not acknowledged: {why}");
                Err(io::Error::from_raw_os_error(libc::ESHUTDOWN))
            }
            Ok(()) if peer != Replicated::Acked => self.degraded(offset, len).await.and(local),
            Ok(()) => local,
        };
        // One metadata lock per write on the common path.
        let mut meta = self.node.meta();
        if result.is_err() {
            // The copies may now differ in this range; the bitmap makes a resync repair it.
            meta.mark_out_of_sync(offset, len);
        }
        meta.release(offset, len);
        drop(meta);
        // Only writes that found every slot pinned wait; the common path pays one load.
        if self.al_waiters.load(Ordering::SeqCst) > 0 {
            self.al_released.notify_waiters();
        }
        if result.is_err() || peer != Replicated::Acked {
            self.node.marked_out_of_sync();
        }
        result
    }
}

/// What goes to the peer for one write-like operation (built with its sequence number).
enum Remote {
    Write(Bytes, bool),
    Control(Message),
}

impl<H: Host> BlockStore for ReplicatedStore<H> {
    fn size(&self) -> u64 {
        self.node.local().size()
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        self.node.local().read(offset, len)
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            let local = self.node.local().write(offset, data.clone(), fua);
            self.both(offset, len, local, move |_| {
                Remote::Write(data.clone(), fua)
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let local = self.node.local().flush();
            // A peer flush that fails leaves the peer's unflushed extents recorded; they are
            // marked out of sync if the link is lost before a later flush succeeds.
            let remote = async {
                if let Some(link) = self.node.link() {
                    peer_flush(&link).await;
                }
            };
            let (local, _) = tokio::join!(local, remote);
            local
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let local = self.node.local().discard(offset, len);
            self.both(offset, len, local, |seq| {
                Remote::Control(Message::Trim { seq, offset, len })
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let local = self.node.local().write_zeroes(offset, len, may_trim);
            self.both(offset, len, local, |seq| {
                Remote::Control(Message::Zero {
                    seq,
                    offset,
                    len,
                    may_trim,
                })
            })
            .await
        })
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>> {
        self.node.local().extents(offset, len, max_extents)
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.node.local().cache(offset, len)
    }

    fn engine(&self) -> &'static str {
        self.node.local().engine()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{EXTENT_SIZE, MIN_AL_EXTENTS};
    use crate::store::{open_backing, BackingOptions, ThreadStore};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;

    /// A primary without a peer whose fencing answers "degraded" once per permit.
    struct Lonely {
        local: SharedStore,
        locks: RangeLocks,
        meta: Mutex<Meta>,
        fencing: Semaphore,
        marked: AtomicUsize,
    }

    impl Host for Arc<Lonely> {
        fn role(&self) -> Role {
            Role::Primary
        }
        fn local(&self) -> &SharedStore {
            &self.local
        }
        fn locks(&self) -> &RangeLocks {
            &self.locks
        }
        fn meta(&self) -> MutexGuard<'_, Meta> {
            self.meta.lock().unwrap()
        }
        fn link(&self) -> Option<Arc<Link>> {
            None
        }
        async fn hold_for_fencing(&self, _failed: Option<&Arc<Link>>) -> Hold {
            self.fencing.acquire().await.unwrap().forget();
            Hold::Degraded
        }
        fn primary_when_peer_lost(&self) -> bool {
            true
        }
        fn event(&self, _kind: &str, _detail: Value) {}
        fn marked_out_of_sync(&self) {
            self.marked.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A volume of `extents` activity-log extents, with the smallest activity log.
    fn lonely(dir: &std::path::Path, extents: u64) -> ReplicatedStore<Arc<Lonely>> {
        let size = extents * EXTENT_SIZE;
        let opts = BackingOptions {
            size: Some(size),
            ..BackingOptions::default()
        };
        let backing = open_backing(&dir.join("disk"), &opts).unwrap();
        let meta_path = dir.join("meta");
        Meta::create_with(&meta_path, "r0", "alpha", size, MIN_AL_EXTENTS, false).unwrap();
        let meta = Meta::open(&meta_path, "r0", "alpha", size).unwrap();
        ReplicatedStore::new(Arc::new(Lonely {
            local: Arc::new(ThreadStore::new(backing)),
            locks: RangeLocks::default(),
            meta: Mutex::new(meta),
            fencing: Semaphore::new(0),
            marked: AtomicUsize::new(0),
        }))
    }

    async fn until(what: impl Fn() -> bool) {
        while !what() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waits_for_a_pinned_activity_log_slot_and_goes_on_when_one_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let slots = u64::from(MIN_AL_EXTENTS);
        let store = Arc::new(lonely(dir.path(), slots + 1));
        let write = |extent: u64| {
            let store = store.clone();
            tokio::spawn(async move {
                let data = Bytes::from(vec![extent as u8; 4096]);
                store.write(extent * EXTENT_SIZE, data, false).await
            })
        };
        // Every slot pinned by a write the (absent) peer has not answered.
        let held: Vec<_> = (0..slots).map(write).collect();
        let pinned = || store.node.meta().activate_pinned(slots * EXTENT_SIZE, 4096);
        // Pinned, not merely holding their range locks (taken before the activation).
        until(|| store.node.meta().pinned_extents() == slots as usize).await;
        // One more extent: it must wait for a slot, not fail and not spin.
        let last = write(slots);
        until(|| store.al_waiters.load(Ordering::SeqCst) == 1).await;
        assert!(!last.is_finished());
        assert!(matches!(
            pinned(),
            Err(crate::meta::MetaError::Invalid { .. })
        ));
        // Fencing lets one held write go without the peer: its slot lets the waiting one in
        // (which then waits for fencing like the rest).
        store.node.fencing.add_permits(1);
        let woken = until(|| store.al_waiters.load(Ordering::SeqCst) == 0);
        tokio::time::timeout(std::time::Duration::from_secs(30), woken)
            .await
            .expect("the write waiting for a slot was never woken");
        store.node.fencing.add_permits(held.len());
        last.await.unwrap().unwrap();
        for h in held {
            h.await.unwrap().unwrap();
        }
        assert_eq!(store.al_waiters.load(Ordering::SeqCst), 0);
        assert_eq!(store.node.locks.held(), 0);
    }

    #[tokio::test]
    async fn a_write_without_the_peer_starts_a_generation_before_it_is_acknowledged_and_is_marked()
    {
        let dir = tempfile::tempdir().unwrap();
        let store = lonely(dir.path(), 2);
        assert_eq!(store.node.meta().superblock().gens.bitmap, 0);
        store.node.fencing.add_permits(1);
        let data = Bytes::from(vec![7u8; 8192]);
        store.write(EXTENT_SIZE, data, false).await.unwrap();
        let meta = store.node.meta();
        // The generation the peer has is kept as the bitmap generation, on disk.
        assert_ne!(meta.superblock().gens.bitmap, 0);
        assert_eq!(meta.out_of_sync_bytes(), 8192);
        drop(meta);
        assert_eq!(store.node.marked.load(Ordering::SeqCst), 1);
        drop(store);
        let reopened = Meta::open(&dir.path().join("meta"), "r0", "alpha", 2 * EXTENT_SIZE);
        assert_ne!(reopened.unwrap().superblock().gens.bitmap, 0);
    }
}
