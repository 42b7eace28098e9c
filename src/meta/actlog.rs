//! The activity log (AL): the set of "hot" 4 MiB extents that may hold writes the peer has not
//! confirmed, kept in a ring of 4 KiB transaction blocks (DRBD's scheme, simplified).
//!
//! In memory the AL is an array of `al_extents` slots, each empty or naming an extent, plus an
//! LRU clock per slot. Making a cold extent hot writes one transaction that assigns it a slot
//! (evicting the least recently used extent if no slot is free).
//!
//! On-disk transaction block (4 KiB, written at ring position `tr % ring_blocks`):
//! ```text
//!   0  magic "TANDEMal"   8  crc32 u32   12  kind u16 (1 update, 2 reset)   14  n_updates u16
//!  16  md_id u64          24  transaction number u64 (monotonic)
//!  32  al_extents u32     36  context_start u32     40  n_context u16     42..64 zero
//!  64  64 updates: (slot u32, extent u32)
//! 576  880 context entries u32: the contents of slots context_start.. (mod al_extents)
//!      after this transaction; 0xFFFFFFFF = empty slot
//! ```
//! A reset transaction empties every slot before its updates and context apply.
//!
//! **Replay.** Starting from all-empty slots, apply every valid transaction of the ring from the
//! oldest to the newest (reset, then updates, then context). Consecutive transactions carry
//! consecutive context windows, and the ring is sized so that any `ring_blocks - 1` consecutive
//! transactions cover every slot; so replay reproduces the hot set of the newest transaction
//! exactly, even when one block is missing.
//!
//! **Torn versus corrupt.** Each transaction is written and fdatasync'ed before the next one
//! starts, so a crash can tear at most one block: the one at the position after the newest valid
//! transaction (the "frontier", which held the oldest transaction of the ring). After an unclean
//! shutdown a bad checksum at exactly that position is accepted as an interrupted write: the
//! transaction it would have held was never acknowledged, so the caller never wrote data under it,
//! and the bitmap blocks of anything it evicted were already on disk while the previous transaction
//! (which replay uses) still lists those extents as hot. As a safety margin, if the torn block's
//! header still reads as the next transaction, the extents named in its update list are marked out
//! of sync too. Everything else is `Corrupt`: a bad checksum anywhere else, any bad block after a
//! clean shutdown, a checksum-valid block with impossible contents, or a transaction number out of
//! sequence. Limitation: bit rot in the newest transaction looks exactly like a torn write and is
//! accepted (its extents are then lost from the replay unless the header survived).

use std::collections::HashMap;

use super::superblock::{
    block_crc, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, BLOCK_SIZE,
};

pub(crate) const AL_MAGIC: [u8; 8] = *b"TANDEMal";
const CRC_OFF: usize = 8;
pub const UPDATES_PER_TX: usize = 64;
const UPDATES_OFF: usize = 64;
const CONTEXT_OFF: usize = UPDATES_OFF + UPDATES_PER_TX * 8;
pub const CONTEXT_PER_TX: u32 = ((BLOCK_SIZE - CONTEXT_OFF) / 4) as u32;
pub const MIN_RING_BLOCKS: u32 = 8;
/// Largest transaction number a valid block may hold. Numbers start at 0 and grow by one per
/// transaction (2^63 of them take 292,000 years at one per microsecond), so a larger one is
/// corrupt, and ring arithmetic on valid numbers (`newest + ring`) cannot overflow.
pub const MAX_TR: u64 = u64::MAX / 2;
/// An empty slot.
pub const EMPTY: u32 = u32::MAX;

fn context_len(al_extents: u32) -> u32 {
    CONTEXT_PER_TX.min(al_extents)
}

/// Ring size: enough that `ring - 1` consecutive transactions carry the whole context.
pub fn ring_blocks(al_extents: u32) -> u32 {
    MIN_RING_BLOCKS.max(al_extents.div_ceil(context_len(al_extents).max(1)) + 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxKind {
    Update = 1,
    Reset = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transaction {
    pub tr: u64,
    pub kind: TxKind,
    /// (slot, extent)
    pub updates: Vec<(u32, u32)>,
    pub context_start: u32,
    pub context: Vec<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TxFault {
    BadChecksum,
    Invalid(String),
}

impl Transaction {
    pub fn encode(&self, md_id: u64, al_extents: u32) -> Vec<u8> {
        assert!(self.updates.len() <= UPDATES_PER_TX);
        assert!(self.context.len() <= CONTEXT_PER_TX as usize);
        let mut b = vec![0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(&AL_MAGIC);
        put_u16(&mut b, 12, self.kind as u16);
        put_u16(&mut b, 14, self.updates.len() as u16);
        put_u64(&mut b, 16, md_id);
        put_u64(&mut b, 24, self.tr);
        put_u32(&mut b, 32, al_extents);
        put_u32(&mut b, 36, self.context_start);
        put_u16(&mut b, 40, self.context.len() as u16);
        for (i, (slot, extent)) in self.updates.iter().enumerate() {
            put_u32(&mut b, UPDATES_OFF + i * 8, *slot);
            put_u32(&mut b, UPDATES_OFF + i * 8 + 4, *extent);
        }
        for (i, v) in self.context.iter().enumerate() {
            put_u32(&mut b, CONTEXT_OFF + i * 4, *v);
        }
        let crc = block_crc(&b, CRC_OFF);
        put_u32(&mut b, CRC_OFF, crc);
        b
    }

    pub fn decode(b: &[u8], md_id: u64, al_extents: u32, n_extents: u64) -> Result<Self, TxFault> {
        let b = &b[..BLOCK_SIZE];
        if get_u32(b, CRC_OFF) != block_crc(b, CRC_OFF) {
            return Err(TxFault::BadChecksum);
        }
        let bad = |s: String| Err(TxFault::Invalid(s));
        if b[0..8] != AL_MAGIC {
            return bad("is not an activity-log block (bad magic)".into());
        }
        if get_u64(b, 16) != md_id {
            return bad(format!(
                "belongs to another metadata instance ({:016X}, expected {md_id:016X}): \
                 left over from an earlier create-md?",
                get_u64(b, 16)
            ));
        }
        let tr = get_u64(b, 24);
        if tr > MAX_TR {
            return bad(format!(
                "has transaction number {tr}, beyond the largest possible ({MAX_TR})"
            ));
        }
        let kind = match get_u16(b, 12) {
            1 => TxKind::Update,
            2 => TxKind::Reset,
            k => return bad(format!("has unknown transaction kind {k}")),
        };
        if get_u32(b, 32) != al_extents {
            return bad(format!(
                "was written for {} al-extents, the superblock says {al_extents}",
                get_u32(b, 32)
            ));
        }
        let n_updates = get_u16(b, 14) as usize;
        let n_context = get_u16(b, 40) as u32;
        let context_start = get_u32(b, 36);
        if n_updates > UPDATES_PER_TX
            || n_context != context_len(al_extents)
            || context_start >= al_extents
        {
            return bad(format!(
                "has impossible counts (updates {n_updates}, context {n_context} from {context_start})"
            ));
        }
        // Checksum-valid but not as this version writes it: reserved bytes, update entries
        // past `n_updates` and context entries past `n_context` are zero.
        let unused = (42..UPDATES_OFF)
            .chain(UPDATES_OFF + n_updates * 8..CONTEXT_OFF)
            .chain(CONTEXT_OFF + n_context as usize * 4..BLOCK_SIZE);
        if let Some(off) = unused.into_iter().find(|&i| b[i] != 0) {
            return bad(format!(
                "has non-zero byte {off} outside its {n_updates} updates and {n_context} context entries"
            ));
        }
        let extent_ok = |e: u32| (e as u64) < n_extents;
        let mut updates = Vec::with_capacity(n_updates);
        for i in 0..n_updates {
            let slot = get_u32(b, UPDATES_OFF + i * 8);
            let extent = get_u32(b, UPDATES_OFF + i * 8 + 4);
            if slot >= al_extents || !extent_ok(extent) {
                return bad(format!(
                    "transaction {tr} puts extent {extent} into slot {slot}, outside the device or the log"
                ));
            }
            updates.push((slot, extent));
        }
        let mut context = Vec::with_capacity(n_context as usize);
        for i in 0..n_context as usize {
            let e = get_u32(b, CONTEXT_OFF + i * 4);
            if e != EMPTY && !extent_ok(e) {
                return bad(format!(
                    "transaction {tr} names extent {e}, beyond the device"
                ));
            }
            context.push(e);
        }
        Ok(Transaction {
            tr,
            kind,
            updates,
            context_start,
            context,
        })
    }

    /// Best effort on a block that failed its checksum: if its header still claims to be
    /// transaction `tr` of this metadata, the extents in its update list (those inside the
    /// device). Only ever used to mark *more* out of sync.
    pub fn salvage_updates(b: &[u8], md_id: u64, tr: u64, n_extents: u64) -> Vec<u32> {
        let b = &b[..BLOCK_SIZE];
        if b[0..8] != AL_MAGIC || get_u64(b, 16) != md_id || get_u64(b, 24) != tr {
            return Vec::new();
        }
        let n = (get_u16(b, 14) as usize).min(UPDATES_PER_TX);
        (0..n)
            .map(|i| get_u32(b, UPDATES_OFF + i * 8 + 4))
            .filter(|&e| (e as u64) < n_extents)
            .collect()
    }
}

/// What the ring on disk says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RingState {
    /// Extents hot after replaying the ring (sorted, distinct).
    pub hot: Vec<u32>,
    /// The newest valid transaction number.
    pub newest: u64,
    /// A torn newest write that was accepted: (ring position, salvaged extents).
    pub torn: Option<(u32, Vec<u32>)>,
}

/// Validate and replay the ring. `blocks[p]` is ring position `p`. An error names the ring
/// position and what is wrong with it.
pub(crate) fn scan_ring(
    blocks: &[&[u8]],
    md_id: u64,
    al_extents: u32,
    n_extents: u64,
    tolerate_torn: bool,
) -> Result<RingState, (u32, String)> {
    let ring = blocks.len() as u64;
    let mut parsed: Vec<Option<Transaction>> = Vec::with_capacity(blocks.len());
    for (pos, b) in blocks.iter().enumerate() {
        match Transaction::decode(b, md_id, al_extents, n_extents) {
            Ok(tx) => {
                if tx.tr % ring != pos as u64 {
                    return Err((
                        pos as u32,
                        format!(
                            "holds transaction {}, which belongs in ring position {}",
                            tx.tr,
                            tx.tr % ring
                        ),
                    ));
                }
                parsed.push(Some(tx));
            }
            Err(TxFault::BadChecksum) => parsed.push(None),
            Err(TxFault::Invalid(s)) => return Err((pos as u32, s)),
        }
    }
    let Some(newest) = parsed.iter().flatten().map(|t| t.tr).max() else {
        return Err((
            0,
            "has a bad checksum (no activity-log block is valid)".into(),
        ));
    };
    let frontier = (newest + 1) % ring;
    let mut torn = None;
    for (pos, p) in parsed.iter().enumerate() {
        let pos = pos as u64;
        let back = (newest % ring + ring - pos) % ring;
        let expected = newest.checked_sub(back);
        match p {
            Some(tx) if Some(tx.tr) != expected => {
                return Err((
                    pos as u32,
                    format!(
                        "holds transaction {}, out of sequence (the newest is {newest}, so \
                         this position should hold {})",
                        tx.tr,
                        expected.map_or("nothing".to_string(), |e| e.to_string())
                    ),
                ));
            }
            Some(_) => {}
            None if tolerate_torn && pos == frontier => {
                let salvaged = Transaction::salvage_updates(
                    blocks[pos as usize],
                    md_id,
                    newest + 1,
                    n_extents,
                );
                torn = Some((pos as u32, salvaged));
            }
            None => return Err((pos as u32, "has a bad checksum".into())),
        }
    }
    let mut slots = vec![EMPTY; al_extents as usize];
    for i in 1..=ring {
        let Some(tx) = &parsed[((newest + i) % ring) as usize] else {
            continue;
        };
        if tx.kind == TxKind::Reset {
            slots.fill(EMPTY);
        }
        for &(slot, extent) in &tx.updates {
            slots[slot as usize] = extent;
        }
        for (i, &e) in tx.context.iter().enumerate() {
            slots[(tx.context_start as usize + i) % al_extents as usize] = e;
        }
    }
    let mut hot: Vec<u32> = slots.into_iter().filter(|&e| e != EMPTY).collect();
    hot.sort_unstable();
    hot.dedup();
    Ok(RingState { hot, newest, torn })
}

/// One slot assignment of a planned transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Assign {
    pub slot: u32,
    pub extent: u32,
    /// The extent this evicts, or `EMPTY`.
    pub evicted: u32,
}

/// The in-memory activity log.
#[derive(Debug, Clone)]
pub(crate) struct ActLog {
    al_extents: u32,
    ring: u32,
    slots: Vec<u32>,
    last_use: Vec<u64>,
    /// Writes in flight per slot (`activate_pinned` .. `release`): a pinned extent is never
    /// evicted.
    pins: Vec<u32>,
    slot_of: HashMap<u32, u32>,
    /// Free slots; the next one to use is at the end.
    free: Vec<u32>,
    tick: u64,
    next_tr: u64,
    cursor: u32,
}

impl ActLog {
    /// An empty log whose next transaction gets number `next_tr`.
    pub fn new(al_extents: u32, next_tr: u64) -> Self {
        ActLog {
            al_extents,
            ring: ring_blocks(al_extents),
            slots: vec![EMPTY; al_extents as usize],
            last_use: vec![0; al_extents as usize],
            pins: vec![0; al_extents as usize],
            slot_of: HashMap::new(),
            free: (0..al_extents).rev().collect(),
            tick: 0,
            next_tr,
            cursor: 0,
        }
    }

    #[cfg(test)]
    pub fn ring(&self) -> u32 {
        self.ring
    }

    /// Ring position of transaction `tr`.
    pub fn position(&self, tr: u64) -> u32 {
        (tr % self.ring as u64) as u32
    }

    pub fn next_tr(&self) -> u64 {
        self.next_tr
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    pub fn is_hot(&self, extent: u32) -> bool {
        self.slot_of.contains_key(&extent)
    }

    pub fn hot_extents(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.slot_of.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// A new LRU time stamp for one `activate` call.
    pub fn begin(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Refresh a hot extent's LRU stamp; false if it is cold.
    pub fn touch(&mut self, extent: u32, now: u64) -> bool {
        match self.slot_of.get(&extent) {
            Some(&slot) => {
                self.last_use[slot as usize] = now;
                true
            }
            None => false,
        }
    }

    /// Pin a hot extent (one more write in flight). False if it is cold.
    pub fn pin(&mut self, extent: u32) -> bool {
        match self.slot_of.get(&extent) {
            Some(&slot) => {
                self.pins[slot as usize] += 1;
                true
            }
            None => false,
        }
    }

    /// Undo one `pin`; false if the extent is cold or not pinned.
    pub fn unpin(&mut self, extent: u32) -> bool {
        match self.slot_of.get(&extent) {
            Some(&slot) if self.pins[slot as usize] > 0 => {
                self.pins[slot as usize] -= 1;
                true
            }
            _ => false,
        }
    }

    /// Slots `plan` could use now: free ones and evictable ones.
    pub fn available(&self, now: u64) -> usize {
        self.free.len()
            + (0..self.al_extents as usize)
                .filter(|&s| self.slots[s] != EMPTY && self.last_use[s] < now && self.pins[s] == 0)
                .count()
    }

    pub fn pinned(&self) -> usize {
        self.pins.iter().filter(|&&p| p > 0).count()
    }

    /// Choose slots for the cold extents `cold` (≤ 64): free slots first, then the least
    /// recently used slots that are not pinned and not stamped `now`. `None` if there are not
    /// enough such slots.
    pub fn plan(&self, cold: &[u32], now: u64) -> Option<Vec<Assign>> {
        assert!(cold.len() <= UPDATES_PER_TX);
        let from_free = cold.len().min(self.free.len());
        let mut slots: Vec<u32> = self.free.iter().rev().take(from_free).copied().collect();
        let need = cold.len() - from_free;
        if need > 0 {
            let mut lru: Vec<(u64, u32)> = (0..self.al_extents)
                .filter(|&s| {
                    let s = s as usize;
                    self.slots[s] != EMPTY && self.last_use[s] < now && self.pins[s] == 0
                })
                .map(|s| (self.last_use[s as usize], s))
                .collect();
            if lru.len() < need {
                return None;
            }
            if lru.len() > need {
                lru.select_nth_unstable(need - 1);
                lru.truncate(need);
            }
            lru.sort_unstable();
            slots.extend(lru.into_iter().map(|(_, s)| s));
        }
        Some(
            cold.iter()
                .zip(slots)
                .map(|(&extent, slot)| Assign {
                    slot,
                    extent,
                    evicted: self.slots[slot as usize],
                })
                .collect(),
        )
    }

    /// The transaction that records `plan` (the next number, the next context window).
    pub fn build(&self, plan: &[Assign]) -> Transaction {
        let n = context_len(self.al_extents);
        let context = (0..n)
            .map(|i| {
                let slot = (self.cursor + i) % self.al_extents;
                plan.iter()
                    .find(|a| a.slot == slot)
                    .map_or(self.slots[slot as usize], |a| a.extent)
            })
            .collect();
        Transaction {
            tr: self.next_tr,
            kind: TxKind::Update,
            updates: plan.iter().map(|a| (a.slot, a.extent)).collect(),
            context_start: self.cursor,
            context,
        }
    }

    /// A transaction that empties the log.
    pub fn build_reset(&self) -> Transaction {
        Transaction {
            tr: self.next_tr,
            kind: TxKind::Reset,
            updates: Vec::new(),
            context_start: self.cursor,
            context: vec![EMPTY; context_len(self.al_extents) as usize],
        }
    }

    /// After a transaction that may or may not be on disk (its write or fdatasync failed):
    /// the file holds either it or what its slot held before, so an extent counts as hot
    /// only if it is hot in both. The extents `plan` evicted become cold and their slots
    /// free; the new ones stay cold. The number and ring position stay, so the next
    /// transaction overwrites whichever of the two the file holds.
    pub fn forget_evicted(&mut self, plan: &[Assign]) {
        for a in plan.iter().filter(|a| a.evicted != EMPTY) {
            self.release_slot(a.slot);
        }
    }

    /// After a reset transaction that may or may not be on disk: nothing is hot for sure.
    pub fn forget_all(&mut self) {
        for slot in 0..self.al_extents {
            if self.slots[slot as usize] != EMPTY {
                self.release_slot(slot);
            }
        }
    }

    fn release_slot(&mut self, slot: u32) {
        let old = std::mem::replace(&mut self.slots[slot as usize], EMPTY);
        self.slot_of.remove(&old);
        self.pins[slot as usize] = 0;
        self.free.push(slot);
    }

    /// Apply a transaction built by `build`/`build_reset` once it is on disk.
    pub fn commit(&mut self, tx: &Transaction, now: u64) {
        debug_assert_eq!(tx.tr, self.next_tr);
        if tx.kind == TxKind::Reset {
            self.slots.fill(EMPTY);
            self.slot_of.clear();
            self.free = (0..self.al_extents).rev().collect();
            self.pins.fill(0);
        }
        for &(slot, extent) in &tx.updates {
            let old = self.slots[slot as usize];
            if old == EMPTY {
                // `plan` takes free slots from the end: found at once.
                if let Some(i) = self.free.iter().rposition(|&s| s == slot) {
                    self.free.remove(i);
                }
            } else {
                self.slot_of.remove(&old);
            }
            self.pins[slot as usize] = 0;
            self.slots[slot as usize] = extent;
            self.slot_of.insert(extent, slot);
            self.last_use[slot as usize] = now;
        }
        self.next_tr += 1;
        self.cursor = (self.cursor + tx.context.len() as u32) % self.al_extents;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD: u64 = 0x1234;

    #[test]
    fn sizes() {
        assert_eq!(CONTEXT_PER_TX, 880);
        assert_eq!(ring_blocks(67), 8);
        assert_eq!(ring_blocks(1237), 8);
        assert_eq!(ring_blocks(6160), 8);
        assert_eq!(ring_blocks(6161), 9);
        assert_eq!(ring_blocks(65534), 76);
        for al in [67, 880, 881, 1237, 6161, 65534] {
            assert!((ring_blocks(al) - 1) * context_len(al) >= al);
        }
    }

    #[test]
    fn encode_decode() {
        let tx = Transaction {
            tr: 77,
            kind: TxKind::Update,
            updates: vec![(3, 9), (66, 0)],
            context_start: 5,
            context: (0..67)
                .map(|i| if i % 3 == 0 { EMPTY } else { i })
                .collect(),
        };
        let b = tx.encode(MD, 67);
        assert_eq!(Transaction::decode(&b, MD, 67, 100), Ok(tx.clone()));
        assert!(matches!(
            Transaction::decode(&b, MD + 1, 67, 100),
            Err(TxFault::Invalid(_))
        ));
        assert!(matches!(
            Transaction::decode(&b, MD, 68, 100),
            Err(TxFault::Invalid(_))
        ));
        // Extent 66 in the context is beyond a 50-extent device.
        assert!(matches!(
            Transaction::decode(&b, MD, 67, 50),
            Err(TxFault::Invalid(_))
        ));
        for pos in [0, 8, 13, 20, 30, 64, 575, 576, 4095] {
            let mut c = b.clone();
            c[pos] ^= 4;
            assert_eq!(
                Transaction::decode(&c, MD, 67, 100),
                Err(TxFault::BadChecksum)
            );
        }
        let mut c = b.clone();
        c[1000] ^= 1;
        assert_eq!(Transaction::salvage_updates(&c, MD, 77, 100), vec![9, 0]);
        assert_eq!(
            Transaction::salvage_updates(&c, MD, 78, 100),
            Vec::<u32>::new()
        );
    }

    /// Found by the `meta_blocks` fuzz target: a checksum-valid transaction with bytes in an
    /// unused update entry decoded, so `encode(decode(b)) != b`.
    #[test]
    fn unused_bytes_must_be_zero() {
        let tx = Transaction {
            tr: 9,
            kind: TxKind::Update,
            updates: vec![(3, 9)],
            context_start: 0,
            context: vec![EMPTY; 67],
        };
        let b = tx.encode(MD, 67);
        // Reserved header bytes, the second (unused) update, past the 67 context entries.
        for pos in [
            42,
            63,
            UPDATES_OFF + 8,
            188,
            CONTEXT_OFF - 1,
            CONTEXT_OFF + 67 * 4,
            4095,
        ] {
            let mut c = b.clone();
            c[pos] = 1;
            let crc = block_crc(&c, CRC_OFF);
            put_u32(&mut c, CRC_OFF, crc);
            match Transaction::decode(&c, MD, 67, 100) {
                Err(TxFault::Invalid(m)) => assert!(m.contains("non-zero byte"), "{pos}: {m}"),
                other => panic!("byte {pos}: {other:?}"),
            }
        }
        assert_eq!(Transaction::decode(&b, MD, 67, 100), Ok(tx));
    }

    /// Found by the `meta_blocks` fuzz target: a ring of checksum-valid transactions numbered
    /// up to `u64::MAX` overflowed `newest + 1` (a panic with overflow checks; a wrong frontier
    /// and replay order without), and `open` computed `newest + 1` again for the next number.
    #[test]
    fn transaction_numbers_near_the_end_are_corrupt() {
        let (ring, _) = fresh_ring(67);
        for top in [u64::MAX, u64::MAX - 3, MAX_TR + 8] {
            let n = ring.len() as u64;
            let newest = top - (top % n + n - 7) % n;
            let renumbered: Vec<Vec<u8>> = (0..n)
                .map(|pos| {
                    let tx = Transaction {
                        tr: newest - (7 - pos),
                        kind: TxKind::Reset,
                        updates: vec![],
                        context_start: 0,
                        context: vec![EMPTY; 67],
                    };
                    tx.encode(MD, 67)
                })
                .collect();
            let err = scan(&renumbered, 67, true).unwrap_err();
            assert!(err.1.contains("beyond the largest possible"), "{err:?}");
        }
        let tx = Transaction {
            tr: MAX_TR,
            ..fresh_ring(67).1.build_reset()
        };
        assert!(Transaction::decode(&tx.encode(MD, 67), MD, 67, 100).is_ok());
    }

    /// Write transactions of `log` into an in-memory ring, as the file layer does.
    fn write(ring: &mut [Vec<u8>], log: &mut ActLog, tx: &Transaction, now: u64) {
        let pos = log.position(tx.tr) as usize;
        ring[pos] = tx.encode(MD, log.al_extents);
        log.commit(tx, now);
    }

    fn fresh_ring(al: u32) -> (Vec<Vec<u8>>, ActLog) {
        let n = ring_blocks(al);
        let mut ring = vec![vec![0u8; BLOCK_SIZE]; n as usize];
        let mut log = ActLog::new(al, 0);
        for _ in 0..n {
            let tx = log.build_reset();
            write(&mut ring, &mut log, &tx, 0);
        }
        (ring, log)
    }

    fn scan(ring: &[Vec<u8>], al: u32, tolerate: bool) -> Result<RingState, (u32, String)> {
        let refs: Vec<&[u8]> = ring.iter().map(|b| b.as_slice()).collect();
        scan_ring(&refs, MD, al, 10_000, tolerate)
    }

    fn activate(ring: &mut [Vec<u8>], log: &mut ActLog, extents: &[u32]) -> Vec<Assign> {
        let now = log.begin();
        let cold: Vec<u32> = extents
            .iter()
            .copied()
            .filter(|&e| !log.touch(e, now))
            .collect();
        let mut all = Vec::new();
        for chunk in cold.chunks(UPDATES_PER_TX) {
            let plan = log.plan(chunk, now).unwrap();
            let tx = log.build(&plan);
            write(ring, log, &tx, now);
            all.extend(plan);
        }
        all
    }

    #[test]
    fn replay_matches_memory_through_many_transactions() {
        for al in [67u32, 900, 2000] {
            let (mut ring, mut log) = fresh_ring(al);
            let mut x = 12345u64;
            for step in 0..400 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let e = ((x >> 33) % 5000) as u32;
                let n = 1 + (x >> 20) as u32 % 3;
                let extents: Vec<u32> = (e..e + n).collect();
                activate(&mut ring, &mut log, &extents);
                let st = scan(&ring, al, false).unwrap();
                assert_eq!(st.hot, log.hot_extents(), "al {al} step {step}");
                assert_eq!(st.newest + 1, log.next_tr());
                assert!(st.torn.is_none());
            }
        }
    }

    #[test]
    fn lru_eviction() {
        let (mut ring, mut log) = fresh_ring(67);
        for e in 0..67 {
            assert_eq!(activate(&mut ring, &mut log, &[e])[0].evicted, EMPTY);
        }
        // Touch extent 0 so 1 is the least recently used.
        assert!(activate(&mut ring, &mut log, &[0]).is_empty());
        let a = activate(&mut ring, &mut log, &[100]);
        assert_eq!(a[0].evicted, 1);
        assert!(!log.is_hot(1));
        assert!(log.is_hot(0) && log.is_hot(100));
        // A range never evicts its own extents, even when it fills the whole log.
        let range: Vec<u32> = (200..267).collect();
        let a = activate(&mut ring, &mut log, &range);
        assert_eq!(a.len(), 67);
        assert!(range.iter().all(|&e| log.is_hot(e)));
        assert_eq!(scan(&ring, 67, false).unwrap().hot, range);
    }

    #[test]
    fn pinned_extents_are_not_evicted() {
        let (mut ring, mut log) = fresh_ring(67);
        for e in 0..67 {
            activate(&mut ring, &mut log, &[e]);
        }
        assert!(log.pin(0) && log.pin(0) && log.pin(1));
        assert!(!log.pin(500));
        assert_eq!(activate(&mut ring, &mut log, &[100])[0].evicted, 2);
        assert!(log.unpin(0));
        assert_eq!(activate(&mut ring, &mut log, &[101])[0].evicted, 3);
        assert!(log.unpin(0) && !log.unpin(0));
        assert_eq!(log.pinned(), 1);
        assert_eq!(activate(&mut ring, &mut log, &[102])[0].evicted, 0);
        // Everything pinned: no plan.
        for e in log.hot_extents() {
            log.pin(e);
        }
        let now = log.begin();
        assert_eq!(log.plan(&[103], now), None);
    }

    #[test]
    fn reset_empties() {
        let (mut ring, mut log) = fresh_ring(67);
        activate(&mut ring, &mut log, &[1, 2, 3]);
        let tx = log.build_reset();
        write(&mut ring, &mut log, &tx, 0);
        assert!(log.is_empty());
        assert_eq!(scan(&ring, 67, false).unwrap().hot, Vec::<u32>::new());
        activate(&mut ring, &mut log, &[5]);
        assert_eq!(scan(&ring, 67, false).unwrap().hot, vec![5]);
    }

    #[test]
    fn torn_frontier_is_tolerated_only_when_unclean() {
        let (mut ring, mut log) = fresh_ring(67);
        activate(&mut ring, &mut log, &[1]);
        activate(&mut ring, &mut log, &[2]);
        let before = log.clone();
        activate(&mut ring, &mut log, &[3]);
        let newest_pos = log.position(log.next_tr() - 1) as usize;
        ring[newest_pos][2000] ^= 1;
        let st = scan(&ring, 67, true).unwrap();
        assert_eq!(st.hot, before.hot_extents());
        assert_eq!(st.torn, Some((newest_pos as u32, vec![3])));
        let err = scan(&ring, 67, false).unwrap_err();
        assert_eq!(err.0, newest_pos as u32);
        assert!(err.1.contains("bad checksum"));
    }

    #[test]
    fn bad_blocks_elsewhere_are_corrupt() {
        let (mut ring, mut log) = fresh_ring(67);
        for e in 0..5 {
            activate(&mut ring, &mut log, &[e]);
        }
        let newest = log.next_tr() - 1;
        let n = log.ring() as u64;
        // Every position except the newest and the frontier must be valid.
        for back in 1..n - 1 {
            let pos = log.position(newest - back) as usize;
            let mut r = ring.clone();
            r[pos][100] ^= 0x80;
            let err = scan(&r, 67, true).unwrap_err();
            assert_eq!(err.0, pos as u32, "back {back}");
        }
        // A stale (older) but valid block in the middle of the ring.
        let mut r = ring.clone();
        let pos = log.position(newest - 2) as usize;
        let stale = Transaction {
            tr: newest - 2 - n,
            ..log.build_reset()
        };
        r[pos] = stale.encode(MD, 67);
        assert!(scan(&r, 67, true)
            .unwrap_err()
            .1
            .contains("out of sequence"));
        // Misplaced.
        let mut r = ring.clone();
        r[0] = Transaction {
            tr: 1,
            ..log.build_reset()
        }
        .encode(MD, 67);
        assert!(scan(&r, 67, true)
            .unwrap_err()
            .1
            .contains("belongs in ring position"));
    }
}
