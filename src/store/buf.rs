//! Page-aligned heap buffers: O_DIRECT needs 4096-aligned memory, and reads hand the buffer
//! to `Bytes` without a copy.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;

/// Alignment of every [`AlignedBuf`] (the usual logical block and page size).
pub const ALIGN: usize = 4096;

// Freed buffers are recycled by power-of-two capacity, 4 KiB ..= 4 MiB: the allocator mmaps
// fresh large blocks, so without recycling every 1 MiB request page-faults its buffer in and
// munmaps it afterwards (TLB-shootdown IPIs included), which costs more than the I/O.
const MIN_SHIFT: u32 = 12;
const MAX_SHIFT: u32 = 22;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Idle bytes kept per class (between 2 and 128 buffers).
const POOL_CLASS_BYTES: usize = 16 << 20;

struct Idle(NonNull<u8>);
// SAFETY: an idle allocation is owned by the pool alone.
unsafe impl Send for Idle {}

// Invariant: all `capacity` bytes of a pooled allocation are initialised.
static POOL: [Mutex<Vec<Idle>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

fn class_of(cap: usize) -> Option<usize> {
    (cap.is_power_of_two() && (1 << MIN_SHIFT..=1 << MAX_SHIFT).contains(&cap))
        .then(|| (cap.trailing_zeros() - MIN_SHIFT) as usize)
}

fn capacity_for(len: usize) -> usize {
    if len <= 1 << MAX_SHIFT {
        len.next_power_of_two().max(1 << MIN_SHIFT)
    } else {
        len
    }
}

fn max_idle(class: usize) -> usize {
    (POOL_CLASS_BYTES >> (class as u32 + MIN_SHIFT)).clamp(2, 128)
}

/// A fixed-length heap buffer whose address is a multiple of 4096. Its memory is recycled
/// through a small process-wide pool when dropped.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Size of the allocation (0 for the empty buffer, which owns none).
    cap: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, ALIGN).expect("AlignedBuf length overflows isize")
    }

    fn empty() -> Self {
        // An aligned dangling pointer, so even an empty buffer passes alignment checks.
        let ptr = NonNull::new(std::ptr::without_provenance_mut(ALIGN)).expect("non-null");
        AlignedBuf {
            ptr,
            len: 0,
            cap: 0,
        }
    }

    /// A recycled or fresh (zeroed) allocation of at least `len` bytes; all initialised.
    fn alloc(len: usize) -> (Self, bool) {
        if len == 0 {
            return (Self::empty(), true);
        }
        let cap = capacity_for(len);
        if let Some(class) = class_of(cap) {
            let idle = POOL[class]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            if let Some(Idle(ptr)) = idle {
                return (AlignedBuf { ptr, len, cap }, false);
            }
        }
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        (AlignedBuf { ptr, len, cap }, true)
    }

    /// A buffer of `len` zero bytes. Zero-length buffers do not allocate.
    pub fn new_zeroed(len: usize) -> Self {
        let (mut buf, zeroed) = Self::alloc(len);
        if !zeroed {
            buf.as_mut_slice().fill(0);
        }
        buf
    }

    /// A buffer of `len` bytes with unspecified contents (zeroes, or bytes left by an earlier
    /// buffer of this process), for callers that overwrite all of it, such as a socket read.
    /// Skips the zeroing pass of [`new_zeroed`](Self::new_zeroed).
    pub fn for_overwrite(len: usize) -> Self {
        Self::alloc(len).0
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::for_overwrite(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling and aligned with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw pointer for handing the buffer to the kernel; stable for the buffer's lifetime,
    /// even when the `AlignedBuf` value itself moves.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Convert into `Bytes` without copying; the allocation is freed when the last `Bytes`
    /// referring to it is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        if let Some(class) = class_of(self.cap) {
            let mut idle = POOL[class].lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < max_idle(class) {
                idle.push(Idle(self.ptr));
                return;
            }
        }
        // SAFETY: allocated in alloc() with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl From<AlignedBuf> for Bytes {
    fn from(buf: AlignedBuf) -> Bytes {
        buf.into_bytes()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

/// True when `offset`, `len` and `addr` all satisfy O_DIRECT's 4096-byte alignment.
pub(crate) fn is_aligned(offset: u64, len: usize, addr: *const u8) -> bool {
    // Masks rather than is_multiple_of, which is newer than the workspace's rust-version.
    let mask = ALIGN - 1;
    offset & mask as u64 == 0 && len & mask == 0 && addr as usize & mask == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn zeroed_and_aligned() {
        assert_send_sync::<AlignedBuf>();
        for len in [1, 7, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::new_zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn zero_length() {
        let mut buf = AlignedBuf::new_zeroed(0);
        assert!(buf.is_empty());
        assert_eq!(buf.as_slice(), &[] as &[u8]);
        assert_eq!(buf.as_mut_slice().len(), 0);
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        let bytes = buf.into_bytes();
        assert!(bytes.is_empty());
        let copy = AlignedBuf::from_slice(&[]);
        assert!(copy.is_empty());
    }

    #[test]
    fn write_then_into_bytes_without_copy() {
        let mut buf = AlignedBuf::new_zeroed(10_000);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let addr = buf.as_ptr();
        let bytes: Bytes = buf.into();
        assert_eq!(bytes.as_ptr(), addr, "conversion must not copy");
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        let tail = bytes.slice(5000..);
        drop(bytes);
        assert_eq!(tail[0], (5000 % 251) as u8);
    }

    #[test]
    fn from_slice_copies() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let buf = AlignedBuf::from_slice(&data[3..]);
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        assert_eq!(&buf[..], &data[3..]);
    }

    #[test]
    fn size_classes() {
        assert_eq!(capacity_for(1), 4096);
        assert_eq!(capacity_for(4096), 4096);
        assert_eq!(capacity_for(4097), 8192);
        assert_eq!(capacity_for(1 << 20), 1 << 20);
        assert_eq!(capacity_for((4 << 20) + 1), (4 << 20) + 1);
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4 << 20), Some(CLASSES - 1));
        assert_eq!(class_of(8 << 20), None);
        assert_eq!(class_of(12_288), None);
        assert_eq!(max_idle(0), 128);
        assert_eq!(max_idle(CLASSES - 1), 4);
    }

    #[test]
    fn recycled_buffers() {
        let len = (1 << 20) + 12_345; // an odd length in the 2 MiB class
        let mut reused = false;
        for i in 0..100u8 {
            let mut dirty = AlignedBuf::for_overwrite(len);
            assert_eq!(dirty.len(), len);
            assert_eq!(dirty.as_ptr() as usize % ALIGN, 0);
            dirty.as_mut_slice().fill(i | 1);
            let addr = dirty.as_ptr();
            drop(dirty);
            let again = AlignedBuf::for_overwrite(len);
            reused |= again.as_ptr() == addr && again[0] == (i | 1);
            drop(again);
            let zeroed = AlignedBuf::new_zeroed(len);
            assert!(
                zeroed.iter().all(|&b| b == 0),
                "new_zeroed must zero a recycled buffer"
            );
            let copy = AlignedBuf::from_slice(&vec![i; 5000]);
            assert!(copy.len() == 5000 && copy.iter().all(|&b| b == i));
        }
        assert!(reused, "freed buffers should be recycled");
        // Beyond the largest class: plain allocations of the exact size.
        let big = AlignedBuf::new_zeroed((8 << 20) + 1);
        assert!(big.iter().all(|&b| b == 0));
    }

    #[test]
    fn alignment_check() {
        let buf = AlignedBuf::new_zeroed(8192);
        assert!(is_aligned(4096, 4096, buf.as_ptr()));
        assert!(!is_aligned(4095, 4096, buf.as_ptr()));
        assert!(!is_aligned(4096, 4000, buf.as_ptr()));
        assert!(!is_aligned(0, 4096, buf.as_ptr().wrapping_add(1)));
    }
}
