//! A disk with a volatile write cache, for crash tests: writes are held in memory until a
//! flush or a FUA write, so a `kill -9` of the process loses every write since the last
//! flush, as an operating-system crash loses dirty pages or a power cut a drive's cache.
//! Reads see the cached writes. Only for tests (`tandem up --volatile-cache`).

use std::io;
use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use super::{BlockStore, Extent, IoFuture, SharedStore};

pub struct VolatileCache {
    inner: SharedStore,
    /// Writes not yet on the inner store, oldest first.
    cached: Mutex<Vec<(u64, Bytes)>>,
    /// Serialises write-back, so older cached writes never land after newer ones.
    writeback: tokio::sync::Mutex<()>,
}

impl VolatileCache {
    pub fn new(inner: SharedStore) -> VolatileCache {
        VolatileCache {
            inner,
            cached: Mutex::new(Vec::new()),
            writeback: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Bytes)>> {
        self.cached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write the cached writes to the inner store in order, then run `then` while no newer
    /// write-back can overtake it. Entries leave the cache only once written, so reads keep
    /// seeing them meanwhile.
    async fn write_back<T>(&self, then: IoFuture<'_, T>) -> io::Result<T> {
        let _order = self.writeback.lock().await;
        let batch: Vec<(u64, Bytes)> = self.cached().clone();
        for (offset, data) in &batch {
            self.inner.write(*offset, data.clone(), false).await?;
        }
        self.cached().drain(..batch.len());
        then.await
    }
}

impl BlockStore for VolatileCache {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            // Taken before the inner read: an entry written back meanwhile is still applied.
            let cached = self.cached().clone();
            let base = self.inner.read(offset, len).await?;
            let end = offset + base.len() as u64;
            let mut out: Option<BytesMut> = None;
            for (o, d) in cached {
                let (s, e) = (o.max(offset), (o + d.len() as u64).min(end));
                if s < e {
                    let buf = out.get_or_insert_with(|| BytesMut::from(&base[..]));
                    buf[(s - offset) as usize..(e - offset) as usize]
                        .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
                }
            }
            Ok(out.map_or(base, BytesMut::freeze))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        if fua {
            return Box::pin(self.write_back(self.inner.write(offset, data, true)));
        }
        Box::pin(async move {
            self.cached().push((offset, data));
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.write_back(self.inner.flush()))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.write_back(self.inner.discard(offset, len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()> {
        Box::pin(self.write_back(self.inner.write_zeroes(offset, len, may_trim)))
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(self.write_back(self.inner.extents(offset, len, max_extents)))
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.cache(offset, len)
    }

    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{open_backing, BackingOptions, ThreadStore};
    use std::sync::Arc;

    fn stores(dir: &tempfile::TempDir) -> (VolatileCache, SharedStore) {
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let open = || -> SharedStore {
            let b = open_backing(&path, &BackingOptions::default()).unwrap();
            Arc::new(ThreadStore::new(b))
        };
        (VolatileCache::new(open()), open())
    }

    #[tokio::test]
    async fn unflushed_writes_are_visible_but_not_on_disk_until_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (v, disk) = stores(&dir);
        v.write(4096, Bytes::from(vec![1u8; 8192]), false)
            .await
            .unwrap();
        v.write(8192, Bytes::from(vec![2u8; 100]), false)
            .await
            .unwrap();
        let r = v.read(0, 16384).await.unwrap();
        assert_eq!(&r[..4096], &[0u8; 4096][..]);
        assert_eq!(&r[4096..8192], &[1u8; 4096][..]);
        assert_eq!(&r[8192..8292], &[2u8; 100][..], "the newer write wins");
        assert_eq!(&r[8292..12288], &[1u8; 3996][..]);
        assert_eq!(
            &disk.read(0, 16384).await.unwrap()[..],
            &[0u8; 16384][..],
            "nothing reaches the disk before a flush"
        );
        v.flush().await.unwrap();
        assert_eq!(disk.read(0, 16384).await.unwrap(), r);
        // A FUA write takes the cached writes before it down with it.
        v.write(0, Bytes::from(vec![3u8; 10]), false).await.unwrap();
        v.write(20000, Bytes::from(vec![4u8; 10]), true)
            .await
            .unwrap();
        let d = disk.read(0, 32768).await.unwrap();
        assert_eq!(&d[..10], &[3u8; 10][..]);
        assert_eq!(&d[20000..20010], &[4u8; 10][..]);
    }
}
