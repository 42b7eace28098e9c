//! The out-of-sync bitmap: one bit per 4 KiB of the device, kept in memory with a dirty flag
//! per on-disk block.
//!
//! Bit `i` covers device bytes `[i * 4096, (i + 1) * 4096)` (the last bit may cover a partial
//! block) and lives in `words[i / 64]` at bit position `i % 64` (LSB first). Bits past the
//! end of the device are always zero.
//!
//! On-disk bitmap block (4 KiB):
//! ```text
//!   0  magic "TANDEMbm"    8  crc32 u32    12  zero u32
//!  16  md_id u64           24  bitmap block index u64 (0 = first bitmap block)
//!  32..128 zero
//! 128  496 little-endian u64 words = 31744 bits = 124 MiB of device (exactly 31 AL extents,
//!      so an extent never straddles two bitmap blocks)
//! ```

use super::superblock::{block_crc, get_u64, put_u64, BITS_PER_EXTENT, BLOCK_SIZE};

pub(crate) const BM_MAGIC: [u8; 8] = *b"TANDEMbm";
const CRC_OFF: usize = 8;
const HEADER: usize = 128;
pub const WORDS_PER_BLOCK: usize = (BLOCK_SIZE - HEADER) / 8;
pub const BITS_PER_BLOCK: u64 = WORDS_PER_BLOCK as u64 * 64;
const _: () = assert!(BITS_PER_BLOCK.is_multiple_of(BITS_PER_EXTENT));

/// Why an on-disk bitmap block was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BmFault {
    /// Bad checksum: damaged, or torn by a crash in the middle of writing it.
    BadChecksum,
    /// Checksum fine but the contents are wrong (written by someone else or for another place).
    Invalid(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    nbits: u64,
    words: Vec<u64>,
    /// Set bits per on-disk block: lets scans skip clean regions.
    counts: Vec<u32>,
    dirty: Vec<bool>,
    n_dirty: usize,
    set: u64,
}

/// Mask of the bits `[lo, hi)` within one word, `0 <= lo < hi <= 64`.
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Bitmap {
    pub fn new(nbits: u64) -> Self {
        let blocks = nbits.div_ceil(BITS_PER_BLOCK) as usize;
        Bitmap {
            nbits,
            words: vec![0; nbits.div_ceil(64) as usize],
            counts: vec![0; blocks],
            dirty: vec![false; blocks],
            n_dirty: 0,
            set: 0,
        }
    }

    pub fn nbits(&self) -> u64 {
        self.nbits
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn blocks(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.nbits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn mark_dirty(&mut self, block: usize) {
        if !self.dirty[block] {
            self.dirty[block] = true;
            self.n_dirty += 1;
        }
    }

    /// Store `new` into word `w`, keeping counts and dirty flags. Returns the number of bits
    /// that changed.
    fn store(&mut self, w: usize, new: u64) -> u64 {
        let old = self.words[w];
        if old == new {
            return 0;
        }
        self.words[w] = new;
        let block = w / WORDS_PER_BLOCK;
        let (up, down) = ((new & !old).count_ones(), (old & !new).count_ones());
        self.counts[block] = self.counts[block] + up - down;
        self.set = self.set + up as u64 - down as u64;
        self.mark_dirty(block);
        (up + down) as u64
    }

    /// Set (or clear) bits `[first, end)`, clipped to the device. Returns how many changed.
    pub fn set_range(&mut self, first: u64, end: u64, value: bool) -> u64 {
        let end = end.min(self.nbits);
        if first >= end {
            return 0;
        }
        let mut changed = 0;
        let (w0, w1) = (first / 64, (end - 1) / 64);
        for w in w0..=w1 {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { (end - 1) % 64 + 1 } else { 64 };
            let m = mask(lo, hi);
            let old = self.words[w as usize];
            let new = if value { old | m } else { old & !m };
            changed += self.store(w as usize, new);
        }
        changed
    }

    pub fn set_all(&mut self) -> u64 {
        self.set_range(0, self.nbits, true)
    }

    /// OR `peer` in. The caller has checked the length. Bits past the end are ignored.
    pub fn merge(&mut self, peer: &[u64]) -> u64 {
        debug_assert_eq!(peer.len(), self.words.len());
        let mut changed = 0;
        let last = self.words.len().saturating_sub(1);
        for (w, &p) in peer.iter().enumerate() {
            let p = if w == last && !self.nbits.is_multiple_of(64) {
                p & mask(0, self.nbits % 64)
            } else {
                p
            };
            let new = self.words[w] | p;
            changed += self.store(w, new);
        }
        changed
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.nbits {
            return None;
        }
        let mut block = from / BITS_PER_BLOCK;
        let mut bit = from;
        while block < self.blocks() {
            if self.counts[block as usize] > 0 {
                let block_end = ((block + 1) * BITS_PER_BLOCK).min(self.nbits);
                let mut w = bit / 64;
                let mut word = self.words[w as usize] & !((1u64 << (bit % 64)) - 1);
                loop {
                    if word != 0 {
                        return Some(w * 64 + word.trailing_zeros() as u64);
                    }
                    w += 1;
                    if w * 64 >= block_end {
                        break;
                    }
                    word = self.words[w as usize];
                }
            }
            block += 1;
            bit = block * BITS_PER_BLOCK;
        }
        None
    }

    /// The first clear bit at or after `start`, but no further than `limit` (≤ nbits).
    pub fn run_end(&self, start: u64, limit: u64) -> u64 {
        let limit = limit.min(self.nbits);
        let mut bit = start;
        while bit < limit {
            let w = bit / 64;
            let word = !self.words[w as usize] & !((1u64 << (bit % 64)) - 1);
            if word != 0 {
                return (w * 64 + word.trailing_zeros() as u64).min(limit);
            }
            bit = (w + 1) * 64;
        }
        limit
    }

    /// The on-disk block that holds extent `e`'s bits.
    pub fn block_of_extent(e: u64) -> u64 {
        e * BITS_PER_EXTENT / BITS_PER_BLOCK
    }

    pub fn any_dirty(&self) -> bool {
        self.n_dirty > 0
    }

    pub fn is_dirty(&self, block: u64) -> bool {
        self.dirty[block as usize]
    }

    pub fn dirty_blocks(&self) -> Vec<u64> {
        (0..self.blocks())
            .filter(|&b| self.dirty[b as usize])
            .collect()
    }

    pub fn clear_dirty(&mut self, block: u64) {
        if std::mem::take(&mut self.dirty[block as usize]) {
            self.n_dirty -= 1;
        }
    }

    /// Set every bit of an on-disk block (used for a block torn by a crash).
    pub fn fill_block(&mut self, block: u64) -> u64 {
        let first = block * BITS_PER_BLOCK;
        self.set_range(first, first + BITS_PER_BLOCK, true)
    }

    /// The 4 KiB image of bitmap block `block`.
    pub fn encode_block(&self, block: u64, md_id: u64, out: &mut [u8]) {
        let out = &mut out[..BLOCK_SIZE];
        out.fill(0);
        out[0..8].copy_from_slice(&BM_MAGIC);
        put_u64(out, 16, md_id);
        put_u64(out, 24, block);
        let w0 = block as usize * WORDS_PER_BLOCK;
        let w1 = (w0 + WORDS_PER_BLOCK).min(self.words.len());
        for (i, w) in self.words[w0..w1].iter().enumerate() {
            put_u64(out, HEADER + i * 8, *w);
        }
        let crc = block_crc(out, CRC_OFF);
        out[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Validate an on-disk block and load its bits (which must be clear in memory).
    pub fn decode_block(&mut self, block: u64, md_id: u64, b: &[u8]) -> Result<(), BmFault> {
        let b = &b[..BLOCK_SIZE];
        if super::superblock::get_u32(b, CRC_OFF) != block_crc(b, CRC_OFF) {
            return Err(BmFault::BadChecksum);
        }
        if b[0..8] != BM_MAGIC {
            return Err(BmFault::Invalid("is not a bitmap block (bad magic)".into()));
        }
        if get_u64(b, 16) != md_id {
            return Err(BmFault::Invalid(format!(
                "belongs to another metadata instance ({:016X}, expected {md_id:016X}): \
                 left over from an earlier create-md?",
                get_u64(b, 16)
            )));
        }
        // Checksum-valid but not written by this version: its words cannot be trusted.
        if let Some(off) = (12..16).chain(32..HEADER).find(|&i| b[i] != 0) {
            return Err(BmFault::Invalid(format!(
                "has non-zero reserved byte {off} (bytes 12..16 and 32..128 must be zero)"
            )));
        }
        if get_u64(b, 24) != block {
            return Err(BmFault::Invalid(format!(
                "holds bitmap block {} where block {block} belongs",
                get_u64(b, 24)
            )));
        }
        let w0 = block as usize * WORDS_PER_BLOCK;
        let word = |i: usize| get_u64(b, HEADER + i * 8);
        // Check every word before loading any, so a rejected block leaves no bits behind.
        for i in 0..WORDS_PER_BLOCK {
            let (v, w) = (word(i), w0 + i);
            let beyond = if w >= self.words.len() {
                v
            } else if w == self.words.len() - 1 && !self.nbits.is_multiple_of(64) {
                v & !mask(0, self.nbits % 64)
            } else {
                0
            };
            if beyond != 0 {
                return Err(BmFault::Invalid(
                    "has bits set beyond the end of the device".into(),
                ));
            }
        }
        for i in 0..WORDS_PER_BLOCK {
            let v = word(i);
            if v != 0 {
                self.store(w0 + i, v);
            }
        }
        self.clear_dirty(block);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(b: &Bitmap) -> Vec<u64> {
        (0..b.nbits()).filter(|&i| b.is_set(i)).collect()
    }

    #[test]
    fn geometry() {
        assert_eq!(WORDS_PER_BLOCK, 496);
        assert_eq!(BITS_PER_BLOCK, 31 * BITS_PER_EXTENT);
        assert_eq!(Bitmap::block_of_extent(30), 0);
        assert_eq!(Bitmap::block_of_extent(31), 1);
    }

    #[test]
    fn set_clear_count_across_words() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.set_range(60, 130, true), 70);
        assert_eq!(b.count(), 70);
        assert_eq!(b.set_range(60, 130, true), 0);
        assert_eq!(b.set_range(64, 128, false), 64);
        assert_eq!(bits(&b), vec![60, 61, 62, 63, 128, 129]);
        // Clipped to the device.
        assert_eq!(b.set_range(190, 1000, true), 10);
        assert_eq!(b.count(), 16);
        assert_eq!(*b.words().last().unwrap() >> 8, 0, "no bits past the end");
        assert_eq!(b.set_all(), 184);
        assert_eq!(b.count(), 200);
    }

    #[test]
    fn next_set_and_runs() {
        let mut b = Bitmap::new(3 * BITS_PER_BLOCK + 10);
        assert_eq!(b.next_set(0), None);
        b.set_range(5, 7, true);
        b.set_range(2 * BITS_PER_BLOCK + 63, 2 * BITS_PER_BLOCK + 200, true);
        b.set_range(3 * BITS_PER_BLOCK + 9, 3 * BITS_PER_BLOCK + 10, true);
        assert_eq!(b.next_set(0), Some(5));
        assert_eq!(b.next_set(6), Some(6));
        assert_eq!(b.run_end(5, u64::MAX), 7);
        assert_eq!(b.next_set(7), Some(2 * BITS_PER_BLOCK + 63));
        assert_eq!(
            b.run_end(2 * BITS_PER_BLOCK + 63, u64::MAX),
            2 * BITS_PER_BLOCK + 200
        );
        assert_eq!(
            b.run_end(2 * BITS_PER_BLOCK + 63, 2 * BITS_PER_BLOCK + 100),
            2 * BITS_PER_BLOCK + 100
        );
        assert_eq!(
            b.next_set(2 * BITS_PER_BLOCK + 200),
            Some(3 * BITS_PER_BLOCK + 9)
        );
        assert_eq!(
            b.run_end(3 * BITS_PER_BLOCK + 9, u64::MAX),
            3 * BITS_PER_BLOCK + 10
        );
        assert_eq!(b.next_set(3 * BITS_PER_BLOCK + 10), None);
    }

    #[test]
    fn dirty_tracking() {
        let mut b = Bitmap::new(2 * BITS_PER_BLOCK);
        assert!(!b.any_dirty());
        b.set_range(BITS_PER_BLOCK + 1, BITS_PER_BLOCK + 2, true);
        assert_eq!(b.dirty_blocks(), vec![1]);
        b.clear_dirty(1);
        assert!(!b.any_dirty());
        // No change, no dirt.
        b.set_range(BITS_PER_BLOCK + 1, BITS_PER_BLOCK + 2, true);
        b.set_range(0, 5, false);
        assert!(!b.any_dirty());
    }

    #[test]
    fn merge_masks_the_tail() {
        let mut b = Bitmap::new(70);
        b.set_range(0, 1, true);
        let changed = b.merge(&[0b110, u64::MAX]);
        assert_eq!(changed, 2 + 6);
        assert_eq!(b.count(), 9);
        assert_eq!(b.words()[1], 0b11_1111);
    }

    #[test]
    fn block_round_trip_and_checks() {
        let mut b = Bitmap::new(BITS_PER_BLOCK + 100);
        b.set_range(3, 90, true);
        b.set_range(BITS_PER_BLOCK + 99, BITS_PER_BLOCK + 100, true);
        let mut img = vec![0u8; BLOCK_SIZE];
        let mut fresh = Bitmap::new(b.nbits());
        for blk in 0..2 {
            b.encode_block(blk, 42, &mut img);
            fresh.decode_block(blk, 42, &img).unwrap();
        }
        assert_eq!(fresh.words(), b.words());
        assert_eq!(fresh.count(), b.count());
        assert!(!fresh.any_dirty());

        b.encode_block(1, 42, &mut img);
        let mut other = Bitmap::new(b.nbits());
        assert!(matches!(
            other.decode_block(0, 42, &img),
            Err(BmFault::Invalid(_))
        ));
        assert!(matches!(
            other.decode_block(1, 43, &img),
            Err(BmFault::Invalid(_))
        ));
        for pos in [0, 9, 20, 30, 127, 128, 500, 4095] {
            let mut c = img.clone();
            c[pos] ^= 0x10;
            assert_eq!(
                other.decode_block(1, 42, &c),
                Err(BmFault::BadChecksum),
                "pos {pos}"
            );
        }
        // A valid-CRC block with bits beyond the device end.
        let mut c = img.clone();
        super::put_u64(&mut c, HEADER + 8 * 5, 1);
        let crc = block_crc(&c, CRC_OFF);
        c[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            other.decode_block(1, 42, &c),
            Err(BmFault::Invalid(_))
        ));
    }

    /// Found by the `meta_blocks` fuzz target: a checksum-valid block with bytes in the
    /// reserved header fields decoded, so `encode(decode(b)) != b`.
    #[test]
    fn reserved_header_bytes_must_be_zero() {
        let mut b = Bitmap::new(BITS_PER_BLOCK + 100);
        b.set_range(BITS_PER_BLOCK + 99, BITS_PER_BLOCK + 100, true);
        let mut img = vec![0u8; BLOCK_SIZE];
        b.encode_block(1, 42, &mut img);
        for pos in [12, 15, 32, 71, 127] {
            let mut c = img.clone();
            c[pos] = 0xff;
            let crc = block_crc(&c, CRC_OFF);
            c[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
            let mut fresh = Bitmap::new(b.nbits());
            match fresh.decode_block(1, 42, &c) {
                Err(BmFault::Invalid(m)) => assert!(m.contains("reserved byte"), "{pos}: {m}"),
                r => panic!("byte {pos}: {r:?}"),
            }
        }
        let mut fresh = Bitmap::new(b.nbits());
        fresh.decode_block(1, 42, &img).unwrap();
        assert_eq!(fresh.words(), b.words());
    }

    /// Found by the `meta_blocks` fuzz target: a block rejected for bits beyond the device end
    /// had already loaded the words before the offending one.
    #[test]
    fn a_rejected_block_loads_nothing() {
        let mut b = Bitmap::new(100);
        b.set_range(0, 10, true);
        let mut img = vec![0u8; BLOCK_SIZE];
        b.encode_block(0, 42, &mut img);
        super::put_u64(&mut img, HEADER + 8, 1 << 40);
        let crc = block_crc(&img, CRC_OFF);
        img[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
        let mut fresh = Bitmap::new(100);
        assert!(matches!(
            fresh.decode_block(0, 42, &img),
            Err(BmFault::Invalid(_))
        ));
        assert_eq!(fresh.count(), 0);
        assert_eq!(fresh.words(), &[0, 0]);
    }
}
