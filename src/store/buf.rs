//! Page-aligned heap buffers: O_DIRECT needs 4096-aligned memory, and reads hand the buffer
//! to `Bytes` without a copy.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use bytes::Bytes;

/// Alignment of every [`AlignedBuf`] (the usual logical block and page size).
pub const ALIGN: usize = 4096;

/// A fixed-length, zero-initialised heap buffer whose address is a multiple of 4096.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ALIGN).expect("AlignedBuf length overflows isize")
    }

    fn empty() -> Self {
        // An aligned dangling pointer, so even an empty buffer passes alignment checks.
        let ptr = NonNull::new(std::ptr::without_provenance_mut(ALIGN)).expect("non-null");
        AlignedBuf { ptr, len: 0 }
    }

    /// A buffer of `len` zero bytes. Zero-length buffers do not allocate.
    pub fn new_zeroed(len: usize) -> Self {
        if len == 0 {
            return Self::empty();
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        if data.is_empty() {
            return Self::empty();
        }
        let layout = Self::layout(data.len());
        // SAFETY: layout has non-zero size; the copy initialises every byte before use.
        unsafe {
            let raw = alloc::alloc(layout);
            let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
            std::ptr::copy_nonoverlapping(data.as_ptr(), raw, data.len());
            AlignedBuf {
                ptr,
                len: data.len(),
            }
        }
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
        if self.len != 0 {
            // SAFETY: allocated in new_zeroed/from_slice with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
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
            .finish()
    }
}

/// True when `offset`, `len` and `addr` all satisfy O_DIRECT's 4096-byte alignment.
pub(crate) fn is_aligned(offset: u64, len: usize, addr: *const u8) -> bool {
    offset % ALIGN as u64 == 0 && len % ALIGN == 0 && (addr as usize) % ALIGN == 0
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
    fn alignment_check() {
        let buf = AlignedBuf::new_zeroed(8192);
        assert!(is_aligned(4096, 4096, buf.as_ptr()));
        assert!(!is_aligned(4095, 4096, buf.as_ptr()));
        assert!(!is_aligned(4096, 4000, buf.as_ptr()));
        assert!(!is_aligned(0, 4096, buf.as_ptr().wrapping_add(1)));
    }
}
