//! One behavioural suite, run against every engine (and through the fault wrapper, and with
//! O_DIRECT). Uring variants are skipped, loudly, where the kernel refuses io_uring.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// Records the largest single allocation, to prove huge requests never allocate
/// proportional memory. Keep every test's own buffers at or below 16 MiB.
struct PeakAlloc;
static PEAK: AtomicUsize = AtomicUsize::new(0);
const PEAK_LIMIT: usize = 48 << 20;

thread_local! {
    static UNTRACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` without recording its allocations (for other modules' tests that legitimately
/// allocate more than the limit on their own thread, e.g. a 4 TiB device's bitmap).
pub(crate) fn untracked<T>(f: impl FnOnce() -> T) -> T {
    UNTRACKED.with(|u| u.set(true));
    let r = f();
    UNTRACKED.with(|u| u.set(false));
    r
}

fn record(size: usize) {
    if !UNTRACKED.try_with(|u| u.get()).unwrap_or(false) {
        PEAK.fetch_max(size, Relaxed);
    }
}

fn assert_peak_bounded() {
    let peak = PEAK.load(Relaxed);
    assert!(peak < PEAK_LIMIT, "largest allocation was {peak} bytes");
}

// SAFETY: forwards to System unchanged.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        record(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        record(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        record(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

const K: u64 = 1024;
const M: u64 = 1024 * K;
const G: u64 = 1024 * M;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    Uring,
    Threads,
    FaultUring,
    FaultThreads,
    UringDirect,
    ThreadsDirect,
}

impl Engine {
    fn uses_uring(self) -> bool {
        matches!(
            self,
            Engine::Uring | Engine::FaultUring | Engine::UringDirect
        )
    }

    fn direct(self) -> bool {
        matches!(self, Engine::UringDirect | Engine::ThreadsDirect)
    }

    fn available(self) -> bool {
        if self.uses_uring() {
            // A machine without io_uring fails these tests rather than skipping them: the
            // engine users get by default would otherwise go untested.
            if let Err(why) = UringStore::probe() {
                panic!(
                    "io_uring is unavailable here ({why}); the io_uring engine cannot be tested"
                );
            }
        }
        true
    }

    fn open_with(self, path: &Path, size: Option<u64>, read_only: bool) -> SharedStore {
        let b = open_backing(
            path,
            &BackingOptions {
                size,
                read_only,
                direct: self.direct(),
            },
        )
        .unwrap();
        let inner: SharedStore = if self.uses_uring() {
            Arc::new(UringStore::new(b).unwrap())
        } else {
            Arc::new(ThreadStore::new(b))
        };
        assert_eq!(
            inner.engine(),
            if self.uses_uring() {
                "io_uring"
            } else {
                "threads"
            }
        );
        match self {
            Engine::FaultUring | Engine::FaultThreads => {
                Arc::new(FaultStore::new(inner, Vec::new()))
            }
            _ => inner,
        }
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: SharedStore,
}

fn env(e: Engine, size: u64) -> Option<Env> {
    env_in(e, size, std::env::temp_dir())
}

fn env_in(e: Engine, size: u64, parent: impl AsRef<Path>) -> Option<Env> {
    if !e.available() {
        return None;
    }
    let dir = tempfile::tempdir_in(parent).unwrap();
    let path = dir.path().join("disk.img");
    let store = e.open_with(&path, Some(size), false);
    assert_eq!(store.size(), size);
    Some(Env {
        _dir: dir,
        path,
        store,
    })
}

/// xorshift64*: deterministic test data without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn ext(length: u64, hole: bool) -> Extent {
    Extent { length, hole }
}

async fn fill(s: &SharedStore, offset: u64, len: u64, byte: u8) {
    s.write(offset, Bytes::from(vec![byte; len as usize]), false)
        .await
        .unwrap();
}

async fn assert_bytes(s: &SharedStore, offset: u64, len: usize, byte: u8) {
    let got = s.read(offset, len).await.unwrap();
    assert_eq!(got.len(), len);
    if let Some(i) = got.iter().position(|&b| b != byte) {
        panic!(
            "byte {} is {:#x}, want {byte:#x}",
            offset + i as u64,
            got[i]
        );
    }
}

pub(crate) async fn roundtrip(e: Engine) {
    let Some(env) = env(e, 8 * M) else { return };
    let s = &env.store;
    let size = s.size();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_0001);
    let lens = [
        1u64,
        7,
        511,
        512,
        4095,
        4096,
        4097,
        8192,
        65_539,
        131_072,
        M,
        3 * M,
    ];
    for i in 0..300 {
        let len = lens[rng.below(lens.len() as u64) as usize];
        let mut offset = rng.below(size - len + 1);
        if i % 3 == 0 {
            offset -= offset % 4096; // aligned requests exercise the O_DIRECT path
        }
        let data = rng.bytes(len as usize);
        s.write(offset, Bytes::from(data.clone()), i % 7 == 0)
            .await
            .unwrap();
        model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        let rlen = lens[rng.below(lens.len() as u64) as usize];
        let mut roff = rng.below(size - rlen + 1);
        if i % 2 == 0 {
            roff -= roff % 4096;
        }
        let got = s.read(roff, rlen as usize).await.unwrap();
        assert_eq!(
            &got[..],
            &model[roff as usize..(roff + rlen) as usize],
            "read {roff}+{rlen} after write {offset}+{len}"
        );
    }
    // The exact end of the device, and zero-length requests.
    s.write(size - 3, Bytes::from_static(b"end"), false)
        .await
        .unwrap();
    model[size as usize - 3..].copy_from_slice(b"end");
    assert_eq!(&s.read(size - 3, 3).await.unwrap()[..], b"end");
    assert!(s.read(size, 0).await.unwrap().is_empty());
    s.write(17, Bytes::new(), false).await.unwrap();

    let all = s.read(0, size as usize).await.unwrap();
    assert!(all[..] == model[..], "full read differs from model");
    s.flush().await.unwrap();
    assert!(
        std::fs::read(&env.path).unwrap() == model,
        "file differs from model"
    );

    // Out of range is EINVAL and does not touch the file.
    let einval = Some(libc::EINVAL);
    assert_eq!(
        s.read(size - 1, 2).await.unwrap_err().raw_os_error(),
        einval
    );
    let e = s
        .write(size, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert_eq!(e.raw_os_error(), einval);
    assert_eq!(std::fs::metadata(&env.path).unwrap().len(), size);
}

pub(crate) async fn fua_and_flush(e: Engine) {
    let Some(env) = env(e, 4 * M) else { return };
    let s = &env.store;
    let data = Rng(2).bytes(12_288);
    s.write(4096, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    s.write(100_001, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    assert_eq!(&s.read(4096, data.len()).await.unwrap()[..], &data[..]);
    s.flush().await.unwrap();
    s.flush().await.unwrap();
    let file = std::fs::read(&env.path).unwrap();
    assert_eq!(&file[4096..4096 + data.len()], &data[..]);
    assert_eq!(&file[100_001..100_001 + data.len()], &data[..]);
}

pub(crate) async fn discard(e: Engine) {
    let Some(env) = env(e, 4 * M) else { return };
    let s = &env.store;
    fill(s, 0, 4 * M, 0xab).await;
    s.flush().await.unwrap();
    s.discard(M, M).await.unwrap();
    assert_bytes(s, M, M as usize, 0).await;
    assert_bytes(s, 0, M as usize, 0xab).await;
    assert_bytes(s, 2 * M, 2 * M as usize, 0xab).await;
    assert_eq!(
        s.extents(0, 4 * M, 16).await.unwrap(),
        vec![ext(M, false), ext(M, true), ext(2 * M, false)]
    );
    // Unaligned: the range reads as zero, its neighbours are untouched.
    s.discard(3 * M + 100, 5000).await.unwrap();
    assert_bytes(s, 3 * M + 100, 5000, 0).await;
    assert_bytes(s, 3 * M, 100, 0xab).await;
    assert_bytes(s, 3 * M + 5100, 4096, 0xab).await;
    assert!(allocated(&env.path) < 4 * M);
}

pub(crate) async fn write_zeroes_trim(e: Engine) {
    let Some(env) = env(e, 4 * M) else { return };
    let s = &env.store;
    fill(s, 0, 4 * M, 0x5a).await;
    s.write_zeroes(M, M, true).await.unwrap();
    assert_bytes(s, M, M as usize, 0).await;
    assert_eq!(
        s.extents(0, 4 * M, 16).await.unwrap(),
        vec![ext(M, false), ext(M, true), ext(2 * M, false)]
    );
    s.write_zeroes(2 * M + 123, 10_000, true).await.unwrap();
    assert_bytes(s, 2 * M + 123, 10_000, 0).await;
    assert_bytes(s, 2 * M, 123, 0x5a).await;
    assert_bytes(s, 2 * M + 10_123, 4096, 0x5a).await;
}

pub(crate) async fn write_zeroes_no_hole(e: Engine) {
    let Some(env) = env(e, 4 * M) else { return };
    let s = &env.store;
    fill(s, 0, 2 * M, 0x77).await;
    s.flush().await.unwrap();
    s.write_zeroes(M, M, false).await.unwrap();
    s.write_zeroes(3 * M, M, false).await.unwrap(); // was a hole
    s.write_zeroes(100, 333, false).await.unwrap();
    assert_bytes(s, M, M as usize, 0).await;
    assert_bytes(s, 3 * M, M as usize, 0).await;
    assert_bytes(s, 100, 333, 0).await;
    assert_bytes(s, 0, 100, 0x77).await;
    assert_bytes(s, 433, 4096, 0x77).await;
    // NO_HOLE: everything written or zeroed stays allocated. (ext4 reports zero-range
    // "unwritten" extents as holes to SEEK_DATA, so allocation is checked via st_blocks.)
    assert!(
        allocated(&env.path) >= 3 * M,
        "allocated {} bytes",
        allocated(&env.path)
    );
    let ex = s.extents(0, 4 * M, 16).await.unwrap();
    assert_eq!(ex.iter().map(|e| e.length).sum::<u64>(), 4 * M);
    assert!(!ex[0].hole);
}

/// tmpfs has PUNCH_HOLE but no ZERO_RANGE: NO_HOLE write-zeroes must fall back to writing.
pub(crate) async fn write_zeroes_fallback_tmpfs(e: Engine) {
    assert!(
        Path::new("/dev/shm").is_dir(),
        "this test needs a tmpfs at /dev/shm"
    );
    let Some(env) = env_in(e, 72 * M, "/dev/shm") else {
        return;
    };
    let s = &env.store;
    for off in (0..72 * M).step_by(8 * M as usize) {
        fill(s, off, 8 * M, 0x31).await;
    }
    s.discard(0, M).await.unwrap();
    assert!(allocated(&env.path) <= 71 * M + 64 * K);
    // Larger than PEAK_LIMIT: must be written from the shared zero buffer.
    s.write_zeroes(0, 64 * M + 5, false).await.unwrap();
    assert!(allocated(&env.path) >= 72 * M, "fallback must allocate");
    for off in (0..64 * M).step_by(4 * M as usize) {
        assert_bytes(s, off, 4 * M as usize, 0).await;
    }
    assert_bytes(s, 64 * M, 5, 0).await;
    assert_bytes(s, 64 * M + 5, 4096, 0x31).await;
    s.write_zeroes(70 * M + 1, 77, true).await.unwrap();
    assert_bytes(s, 70 * M + 1, 77, 0).await;
    assert_bytes(s, 70 * M, 1, 0x31).await;
    assert_bytes(s, 70 * M + 78, 1, 0x31).await;
    assert_peak_bounded();
}

pub(crate) async fn extents_sparse(e: Engine) {
    let Some(env) = env(e, 16 * M) else { return };
    let s = &env.store;
    fill(s, M, 8 * K, 1).await;
    fill(s, 5 * M, M, 2).await;
    fill(s, 15 * M - 4 * K, 4 * K, 3).await;
    let full = s.extents(0, 16 * M, 100).await.unwrap();
    assert_eq!(
        full,
        vec![
            ext(M, true),
            ext(8 * K, false),
            ext(4 * M - 8 * K, true),
            ext(M, false),
            ext(9 * M - 4 * K, true),
            ext(4 * K, false),
            ext(M, true),
        ]
    );
    // Clipped to the request at both ends.
    assert_eq!(
        s.extents(M + 4 * K, 8 * K, 100).await.unwrap(),
        vec![ext(4 * K, false), ext(4 * K, true)]
    );
    assert_eq!(
        s.extents(5 * M + 100, 10, 100).await.unwrap(),
        vec![ext(10, false)]
    );
    assert_eq!(
        s.extents(100, 1000, 100).await.unwrap(),
        vec![ext(1000, true)]
    );
    // At most max_extents, a prefix of the full map.
    for max in 1..=7 {
        let got = s.extents(0, 16 * M, max).await.unwrap();
        assert_eq!(&got[..], &full[..max]);
    }
}

pub(crate) async fn big_sparse(e: Engine) {
    let Some(env) = env(e, 8 * G) else { return };
    let s = &env.store;
    fill(s, G, 4 * K, 9).await;
    fill(s, 5 * G, 4 * K, 9).await;
    fill(s, 8 * G - 4 * K, 4 * K, 9).await;
    s.discard(0, 4 * G).await.unwrap();
    s.write_zeroes(4 * G, 4 * G, true).await.unwrap();
    assert_bytes(s, G, 4096, 0).await;
    assert_bytes(s, 5 * G, 4096, 0).await;
    assert_bytes(s, 8 * G - 4 * K, 4096, 0).await;
    assert_eq!(
        s.extents(0, 8 * G, 16).await.unwrap(),
        vec![ext(8 * G, true)]
    );
    assert!(allocated(&env.path) < M);
    assert_peak_bounded();
}

pub(crate) async fn concurrent(e: Engine) {
    let Some(env) = env(e, 64 * M) else { return };
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let s = Arc::clone(&env.store);
        tasks.push(tokio::spawn(async move {
            let base = t * M;
            let mut model = vec![0u8; M as usize];
            let mut rng = Rng(t + 1);
            for i in 0..24 {
                let len = 1 + rng.below(16 * K);
                let mut off = rng.below(M - len + 1);
                if i % 2 == 0 {
                    off -= off % 4096;
                }
                let data = rng.bytes(len as usize);
                s.write(base + off, Bytes::from(data.clone()), false)
                    .await
                    .unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            for _ in 0..24 {
                let len = 1 + rng.below(32 * K);
                let off = rng.below(M - len + 1);
                let got = s.read(base + off, len as usize).await.unwrap();
                assert_eq!(&got[..], &model[off as usize..(off + len) as usize]);
            }
            let got = s.read(base, M as usize).await.unwrap();
            assert!(got[..] == model[..], "task {t}: region differs");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Poll a future once (so the op is submitted) and drop it.
fn start_and_drop<F: Future>(f: F) {
    let mut f = Box::pin(f);
    let mut cx = Context::from_waker(Waker::noop());
    let _ = f.as_mut().poll(&mut cx);
}

pub(crate) async fn cancellation(e: Engine) {
    let Some(env) = env(e, 32 * M) else { return };
    let s = &env.store;
    // Region A [0,16M) takes abandoned ops; region B [16M,32M) is verified.
    let block = 64 * K;
    fill(s, 0, 16 * M, 0x11).await;
    for round in 0..4u64 {
        for i in 0..64u64 {
            let b = (round * 64 + i) % (16 * M / block);
            let pat = 0x20 + (b % 200) as u8;
            start_and_drop(s.write(b * block, Bytes::from(vec![pat; block as usize]), false));
            start_and_drop(s.read((i % 16) * M, M as usize));
        }
        // Some abandoned after a short while instead of immediately.
        for i in 0..16u64 {
            let _ =
                tokio::time::timeout(Duration::from_micros(50), s.read(i * M, M as usize)).await;
        }
    }
    // The store keeps working, with correct data, while those complete.
    let mut rng = Rng(77);
    let mut model = vec![0u8; 16 * M as usize];
    for _ in 0..64 {
        let len = 1 + rng.below(256 * K);
        let off = rng.below(16 * M - len + 1);
        let data = rng.bytes(len as usize);
        s.write(16 * M + off, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        let got = s.read(16 * M + off, len as usize).await.unwrap();
        assert_eq!(&got[..], &data[..]);
    }
    let got = s.read(16 * M, 16 * M as usize).await.unwrap();
    assert!(got[..] == model[..], "region B corrupted");

    // Abandon more ops and drop the store with them in flight.
    for i in 0..64u64 {
        start_and_drop(s.read(i % 16 * M, M as usize));
        start_and_drop(s.write(
            (i % 16) * M,
            Bytes::from(vec![
                0x20 + ((i % 16) * M / block % 200) as u8;
                block as usize
            ]),
            false,
        ));
    }
    let path = env.path.clone();
    let Env { _dir, store, .. } = env;
    drop(store);

    // Abandoned writes either happened or not: every block is old or its own pattern.
    let s = e.open_with(&path, None, false);
    let mut prev = Bytes::new();
    for _ in 0..100 {
        let now = s.read(0, 16 * M as usize).await.unwrap();
        if now == prev {
            break; // settled (thread-pool writes can outlive the dropped store)
        }
        prev = now;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (b, chunk) in prev.chunks(block as usize).enumerate() {
        let pat = 0x20 + (b % 200) as u8;
        assert!(
            chunk.iter().all(|&x| x == 0x11) || chunk.iter().all(|&x| x == pat),
            "block {b} is neither old nor its pattern"
        );
    }
    let got = s.read(16 * M, 16 * M as usize).await.unwrap();
    assert!(got[..] == model[..], "region B changed after reopen");
}

/// Pages of `[offset, offset+len)` present in the page cache.
fn cached_pages(path: &Path, offset: u64, len: u64) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let pages = (len / 4096) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: a fresh read-only shared mapping, only inspected with mincore, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len as usize, vec.as_mut_ptr()), 0);
        libc::munmap(p, len as usize);
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// With O_DIRECT, aligned requests bypass the page cache (even from an unaligned `Bytes`),
/// unaligned ones go through it; without, everything is cached. Data is right either way.
pub(crate) async fn page_cache_use(e: Engine) {
    let Some(env) = env(e, 4 * M) else { return };
    let s = &env.store;
    let data = Rng(9).bytes(M as usize + 1);
    let unaligned = Bytes::from(data).slice(1..); // address deliberately off by one
    s.write(M, unaligned.clone(), false).await.unwrap();
    s.write(2 * M, unaligned.clone(), true).await.unwrap();
    assert_eq!(s.read(M, M as usize).await.unwrap(), unaligned);
    assert_eq!(s.read(2 * M, M as usize).await.unwrap(), unaligned);
    let expect = if e.direct() { 0 } else { 512 };
    assert_eq!(cached_pages(&env.path, M, 2 * M), expect);

    // Unaligned write, then an aligned read of the page holding it.
    s.write(3 * M + 5, Bytes::from_static(b"hello"), false)
        .await
        .unwrap();
    assert_eq!(cached_pages(&env.path, 3 * M, 4096), 1);
    let page = s.read(3 * M, 4096).await.unwrap();
    assert_eq!(&page[5..10], b"hello");
    assert!(page[..5].iter().chain(&page[10..]).all(|&b| b == 0));
    // An aligned write over a cached page, then an unaligned read of it.
    s.write(3 * M, Bytes::from(vec![6u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(&s.read(3 * M + 3, 4).await.unwrap()[..], &[6u8; 4]);
}

/// A backing file shrunk behind our back reads as zero past its end, even when the read
/// buffers are recycled ones full of old bytes.
pub(crate) async fn read_past_eof_is_zero(e: Engine) {
    let Some(env) = env(e, 2 * M) else { return };
    let s = &env.store;
    fill(s, 0, 2 * M, 0xee).await;
    s.flush().await.unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&env.path)
        .unwrap()
        .set_len(100_000)
        .unwrap();
    for _ in 0..4 {
        let mut dirty: Vec<AlignedBuf> = (0..8)
            .map(|_| AlignedBuf::for_overwrite(M as usize))
            .collect();
        for d in &mut dirty {
            d.as_mut_slice().fill(0xdd);
        }
        drop(dirty);
        let got = s.read(0, M as usize).await.unwrap();
        assert!(got[..100_000].iter().all(|&b| b == 0xee));
        assert!(
            got[100_000..].iter().all(|&b| b == 0),
            "tail must read as zero"
        );
        let got = s.read(M, 8192).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
    }
}

/// Small reads take the page cache inline where they can; one that is only partly cached
/// continues on the engine, and uncached ones go there whole.
pub(crate) async fn partially_cached_read(e: Engine) {
    use std::os::fd::AsRawFd;
    let Some(env) = env(e, M) else { return };
    let s = &env.store;
    let data = Rng(5).bytes(M as usize);
    s.write(0, Bytes::from(data.clone()), false).await.unwrap();
    s.flush().await.unwrap();
    let f = std::fs::File::open(&env.path).unwrap();
    let fd = f.as_raw_fd();
    for round in 0..3 {
        // Evict everything, then cache just [0,8K) (no readahead on this descriptor).
        // SAFETY: plain syscalls on an open fd.
        unsafe {
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM);
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut [0u8; 8192], 0).unwrap();
        if round == 0 {
            let cached = cached_pages(&env.path, 0, 64 * K);
            assert!((2..16).contains(&cached), "{cached} of 16 pages cached");
        }
        for (off, len) in [(0u64, 65_536usize), (4097, 20_000), (300_000, 4096)] {
            let got = s.read(off, len).await.unwrap();
            assert!(
                got[..] == data[off as usize..off as usize + len],
                "read {off}+{len}"
            );
        }
    }
}

pub(crate) async fn read_only(e: Engine) {
    if !e.available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![0x42u8; 64 * K as usize]).unwrap();
    let s = e.open_with(&path, None, true);
    assert_eq!(s.size(), 64 * K);
    assert_bytes(&s, 0, 64 * K as usize, 0x42).await;
    let erofs = Some(libc::EROFS);
    let w = s.write(0, Bytes::from_static(b"x"), false).await;
    assert_eq!(w.unwrap_err().raw_os_error(), erofs);
    assert_eq!(s.discard(0, 4096).await.unwrap_err().raw_os_error(), erofs);
    let z = s.write_zeroes(0, 4096, true).await;
    assert_eq!(z.unwrap_err().raw_os_error(), erofs);
    s.flush().await.unwrap();
    s.cache(0, 64 * K).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 64 * K as usize]);
}

/// A write reaches the file only once its future is polled (see the trait's contract).
pub(crate) async fn writes_wait_for_the_first_poll(e: Engine) {
    let Some(env) = env(e, M) else { return };
    let s = &env.store;
    for (offset, len) in [(0u64, 4096usize), (64 * K, 256 * K as usize)] {
        let pending = s.write(offset, Bytes::from(vec![0x5a; len]), false);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let on_disk = std::fs::read(&env.path).unwrap();
        assert!(
            on_disk[offset as usize..offset as usize + len]
                .iter()
                .all(|&b| b == 0),
            "{len}-byte write at {offset} reached the file before it was polled"
        );
        pending.await.unwrap();
        assert_bytes(s, offset, len, 0x5a).await;
    }
}

macro_rules! suite {
    (engines: [$($eng:ident => $val:expr),* $(,)?], tests: $tests:tt) => {
        $( suite!(@one $eng, $val, $tests); )*
    };
    (@one $eng:ident, $val:expr, [$($t:ident),* $(,)?]) => {
        mod $eng {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $t() {
                    super::$t($val).await
                }
            )*
        }
    };
}

suite! {
    engines: [
        uring => super::Engine::Uring,
        threads => super::Engine::Threads,
        fault_uring => super::Engine::FaultUring,
        fault_threads => super::Engine::FaultThreads,
        uring_direct => super::Engine::UringDirect,
        threads_direct => super::Engine::ThreadsDirect,
    ],
    tests: [
        roundtrip,
        fua_and_flush,
        discard,
        write_zeroes_trim,
        write_zeroes_no_hole,
        write_zeroes_fallback_tmpfs,
        extents_sparse,
        big_sparse,
        concurrent,
        cancellation,
        read_only,
        page_cache_use,
        read_past_eof_is_zero,
        partially_cached_read,
        writes_wait_for_the_first_poll,
    ]
}

#[test]
fn probe_reports_availability() {
    match UringStore::probe() {
        Ok(()) => {}
        Err(why) => {
            assert!(!why.is_empty());
            eprintln!("io_uring unavailable here: {why}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_store_auto_picks_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let opts = BackingOptions {
        size: Some(M),
        ..Default::default()
    };
    let b = open_backing(&dir.path().join("a"), &opts).unwrap();
    let s = open_store(b, EngineChoice::Auto).unwrap();
    let want = if UringStore::probe().is_ok() {
        "io_uring"
    } else {
        "threads"
    };
    assert_eq!(s.engine(), want);
    s.write(0, Bytes::from_static(b"hello"), false)
        .await
        .unwrap();
    assert_eq!(&s.read(0, 5).await.unwrap()[..], b"hello");
    let b = open_backing(&dir.path().join("a"), &opts).unwrap();
    let t = open_store(b, EngineChoice::Threads).unwrap();
    assert_eq!(t.engine(), "threads");
    assert_eq!(&t.read(0, 5).await.unwrap()[..], b"hello");
}
