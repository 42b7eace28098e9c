//! Block storage behind one trait, so the io_uring engine, the thread-pool fallback and the
//! fault-injecting wrapper swap freely under the NBD server (and, later, replication).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

mod buf;
mod fault;
mod file;
mod threads;
mod uring;
mod volatile;

pub use buf::AlignedBuf;
pub use fault::{parse_rules as parse_fault_rules, FaultAction, FaultRule, FaultStore, OpKind};
pub use file::{open_backing, Backing, BackingOptions};
pub use threads::ThreadStore;
pub use uring::UringStore;
pub use volatile::VolatileCache;

/// A boxed future returned by [`BlockStore`] methods (the trait is used as `dyn`).
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// One run of the device with the same allocation state, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated in the backing file (reads as zero).
    pub hole: bool,
}

/// Block IO on a device of fixed size. Offsets and lengths are already validated against
/// `size()` by the caller; implementations may still return `EINVAL` for out-of-range IO.
/// Nothing reaches the disk before a returned future is first polled: the replicated store
/// creates the local write before it holds the range lock and the activity-log extent.
pub trait BlockStore: Send + Sync + 'static {
    /// Size in bytes of the exported device.
    fn size(&self) -> u64;

    /// Read `len` bytes at `offset`. Returns exactly `len` bytes (holes read as zero).
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes>;

    /// Write `data` at `offset`. With `fua`, the data is durable when this returns.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()>;

    /// Make every write that completed before this call durable (fdatasync).
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Deallocate a range (punch a hole). Advisory: succeeds without effect where the
    /// backing store cannot deallocate. Afterwards the range reads as zero on files.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Make a range read as zero. With `may_trim` the range may become a hole; without it the
    /// range stays allocated (NBD's NO_HOLE). Falls back to writing zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()>;

    /// Allocation map of `[offset, offset+len)`: at most `max_extents` extents, in order,
    /// non-empty, covering at least the first byte; the last one is clipped to `offset+len`.
    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>>;

    /// Advisory prefetch into the page cache (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Human-readable engine name for logs and status ("io_uring", "threads", ...).
    fn engine(&self) -> &'static str;
}

pub type SharedStore = Arc<dyn BlockStore>;

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring where the kernel allows it, else the thread pool (logged once, with why).
    #[default]
    Auto,
    Uring,
    Threads,
}

/// Open the backing store with the chosen engine.
pub fn open_store(backing: Backing, choice: EngineChoice) -> io::Result<SharedStore> {
    match choice {
        EngineChoice::Threads => Ok(Arc::new(ThreadStore::new(backing))),
        EngineChoice::Uring => Ok(Arc::new(UringStore::new(backing)?)),
        EngineChoice::Auto => match UringStore::probe() {
            Ok(()) => Ok(Arc::new(UringStore::new(backing)?)),
            Err(why) => {
                tracing::warn!("io_uring unavailable ({why}); using the thread-pool engine");
                Ok(Arc::new(ThreadStore::new(backing)))
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests;
