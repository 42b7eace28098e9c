//! Range locks: overlapping writes (and resync reads) on the primary run one at a time, so
//! both copies apply overlapping writes in the same order (invariant 3); writes that do not
//! overlap proceed in parallel.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    released: Notify,
}

pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Wait until no held range overlaps `[offset, offset+len)`, then hold it.
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let end = offset.saturating_add(len.max(1));
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a release in between is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap();
                if !held.iter().any(|&(o, e, _)| o < end && offset < e) {
                    held.push((offset, end, id));
                    return RangeGuard { locks: self, id };
                }
            }
            notified.await;
        }
    }

    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks
            .held
            .lock()
            .unwrap()
            .retain(|&(_, _, id)| id != self.id);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 4096).await;
        // Disjoint: immediate.
        let d = tokio::time::timeout(Duration::from_millis(100), locks.lock(4096, 4096)).await;
        assert!(d.is_ok());
        drop(d);
        // Overlapping: waits until released.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(100, 10).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(locks.held(), 0);
    }
}
