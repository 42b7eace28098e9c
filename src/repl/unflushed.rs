//! What the peer acknowledged but may not have on stable storage yet. The peer acknowledges a
//! write once it is in its page cache, so a crash of its operating system loses it while this
//! node counts the copies as equal. Each acknowledged write is kept, per activity-log extent,
//! and each resync chunk as its exact range, until a flush sent after the acknowledgement
//! completes on the peer; if the link is lost first, they are marked out of sync and the resync
//! after reconnecting rewrites them (DRBD's transfer log and barrier acknowledgements).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::meta::{EXTENT_SHIFT, EXTENT_SIZE};

#[derive(Default)]
pub struct Unflushed {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Bumped by every flush sent to the peer.
    epoch: u64,
    /// Extent index -> the epoch of its latest acknowledgement.
    extents: HashMap<u64, u64>,
    /// Resync chunks as `(epoch, offset, len)`: exact, so an interrupted resync redoes only
    /// what the target may have lost, not whole extents.
    resynced: Vec<(u64, u64, u64)>,
}

impl Unflushed {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The peer acknowledged data in `[offset, offset+len)`.
    pub fn acked(&self, offset: u64, len: u64) {
        if len == 0 || crate::mutation::active(crate::mutation::Mutation::UnflushedSet) {
            return;
        }
        let mut i = self.inner();
        let epoch = i.epoch;
        for e in offset >> EXTENT_SHIFT..=(offset + len - 1) >> EXTENT_SHIFT {
            i.extents.insert(e, epoch);
        }
    }

    /// The peer acknowledged the resync chunk `[offset, offset+len)`.
    pub fn resynced(&self, offset: u64, len: u64) {
        let mut i = self.inner();
        let epoch = i.epoch;
        i.resynced.push((epoch, offset, len));
    }

    /// Call just before a flush is queued for the peer; pass the result to `flushed` once the
    /// peer completed it. Everything acknowledged before this call is covered by that flush.
    pub fn flush_sent(&self) -> u64 {
        let mut i = self.inner();
        i.epoch += 1;
        i.epoch - 1
    }

    /// The peer completed the flush that `flush_sent` returned `epoch` for.
    pub fn flushed(&self, epoch: u64) {
        let mut i = self.inner();
        i.extents.retain(|_, e| *e > epoch);
        i.resynced.retain(|r| r.0 > epoch);
    }

    pub fn is_empty(&self) -> bool {
        let i = self.inner();
        i.extents.is_empty() && i.resynced.is_empty()
    }

    /// Everything still unflushed as sorted `(offset, len)` ranges; the set is emptied.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut guard = self.inner();
        let i = &mut *guard;
        let mut v: Vec<(u64, u64)> = i
            .extents
            .drain()
            .map(|(e, _)| (e << EXTENT_SHIFT, EXTENT_SIZE))
            .chain(i.resynced.drain(..).map(|(_, o, l)| (o, l)))
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u64 = EXTENT_SIZE;

    #[test]
    fn a_flush_covers_what_was_acknowledged_before_it_was_sent() {
        let u = Unflushed::default();
        u.acked(10, 4096);
        u.acked(E - 10, 20); // spans extents 0 and 1
        let f = u.flush_sent();
        u.acked(5 * E, 4096); // after the flush was sent: not covered
        u.flushed(f);
        assert_eq!(u.take(), vec![(5 * E, E)]);
        assert!(u.is_empty());
    }

    #[test]
    fn a_rewrite_after_the_flush_was_sent_keeps_the_extent() {
        let u = Unflushed::default();
        u.acked(0, 4096);
        let f = u.flush_sent();
        u.acked(8192, 4096); // same extent, newer epoch
        u.flushed(f);
        assert_eq!(u.take(), vec![(0, E)]);
    }

    #[test]
    fn resync_chunks_are_kept_exactly() {
        let u = Unflushed::default();
        u.resynced(256 * 1024, 256 * 1024);
        let f = u.flush_sent();
        u.resynced(E + 4096, 8192);
        u.acked(2 * E, 1);
        assert!(!u.is_empty());
        u.flushed(f);
        assert_eq!(u.take(), vec![(E + 4096, 8192), (2 * E, E)]);
    }

    #[test]
    fn a_flush_that_never_completes_clears_nothing() {
        let u = Unflushed::default();
        u.acked(3 * E, 1);
        let _lost = u.flush_sent();
        let f2 = u.flush_sent();
        u.acked(E, 1);
        assert_eq!(u.take(), vec![(E, E), (3 * E, E)]);
        u.flushed(f2);
        assert!(u.is_empty());
    }
}
