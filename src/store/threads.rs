//! The portable engine: every request runs as a blocking syscall on tokio's blocking pool.
//! Used where io_uring is unavailable (old kernels, seccomp profiles).

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;

use super::file::{
    check_range, extents_sync, fadvise_willneed, pread_full, punch_hole, pwrite_all,
    read_only_error, start_read, write_cached, write_zeroes_sync, Backing, ReadStart,
};
use super::{BlockStore, Extent, IoFuture};

pub struct ThreadStore {
    backing: Arc<Backing>,
    /// preadv2(RWF_NOWAIT) works on this file (see read_cached).
    nowait_reads: AtomicBool,
}

impl ThreadStore {
    pub fn new(backing: Backing) -> ThreadStore {
        ThreadStore {
            backing: Arc::new(backing),
            nowait_reads: AtomicBool::new(true),
        }
    }

    /// Run `f` on the blocking pool. The closure owns everything it touches, so dropping the
    /// returned future never frees memory the syscall is using.
    fn run<T, F>(&self, f: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Backing) -> io::Result<T> + Send + 'static,
    {
        let backing = Arc::clone(&self.backing);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&backing))
                .await
                .map_err(|e| io::Error::other(format!("blocking I/O task failed: {e}")))?
        })
    }

    fn writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.backing.read_only {
            return Err(read_only_error());
        }
        check_range(self.backing.size, offset, len)
    }
}

impl BlockStore for ThreadStore {
    fn size(&self) -> u64 {
        self.backing.size
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let (mut buf, done) = match start_read(&self.backing, &self.nowait_reads, offset, len)?
            {
                ReadStart::Done(b) => return Ok(b),
                ReadStart::Partial { buf, done } => (buf, done),
            };
            buf = self
                .run(move |b| {
                    pread_full(b, &mut buf[done..], offset + done as u64)?;
                    Ok(buf)
                })
                .await?;
            Ok(buf.into_bytes())
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        if let Err(e) = self.writable(offset, data.len() as u64) {
            return Box::pin(async move { Err(e) });
        }
        if data.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        Box::pin(async move {
            let n = write_cached(&self.backing, offset, &data, fua)?;
            if n == data.len() {
                return Ok(());
            }
            self.run(move |b| pwrite_all(b, &data[n..], offset + n as u64, fua))
                .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.run(|b| b.file.sync_data())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        if let Err(e) = self.writable(offset, len) {
            return Box::pin(async move { Err(e) });
        }
        if len == 0 {
            return Box::pin(async { Ok(()) });
        }
        self.run(move |b| punch_hole(&b.file, offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()> {
        if let Err(e) = self.writable(offset, len) {
            return Box::pin(async move { Err(e) });
        }
        if len == 0 {
            return Box::pin(async { Ok(()) });
        }
        self.run(move |b| write_zeroes_sync(b, offset, len, may_trim))
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>> {
        self.run(move |b| {
            extents_sync(&b.file, b.is_block_device, offset, len, b.size, max_extents)
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run(move |b| fadvise_willneed(&b.file, offset, len))
    }

    fn engine(&self) -> &'static str {
        "threads"
    }
}
