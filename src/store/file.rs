//! Opening the backing file or block device, and the synchronous helpers both engines share.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::buf::{is_aligned, AlignedBuf};
use super::Extent;

#[derive(Debug, Clone, Default)]
pub struct BackingOptions {
    /// Export size. Creates a missing regular file, extends a shorter one (sparse), or
    /// exports only a prefix of a longer one.
    pub size: Option<u64>,
    pub read_only: bool,
    /// Also open an `O_DIRECT` descriptor, used for 4096-aligned requests.
    pub direct: bool,
}

#[derive(Debug)]
pub struct Backing {
    pub path: PathBuf,
    pub file: File,
    /// Same file opened with `O_DIRECT` (only when asked for).
    pub direct: Option<File>,
    /// Exported size in bytes (may be less than the file's length).
    pub size: u64,
    pub is_block_device: bool,
    pub read_only: bool,
    /// Whether small writes may go straight into the page cache (see `write_cached`).
    pub inline_writes: InlineWrites,
}

fn context(path: &Path, what: &str, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {what}: {err}", path.display()))
}

fn invalid(path: &Path, msg: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {msg}", path.display()),
    )
}

/// Open `path` for export according to `opts` (see [`BackingOptions`]).
pub fn open_backing(path: &Path, opts: &BackingOptions) -> io::Result<Backing> {
    if opts.size == Some(0) {
        return Err(invalid(path, "--size must be greater than 0".into()));
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(context(path, "cannot stat", e)),
    };
    let create = match &meta {
        Some(m) if m.is_dir() => return Err(invalid(path, "is a directory".into())),
        Some(m) if !m.is_file() && !m.file_type().is_block_device() => {
            return Err(invalid(
                path,
                "is neither a regular file nor a block device".into(),
            ))
        }
        Some(_) => false,
        None if opts.read_only => {
            return Err(context(
                path,
                "cannot export read-only",
                io::ErrorKind::NotFound.into(),
            ))
        }
        None if opts.size.is_none() => {
            return Err(context(
                path,
                "does not exist (pass --size to create it)",
                io::ErrorKind::NotFound.into(),
            ))
        }
        None => true,
    };
    let is_block_device = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());

    let mut oo = OpenOptions::new();
    oo.read(true).write(!opts.read_only).create(create);
    let mut file = oo.open(path).map_err(|e| context(path, "cannot open", e))?;

    let size = if is_block_device {
        let dev = file
            .seek(SeekFrom::End(0))
            .map_err(|e| context(path, "cannot get device size", e))?;
        match opts.size {
            Some(s) if s > dev => {
                return Err(invalid(
                    path,
                    format!("--size {s} is larger than the device ({dev} bytes)"),
                ))
            }
            Some(s) => s,
            None => dev,
        }
    } else {
        let len = file
            .metadata()
            .map_err(|e| context(path, "cannot stat", e))?
            .len();
        match opts.size {
            Some(s) if s > len => {
                if opts.read_only {
                    return Err(invalid(
                        path,
                        format!("file is {len} bytes; cannot extend it to --size {s} read-only"),
                    ));
                }
                // set_len leaves the new tail sparse.
                file.set_len(s)
                    .map_err(|e| context(path, &format!("cannot extend to {s} bytes"), e))?;
                s
            }
            Some(s) => s,
            None => len,
        }
    };
    if size == 0 {
        return Err(invalid(
            path,
            "is empty (0 bytes); pass --size to set the export size".into(),
        ));
    }

    let direct = if opts.direct {
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_DIRECT);
        match oo.open(path) {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(context(
                    path,
                    "the file system does not support O_DIRECT (drop --direct)",
                    e,
                ))
            }
            Err(e) => return Err(context(path, "cannot open with O_DIRECT", e)),
        }
    } else {
        None
    };

    Ok(Backing {
        path: path.to_path_buf(),
        file,
        direct,
        size,
        is_block_device,
        read_only: opts.read_only,
        inline_writes: InlineWrites::new(INLINE_BACK_OFF),
    })
}

/// `EINVAL` unless `[offset, offset+len)` lies within a device of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

pub(crate) fn read_only_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// Errors meaning "this fallocate mode is not available here" rather than a real failure.
pub(crate) fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ENODEV)
    )
}

/// A direct write needs an aligned buffer; copying is cheaper than falling back to the page
/// cache when only the buffer address is off.
pub(crate) fn needs_aligned_copy(offset: u64, data: &[u8]) -> bool {
    !data.is_empty()
        && is_aligned(offset, data.len(), std::ptr::null())
        && !is_aligned(0, 0, data.as_ptr())
}

fn lseek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Allocation map of `[offset, offset+len)` clipped to `size`, via `SEEK_DATA`/`SEEK_HOLE`.
pub fn extents_sync(
    file: &File,
    is_block_device: bool,
    offset: u64,
    len: u64,
    size: u64,
    max: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return Ok(Vec::new());
    }
    if is_block_device {
        return Ok(vec![Extent {
            length: end - offset,
            hole: false,
        }]);
    }
    let max = max.max(1);
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        let (hole, next) = match lseek(file, pos, libc::SEEK_DATA) {
            Ok(data) if data > pos => (true, data),
            Ok(_) => (false, lseek(file, pos, libc::SEEK_HOLE)?),
            // No data at or after pos: hole to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (true, end),
            // No SEEK_DATA support: report everything as data.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                (false, end)
            }
            Err(e) => return Err(e),
        };
        let next = if next <= pos { end } else { next.min(end) };
        match out.last_mut() {
            Some(last) if last.hole == hole => last.length += next - pos,
            _ => out.push(Extent {
                length: next - pos,
                hole,
            }),
        }
        pos = next;
    }
    Ok(out)
}

pub(crate) const PUNCH_MODE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const ZERO_MODE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE;

pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an owned fd.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Deallocate a range; a no-op where the file system or device cannot.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(file, PUNCH_MODE, offset, len) {
        Err(e) if is_unsupported(&e) => Ok(()),
        r => r,
    }
}

/// Chunk size of the write-zeroes fallback.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

#[repr(C, align(4096))]
struct Zeroes([u8; ZERO_CHUNK]);

// Lives in .bss: costs no memory until read, and is aligned for O_DIRECT.
static ZEROES: Zeroes = Zeroes([0; ZERO_CHUNK]);

/// `len` (≤ ZERO_CHUNK) bytes of shared, aligned zeroes.
pub(crate) fn zeroes(len: usize) -> &'static [u8] {
    &ZEROES.0[..len]
}

/// Split `[offset, offset+len)` into zero-write chunks; all but the first start on a
/// ZERO_CHUNK boundary so they stay O_DIRECT-eligible.
pub(crate) fn zero_chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let room = ZERO_CHUNK as u64 - pos % ZERO_CHUNK as u64;
        let n = room.min(end - pos);
        let chunk = (pos, n as usize);
        pos += n;
        Some(chunk)
    })
}

/// Make a range read as zero: punch (if allowed), zero-range, else write zeroes.
pub(crate) fn write_zeroes_sync(
    b: &Backing,
    offset: u64,
    len: u64,
    may_trim: bool,
) -> io::Result<()> {
    if may_trim {
        match fallocate(&b.file, PUNCH_MODE, offset, len) {
            Err(e) if is_unsupported(&e) => {}
            r => return r,
        }
    }
    match fallocate(&b.file, ZERO_MODE, offset, len) {
        Err(e) if is_unsupported(&e) => {}
        r => return r,
    }
    write_zeroes_by_writing(b, offset, len)
}

/// The fallback: plain writes from the shared zero buffer, never allocating.
pub(crate) fn write_zeroes_by_writing(b: &Backing, offset: u64, len: u64) -> io::Result<()> {
    for (pos, n) in zero_chunks(offset, len) {
        pwrite_all(b, zeroes(n), pos, false)?;
    }
    Ok(())
}

fn pick(b: &Backing, offset: u64, buf: *const u8, len: usize) -> &File {
    match &b.direct {
        Some(d) if is_aligned(offset, len, buf) => d,
        _ => &b.file,
    }
}

/// Fill `buf` from `offset`; bytes past end of file read as zero.
pub(crate) fn pread_full(b: &Backing, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let pos = offset + done as u64;
        match pick(b, pos, rest.as_ptr(), rest.len()).read_at(rest, pos) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Largest read tried inline from the page cache (bigger copies would stall the caller's
/// tokio worker).
pub(crate) const INLINE_READ_MAX: usize = 64 << 10;

/// How a read starts in either engine: what the page cache could serve on the caller's thread.
pub(crate) enum ReadStart {
    /// Served whole (or empty).
    Done(Bytes),
    /// `buf[..done]` is filled; the rest must be read by the engine.
    Partial { buf: AlignedBuf, done: usize },
}

/// The shared start of a read: range check, empty read, cached prefix.
pub(crate) fn start_read(
    b: &Backing,
    enabled: &AtomicBool,
    offset: u64,
    len: usize,
) -> io::Result<ReadStart> {
    check_range(b.size, offset, len as u64)?;
    if len == 0 {
        return Ok(ReadStart::Done(Bytes::new()));
    }
    let mut buf = AlignedBuf::for_overwrite(len);
    let done = read_cached(b, enabled, offset, &mut buf);
    Ok(if done == len {
        ReadStart::Done(buf.into_bytes())
    } else {
        ReadStart::Partial { buf, done }
    })
}

/// Try a small buffered read from the page cache on the calling thread with
/// `preadv2(RWF_NOWAIT)`, which never waits for the device. A cached 4 KiB read then costs
/// one syscall instead of two thread hand-offs. Returns how many leading bytes of `buf` are
/// done (all of them at end of file, zero-filled); the caller reads the rest as usual.
/// Clears `enabled` where the kernel or file system lacks RWF_NOWAIT.
pub(crate) fn read_cached(b: &Backing, enabled: &AtomicBool, offset: u64, buf: &mut [u8]) -> usize {
    if buf.len() > INLINE_READ_MAX
        || !enabled.load(Relaxed)
        || (b.direct.is_some() && is_aligned(offset, buf.len(), buf.as_ptr()))
    {
        return 0;
    }
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov points at `buf`, which outlives the call.
    let r = unsafe {
        libc::preadv2(
            b.file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    match r {
        0 => {
            buf.fill(0); // at or past end of file
            buf.len()
        }
        n if n > 0 => n as usize,
        _ => {
            // EAGAIN: not cached. Anything else: the normal path reports it.
            let e = io::Error::last_os_error().raw_os_error();
            if matches!(e, Some(libc::EOPNOTSUPP | libc::ENOSYS)) {
                enabled.store(false, Relaxed);
            }
            0
        }
    }
}

/// Largest write done inline into the page cache (see `write_cached`).
pub(crate) const INLINE_WRITE_MAX: usize = 64 << 10;
/// An inline write slower than this was throttled, or reclaimed memory (a page-cache copy
/// takes microseconds; being preempted on a busy machine takes a few milliseconds)...
const SLOW_INLINE_WRITE: Duration = Duration::from_millis(20);
/// ...and small writes go through the engine for this long.
const INLINE_BACK_OFF: Duration = Duration::from_secs(1);

/// Turns inline writes off for a while after a slow one. A `pwrite` into the page cache blocks
/// when the kernel throttles dirty pages (a disk slower than the writers); on the calling
/// thread that would also hold up the tokio worker that answers the peer's pings and renews
/// the lease, so then the engine's threads take the waiting instead.
#[derive(Debug)]
pub struct InlineWrites {
    origin: Instant,
    /// Milliseconds after `origin` until which inline writes are off.
    off_until: AtomicU64,
    back_off: Duration,
}

impl InlineWrites {
    pub(crate) fn new(back_off: Duration) -> Self {
        InlineWrites {
            origin: Instant::now(),
            off_until: AtomicU64::new(0),
            back_off,
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// Whether a write starting at `now` may go inline.
    pub(crate) fn allowed(&self, now: Instant) -> bool {
        self.ms(now) >= self.off_until.load(Relaxed)
    }

    /// An inline write that started at `started` has just finished.
    pub(crate) fn finished(&self, started: Instant) {
        let now = Instant::now();
        let took = now - started;
        if took > SLOW_INLINE_WRITE {
            let until = self.ms(now + self.back_off);
            if self.off_until.swap(until, Relaxed) <= self.ms(now) {
                tracing::debug!(
                    "a page-cache write took {took:?}: small writes go through the engine for {:?}",
                    self.back_off
                );
            }
        }
    }
}

/// Try a small buffered write on the calling thread. A buffered write only copies into the
/// page cache, so one `pwrite` is far cheaper than handing it to the engine's thread (and,
/// where the file system cannot do non-blocking buffered writes, as on ext4, from there to an
/// io_uring worker) and back. It may block only while the kernel throttles dirty pages, which
/// would throttle any writer; after a slow one, inline writes pause (see `InlineWrites`).
/// Returns the bytes written (0: not tried, or retry in the engine); FUA writes and requests
/// the `O_DIRECT` descriptor takes are left to the engine.
pub(crate) fn write_cached(b: &Backing, offset: u64, data: &[u8], fua: bool) -> io::Result<usize> {
    if fua
        || data.len() > INLINE_WRITE_MAX
        || (b.direct.is_some() && is_aligned(offset, data.len(), std::ptr::null()))
    {
        return Ok(0);
    }
    let started = Instant::now();
    if !b.inline_writes.allowed(started) {
        return Ok(0);
    }
    let r = b.file.write_at(data, offset);
    b.inline_writes.finished(started);
    match r {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        r => r,
    }
}

fn pwrite_once(file: &File, data: &[u8], offset: u64, fua: bool) -> io::Result<usize> {
    if !fua {
        return file.write_at(data, offset);
    }
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: iov points at `data`, which outlives the call.
    let r = unsafe {
        libc::pwritev2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_DSYNC,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) {
            // Kernel without pwritev2 flags: write, then sync.
            let n = file.write_at(data, offset)?;
            file.sync_data()?;
            return Ok(n);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// Write all of `data` at `offset`, durable on return when `fua`.
pub(crate) fn pwrite_all(b: &Backing, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
    let copy;
    let data = if b.direct.is_some() && needs_aligned_copy(offset, data) {
        copy = AlignedBuf::from_slice(data);
        copy.as_slice()
    } else {
        data
    };
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        let pos = offset + done as u64;
        match pwrite_once(pick(b, pos, rest.as_ptr(), rest.len()), rest, pos, fua) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// posix_fadvise(WILLNEED): start readahead of the range.
pub(crate) fn fadvise_willneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::buf::ALIGN;

    fn opts(size: Option<u64>) -> BackingOptions {
        BackingOptions {
            size,
            ..Default::default()
        }
    }

    #[test]
    fn create_missing_file_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let b = open_backing(&path, &opts(Some(1 << 30))).unwrap();
        assert_eq!(b.size, 1 << 30);
        assert!(!b.is_block_device);
        assert!(!b.read_only);
        assert!(b.direct.is_none());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "created file must be sparse");
    }

    #[test]
    fn small_buffered_writes_go_inline_and_the_rest_to_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let b = open_backing(&path, &opts(Some(1 << 20))).unwrap();
        let on_disk =
            |off: usize, len: usize| std::fs::read(&path).unwrap()[off..off + len].to_vec();

        assert_eq!(write_cached(&b, 4096, &[1; 4096], false).unwrap(), 4096);
        assert_eq!(on_disk(4096, 4096), vec![1; 4096]);
        assert_eq!(
            write_cached(&b, 4096, &[2; 4096], true).unwrap(),
            0,
            "FUA: the engine"
        );
        let big = vec![3; INLINE_WRITE_MAX + 1];
        assert_eq!(
            write_cached(&b, 0, &big, false).unwrap(),
            0,
            "large: the engine"
        );
        assert_eq!(
            on_disk(4096, 4096),
            vec![1; 4096],
            "nothing written when declined"
        );

        // Requests the O_DIRECT descriptor takes stay off the page cache.
        let direct = BackingOptions {
            size: Some(1 << 20),
            direct: true,
            ..Default::default()
        };
        let d = open_backing(&path, &direct).unwrap();
        assert_eq!(write_cached(&d, 8192, &[4; 4096], false).unwrap(), 0);
        assert_eq!(write_cached(&d, 100, &[5; 10], false).unwrap(), 10);
        assert_eq!(on_disk(100, 10), vec![5; 10]);

        // After a slow one (throttled), small writes go to the engine until the back-off ends.
        let mut b = b;
        b.inline_writes = InlineWrites::new(Duration::from_millis(200));
        b.inline_writes
            .finished(Instant::now() - Duration::from_micros(500));
        assert_eq!(
            write_cached(&b, 0, &[7; 512], false).unwrap(),
            512,
            "fast: inline"
        );
        b.inline_writes
            .finished(Instant::now() - SLOW_INLINE_WRITE * 2);
        assert_eq!(
            write_cached(&b, 0, &[8; 512], false).unwrap(),
            0,
            "after a slow one"
        );
        assert_eq!(on_disk(0, 512), vec![7; 512]);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            write_cached(&b, 0, &[9; 512], false).unwrap(),
            512,
            "back-off over"
        );

        // A real failure is an error, not a silent hand-over to the engine.
        let ro = BackingOptions {
            size: None,
            read_only: true,
            direct: false,
        };
        let r = open_backing(&path, &ro).unwrap();
        assert!(write_cached(&r, 0, &[6; 512], false).is_err());
    }

    #[test]
    fn missing_file_without_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.img");
        let err = open_backing(&path, &opts(None)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("nope.img") && msg.contains("--size"), "{msg}");
        assert!(!path.exists());
        let ro = BackingOptions {
            size: Some(4096),
            read_only: true,
            direct: false,
        };
        assert!(open_backing(&path, &ro).is_err());
        assert!(!path.exists(), "read-only open must not create");
    }

    #[test]
    fn extend_clip_and_default_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();

        assert_eq!(open_backing(&path, &opts(None)).unwrap().size, 10_000);

        let clipped = open_backing(&path, &opts(Some(4096))).unwrap();
        assert_eq!(clipped.size, 4096);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            10_000,
            "clip must not truncate"
        );

        let grown = open_backing(&path, &opts(Some(1 << 20))).unwrap();
        assert_eq!(grown.size, 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let data = std::fs::read(&path).unwrap();
        assert!(data[..10_000].iter().all(|&b| b == 7));
        assert!(data[10_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn zero_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        let msg = open_backing(&path, &opts(None)).unwrap_err().to_string();
        assert!(msg.contains("--size") && msg.contains("empty"), "{msg}");
        let msg = open_backing(&path, &opts(Some(0))).unwrap_err().to_string();
        assert!(msg.contains("--size"), "{msg}");
    }

    #[test]
    fn read_only_extend_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let ro = |size| BackingOptions {
            size,
            read_only: true,
            direct: false,
        };
        let msg = open_backing(&path, &ro(Some(8192)))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("read-only") && msg.contains("ro"), "{msg}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        let b = open_backing(&path, &ro(None)).unwrap();
        assert!(b.read_only);
        assert_eq!(b.size, 4096);
        assert!(b.file.write_at(b"x", 0).is_err(), "fd must be read-only");
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let msg = open_backing(dir.path(), &opts(Some(4096)))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("directory"), "{msg}");
    }

    #[test]
    fn direct_fd_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let o = BackingOptions {
            size: Some(1 << 20),
            read_only: false,
            direct: true,
        };
        match open_backing(&path, &o) {
            Ok(b) => {
                let d = b.direct.as_ref().expect("direct fd");
                // SAFETY: fcntl F_GETFL on an owned fd.
                let fl = unsafe { libc::fcntl(d.as_raw_fd(), libc::F_GETFL) };
                assert_ne!(fl & libc::O_DIRECT, 0);
                assert_eq!(fl & libc::O_ACCMODE, libc::O_RDWR);
            }
            // tmpfs and friends: the error must say what is wrong.
            Err(e) => assert!(e.to_string().contains("O_DIRECT"), "{e}"),
        }
    }

    #[test]
    fn extents_on_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let b = open_backing(&path, &opts(Some(16 << 20))).unwrap();
        b.file.write_at(&[1u8; 8192], 1 << 20).unwrap();
        b.file.write_at(&[1u8; 4096], 8 << 20).unwrap();
        let e = extents_sync(&b.file, false, 0, 16 << 20, b.size, 100).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    length: 1 << 20,
                    hole: true
                },
                Extent {
                    length: 8192,
                    hole: false
                },
                Extent {
                    length: (7 << 20) - 8192,
                    hole: true
                },
                Extent {
                    length: 4096,
                    hole: false
                },
                Extent {
                    length: (8 << 20) - 4096,
                    hole: true
                },
            ]
        );
        // Block devices are reported as one data extent; requests are clipped to size.
        let e = extents_sync(&b.file, true, 4096, 1 << 40, b.size, 8).unwrap();
        assert_eq!(
            e,
            vec![Extent {
                length: (16 << 20) - 4096,
                hole: false
            }]
        );
        assert!(extents_sync(&b.file, false, 0, 0, b.size, 8)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn zero_chunks_are_bounded_and_aligned() {
        let chunks: Vec<_> = zero_chunks(100, 3 << 20).collect();
        assert_eq!(chunks[0], (100, ZERO_CHUNK - 100));
        assert!(chunks[1..]
            .iter()
            .all(|&(p, n)| p % ZERO_CHUNK as u64 == 0 && n <= ZERO_CHUNK));
        assert_eq!(chunks.iter().map(|c| c.1 as u64).sum::<u64>(), 3 << 20);
        assert_eq!(zero_chunks(0, 0).count(), 0);
        assert_eq!(zeroes(ZERO_CHUNK).as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn range_check() {
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(100, 100, 0).is_ok());
        assert!(check_range(100, 1, 100).is_err());
        assert!(check_range(100, u64::MAX, 2).is_err());
    }
}
