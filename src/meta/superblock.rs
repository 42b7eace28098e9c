//! Block 0 of the meta file: the superblock, and the layout it implies.
//!
//! All fields live in the first 512 bytes; the rest of the 4 KiB block is zero. An in-place
//! rewrite therefore changes only the first sector, which storage writes atomically (the same
//! assumption DRBD makes for its superblock): a crash leaves either the old or the new
//! superblock, never a torn one. The CRC32 covers the whole 4 KiB block with the CRC field
//! zeroed.
//!
//! ```text
//!   0  magic "TANDEMmd"         8  format version u32    12  crc32 u32
//!  16  md_id u64 (random, also in every AL and bitmap block)
//!  24  size u64 (device bytes)
//!  32  generation current, bitmap, history0, history1 (4 x u64)
//!  64  flags u32                68  bytes_per_bit u32 (4096)
//!  72  epoch u64                80  al_extents u32       84  al ring blocks u32
//!  88  al_offset u64 (block)    96  bm_offset u64       104  bm_blocks u64
//! 112  boot id [16] (the kernel's, when the node last opened the file; zero: unknown)
//! 128  resource name [64] (UTF-8, zero padded)   192  node name [64]
//! 256  primary epoch u64 (the epoch of the node's last promotion; zero: never)
//! 264..4096  zero
//! ```
//! All integers are little-endian.

use serde::Serialize;

use super::gen::Generations;

pub const BLOCK_SIZE: usize = 4096;
pub(crate) const SB_MAGIC: [u8; 8] = *b"TANDEMmd";
pub const FORMAT_VERSION: u32 = 1;
/// One bitmap bit covers this many bytes of the device.
pub const BYTES_PER_BIT: u32 = 4096;
/// Activity-log extent: 4 MiB.
pub const EXTENT_SHIFT: u32 = 22;
pub const EXTENT_SIZE: u64 = 1 << EXTENT_SHIFT;
pub const BITS_PER_EXTENT: u64 = EXTENT_SIZE / BYTES_PER_BIT as u64;
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
pub const MIN_AL_EXTENTS: u32 = 67;
pub const MAX_AL_EXTENTS: u32 = 65534;
/// The largest device supported: the bitmap is kept in memory (128 MiB at 4 TiB).
pub const MAX_DEVICE_SIZE: u64 = 4 << 40;
/// Longest resource or node name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

const SB_CRC_OFF: usize = 12;
const RESOURCE_OFF: usize = 128;
const NODE_OFF: usize = 192;
const BOOT_ID_OFF: usize = 112;
const PRIMARY_EPOCH_OFF: usize = NODE_OFF + MAX_NAME_LEN;
/// Bytes of block 0 that hold no field and must be zero.
const RESERVED: std::ops::Range<usize> = PRIMARY_EPOCH_OFF + 8..BLOCK_SIZE;

/// CRC32 of a block whose 4-byte CRC field at `crc_off` counts as zero.
pub(crate) fn block_crc(buf: &[u8], crc_off: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..crc_off]);
    h.update(&[0u8; 4]);
    h.update(&buf[crc_off + 4..]);
    h.finalize()
}

pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Persistent per-node flags (DRBD's `MDF_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MetaFlags {
    /// The local data is consistent (not in the middle of being a sync target).
    pub consistent: bool,
    /// The data was UpToDate when last known (consistent but not this → Outdated).
    pub was_up_to_date: bool,
    /// Set while this node is Primary; a crash leaves it set. `open` clears it (a node always
    /// starts as Secondary) after turning it into `crashed_primary` when the shutdown was unclean.
    pub was_primary: bool,
    /// The node crashed while Primary; cleared by the runtime once both disks are UpToDate.
    pub crashed_primary: bool,
    /// The peer's disk is known to be Outdated (fenced).
    pub peer_outdated: bool,
    /// The metadata was closed cleanly: bitmap flushed, activity log empty. Managed by
    /// `Meta` itself (`open` clears it, `close_clean` sets it); `update` may not change it.
    pub al_clean: bool,
    /// A full sync was requested and has not completed yet.
    pub full_sync: bool,
    /// Consistent but known stale: the peer went on without this node (fenced, or superseded
    /// as primary). Never promoted automatically; cleared when a resync makes it UpToDate.
    pub outdated: bool,
    /// The machine went down while the node ran (the boot id changed across an unclean
    /// shutdown): writes it acknowledged may have been lost with the page cache, and it
    /// cannot tell which. Set with `outdated`; cleared by the full resync that follows.
    pub rolled_back: bool,
    /// The link was lost while the peer had not flushed writes this node acknowledged (they
    /// are marked out of sync): flushes this node acknowledged since may be durable only
    /// here. Cleared when a resync ends.
    pub peer_unflushed: bool,
}

const FLAG_BITS: [(u32, &str); 10] = [
    (1 << 0, "consistent"),
    (1 << 1, "was_up_to_date"),
    (1 << 2, "was_primary"),
    (1 << 3, "crashed_primary"),
    (1 << 4, "peer_outdated"),
    (1 << 5, "al_clean"),
    (1 << 6, "full_sync"),
    (1 << 7, "outdated"),
    (1 << 8, "rolled_back"),
    (1 << 9, "peer_unflushed"),
];

impl MetaFlags {
    fn fields(&self) -> [bool; 10] {
        [
            self.consistent,
            self.was_up_to_date,
            self.was_primary,
            self.crashed_primary,
            self.peer_outdated,
            self.al_clean,
            self.full_sync,
            self.outdated,
            self.rolled_back,
            self.peer_unflushed,
        ]
    }

    pub fn to_bits(&self) -> u32 {
        self.fields()
            .iter()
            .zip(FLAG_BITS.iter())
            .filter(|(on, _)| **on)
            .fold(0, |acc, (_, (bit, _))| acc | bit)
    }

    /// `None` if `bits` holds a flag this version does not know.
    pub fn from_bits(bits: u32) -> Option<Self> {
        let known = FLAG_BITS.iter().fold(0, |acc, (b, _)| acc | b);
        if bits & !known != 0 {
            return None;
        }
        let on = |i: usize| bits & FLAG_BITS[i].0 != 0;
        Some(Self {
            consistent: on(0),
            was_up_to_date: on(1),
            was_primary: on(2),
            crashed_primary: on(3),
            peer_outdated: on(4),
            al_clean: on(5),
            full_sync: on(6),
            outdated: on(7),
            rolled_back: on(8),
            peer_unflushed: on(9),
        })
    }

    /// Names of the flags that are set, in bit order.
    pub fn names(&self) -> Vec<&'static str> {
        self.fields()
            .iter()
            .zip(FLAG_BITS.iter())
            .filter(|(on, _)| **on)
            .map(|(_, (_, name))| *name)
            .collect()
    }
}

/// The superblock as the node runtime sees it. `resource`, `node`, `size`, `bytes_per_bit`,
/// `al_extents`, `md_id` and `flags.al_clean` are fixed (or managed by `Meta`); `update` refuses
/// to change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub resource: String,
    pub node: String,
    /// Device size in bytes.
    pub size: u64,
    pub gens: Generations,
    pub flags: MetaFlags,
    /// Fencing epoch (see the witness).
    pub epoch: u64,
    pub bytes_per_bit: u32,
    pub al_extents: u32,
    /// Random identity of this metadata instance (chosen by `create`); every block carries it,
    /// so blocks left over from an earlier `create-md` are never mistaken for current ones.
    pub md_id: u64,
    /// The kernel's boot id when the node last opened the metadata (zero: unknown). An
    /// unclean shutdown under another boot id means the machine went down, page cache and all.
    pub boot_id: [u8; 16],
    /// The epoch this node was last promoted in (zero: never). Unlike `epoch`, which rises
    /// to whatever a peer announces, it still says when a crashed primary served.
    pub primary_epoch: u64,
}

/// Where everything is, derived from the device size and `al_extents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    /// Bitmap bits (4 KiB blocks of the device, the last one possibly partial).
    pub nbits: u64,
    pub n_extents: u64,
    pub al_extents: u32,
    pub al_offset: u64,
    pub al_blocks: u32,
    pub bm_offset: u64,
    pub bm_blocks: u64,
}

impl Layout {
    pub fn new(size: u64, al_extents: u32) -> Self {
        let nbits = size.div_ceil(BYTES_PER_BIT as u64);
        let al_blocks = super::actlog::ring_blocks(al_extents);
        let al_offset = 1;
        Layout {
            size,
            nbits,
            n_extents: size.div_ceil(EXTENT_SIZE),
            al_extents,
            al_offset,
            al_blocks,
            bm_offset: al_offset + al_blocks as u64,
            bm_blocks: nbits.div_ceil(super::bitmap::BITS_PER_BLOCK),
        }
    }

    /// Blocks in the meta file.
    pub fn total_blocks(&self) -> u64 {
        self.bm_offset + self.bm_blocks
    }

    /// Which region block `b` belongs to.
    pub fn region(&self, b: u64) -> &'static str {
        if b == 0 {
            "superblock"
        } else if b < self.bm_offset {
            "activity log"
        } else {
            "bitmap"
        }
    }
}

/// Arguments `create` accepts; the same checks guard what `open` reads.
pub(crate) fn check_geometry(size: u64, al_extents: u32) -> Result<(), String> {
    if size == 0 {
        return Err("device size must be greater than 0".into());
    }
    if size > MAX_DEVICE_SIZE {
        return Err(format!(
            "device size {size} bytes exceeds the supported maximum of {MAX_DEVICE_SIZE} bytes (4 TiB)"
        ));
    }
    if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&al_extents) {
        return Err(format!(
            "al-extents {al_extents} is outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}"
        ));
    }
    Ok(())
}

pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{kind} name {name:?} is longer than {MAX_NAME_LEN} bytes"
        ));
    }
    if name.contains('\0') {
        return Err(format!("{kind} name {name:?} contains a NUL byte"));
    }
    Ok(())
}

/// Why block 0 could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SbFault {
    /// No tandem magic: not our file at all.
    NotTandem,
    /// Our magic, but the block is damaged or inconsistent.
    Corrupt(String),
}

impl Superblock {
    pub(crate) fn layout(&self) -> Layout {
        Layout::new(self.size, self.al_extents)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let layout = self.layout();
        let mut b = vec![0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u64(&mut b, 16, self.md_id);
        put_u64(&mut b, 24, self.size);
        put_u64(&mut b, 32, self.gens.current);
        put_u64(&mut b, 40, self.gens.bitmap);
        put_u64(&mut b, 48, self.gens.history[0]);
        put_u64(&mut b, 56, self.gens.history[1]);
        put_u32(&mut b, 64, self.flags.to_bits());
        put_u32(&mut b, 68, self.bytes_per_bit);
        put_u64(&mut b, 72, self.epoch);
        put_u32(&mut b, 80, self.al_extents);
        put_u32(&mut b, 84, layout.al_blocks);
        put_u64(&mut b, 88, layout.al_offset);
        put_u64(&mut b, 96, layout.bm_offset);
        put_u64(&mut b, 104, layout.bm_blocks);
        b[BOOT_ID_OFF..BOOT_ID_OFF + 16].copy_from_slice(&self.boot_id);
        put_u64(&mut b, PRIMARY_EPOCH_OFF, self.primary_epoch);
        b[RESOURCE_OFF..RESOURCE_OFF + self.resource.len()]
            .copy_from_slice(self.resource.as_bytes());
        b[NODE_OFF..NODE_OFF + self.node.len()].copy_from_slice(self.node.as_bytes());
        let crc = block_crc(&b, SB_CRC_OFF);
        put_u32(&mut b, SB_CRC_OFF, crc);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Superblock, SbFault> {
        if b.len() < BLOCK_SIZE || b[0..8] != SB_MAGIC {
            return Err(SbFault::NotTandem);
        }
        let b = &b[..BLOCK_SIZE];
        if get_u32(b, SB_CRC_OFF) != block_crc(b, SB_CRC_OFF) {
            return Err(SbFault::Corrupt("has a bad checksum".into()));
        }
        let bad = |s: String| Err(SbFault::Corrupt(s));
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return bad(format!(
                "has format version {version}; this tandem reads version {FORMAT_VERSION}"
            ));
        }
        let name = |off: usize, kind: &str| -> Result<String, SbFault> {
            let raw = &b[off..off + MAX_NAME_LEN];
            let len = raw.iter().position(|&c| c == 0).unwrap_or(MAX_NAME_LEN);
            if raw[len..].iter().any(|&c| c != 0) {
                return Err(SbFault::Corrupt(format!(
                    "has garbage after the {kind} name"
                )));
            }
            let s = std::str::from_utf8(&raw[..len])
                .map_err(|_| SbFault::Corrupt(format!("has a {kind} name that is not UTF-8")))?;
            check_name(kind, s).map_err(|e| SbFault::Corrupt(format!("is invalid: {e}")))?;
            Ok(s.to_string())
        };
        // A checksum-valid block with anything in the reserved bytes was not written by this
        // version: its fields cannot be trusted to mean what we read.
        if let Some(off) = RESERVED.clone().find(|&i| b[i] != 0) {
            return bad(format!(
                "has non-zero reserved byte {off} (bytes 256..4096 must be zero)"
            ));
        }
        let flags_bits = get_u32(b, 64);
        let Some(flags) = MetaFlags::from_bits(flags_bits) else {
            return bad(format!("has unknown flag bits {flags_bits:#x}"));
        };
        let sb = Superblock {
            resource: name(RESOURCE_OFF, "resource")?,
            node: name(NODE_OFF, "node")?,
            size: get_u64(b, 24),
            gens: Generations {
                current: get_u64(b, 32),
                bitmap: get_u64(b, 40),
                history: [get_u64(b, 48), get_u64(b, 56)],
            },
            flags,
            epoch: get_u64(b, 72),
            bytes_per_bit: get_u32(b, 68),
            al_extents: get_u32(b, 80),
            md_id: get_u64(b, 16),
            boot_id: b[BOOT_ID_OFF..BOOT_ID_OFF + 16].try_into().unwrap(),
            primary_epoch: get_u64(b, PRIMARY_EPOCH_OFF),
        };
        if sb.bytes_per_bit != BYTES_PER_BIT {
            return bad(format!(
                "has {} bytes per bitmap bit; only {BYTES_PER_BIT} is supported",
                sb.bytes_per_bit
            ));
        }
        if let Err(e) = check_geometry(sb.size, sb.al_extents) {
            return bad(format!("is invalid: {e}"));
        }
        let l = sb.layout();
        let stored = (
            get_u32(b, 84),
            get_u64(b, 88),
            get_u64(b, 96),
            get_u64(b, 104),
        );
        if stored != (l.al_blocks, l.al_offset, l.bm_offset, l.bm_blocks) {
            return bad(format!(
                "has a layout (al blocks {}, al offset {}, bitmap offset {}, bitmap blocks {}) \
                 that does not match its size and al-extents",
                stored.0, stored.1, stored.2, stored.3
            ));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            resource: "r0".into(),
            node: "alpha".into(),
            size: (1 << 30) + 1000,
            gens: Generations {
                current: 0x6A0F_0000_1234_5679,
                bitmap: 0x1111_2222_3333_4444,
                history: [0x5555_6666_7777_8888, 4],
            },
            flags: MetaFlags {
                consistent: true,
                crashed_primary: true,
                full_sync: true,
                ..Default::default()
            },
            epoch: 7,
            bytes_per_bit: BYTES_PER_BIT,
            al_extents: DEFAULT_AL_EXTENTS,
            md_id: 0xdead_beef_cafe_f00d,
            boot_id: *b"0123456789abcdef",
            primary_epoch: 6,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let b = sb.encode();
        assert_eq!(b.len(), BLOCK_SIZE);
        assert!(
            b[512..].iter().all(|&c| c == 0),
            "fields stay in the first sector"
        );
        assert_eq!(Superblock::decode(&b), Ok(sb));
    }

    #[test]
    fn flags_bits_round_trip() {
        for bits in 0..(1u32 << 10) {
            let f = MetaFlags::from_bits(bits).unwrap();
            assert_eq!(f.to_bits(), bits);
            assert_eq!(f.names().len(), bits.count_ones() as usize);
        }
        assert_eq!(MetaFlags::from_bits(1 << 10), None);
    }

    #[test]
    fn every_byte_is_covered() {
        let b = sample().encode();
        for pos in [
            8, 12, 16, 31, 40, 64, 70, 85, 100, 130, 200, 300, 511, 512, 2048, 4095,
        ] {
            let mut c = b.clone();
            c[pos] ^= 0x40;
            assert!(
                matches!(Superblock::decode(&c), Err(SbFault::Corrupt(_))),
                "flip at {pos} not detected"
            );
        }
        let mut c = b.clone();
        c[3] ^= 1;
        assert_eq!(Superblock::decode(&c), Err(SbFault::NotTandem));
        assert_eq!(Superblock::decode(&[0u8; 100]), Err(SbFault::NotTandem));
    }

    /// Found by the `meta_blocks` fuzz target: a superblock with a valid checksum and bytes
    /// in the reserved areas decoded, so `encode(decode(b)) != b`.
    #[test]
    fn reserved_bytes_must_be_zero() {
        for pos in [264, 511, 512, 4095] {
            let mut c = sample().encode();
            c[pos] = 1;
            let crc = block_crc(&c, SB_CRC_OFF);
            put_u32(&mut c, SB_CRC_OFF, crc);
            match Superblock::decode(&c) {
                Err(SbFault::Corrupt(m)) => assert!(m.contains("reserved byte"), "{pos}: {m}"),
                other => panic!("byte {pos}: {other:?}"),
            }
        }
    }

    #[test]
    fn layout_numbers() {
        let l = Layout::new(1 << 30, DEFAULT_AL_EXTENTS);
        assert_eq!(l.nbits, 262_144);
        assert_eq!(l.n_extents, 256);
        assert_eq!(l.al_offset, 1);
        assert_eq!(l.bm_offset, 1 + l.al_blocks as u64);
        assert_eq!(
            l.bm_blocks,
            262_144u64.div_ceil(crate::meta::bitmap::BITS_PER_BLOCK)
        );
        assert_eq!(l.region(0), "superblock");
        assert_eq!(l.region(1), "activity log");
        assert_eq!(l.region(l.bm_offset), "bitmap");
        // A partial last 4 KiB block still gets a bit.
        assert_eq!(Layout::new(4097, 67).nbits, 2);
        assert_eq!(Layout::new(4097, 67).n_extents, 1);
    }

    #[test]
    fn geometry_limits() {
        assert!(check_geometry(0, 1237).is_err());
        assert!(check_geometry(MAX_DEVICE_SIZE, 1237).is_ok());
        assert!(check_geometry(MAX_DEVICE_SIZE + 1, 1237).is_err());
        assert!(check_geometry(1 << 30, 66).is_err());
        assert!(check_geometry(1 << 30, 65535).is_err());
        assert!(check_name("node", &"x".repeat(64)).is_ok());
        assert!(check_name("node", &"x".repeat(65)).is_err());
        assert!(check_name("node", "").is_err());
    }
}
