//! Per-node metadata in the node's meta file: superblock with generations and flags, the
//! out-of-sync bitmap and the activity log, each block protected by a CRC32.
//!
//! File layout (4 KiB blocks, integers little-endian):
//!
//! | blocks | what |
//! |---|---|
//! | 0 | superblock ([`superblock`]): magic, version, md_id, names, size, generations, flags, epoch, geometry |
//! | 1 ..= R | activity-log ring of R transaction blocks ([`actlog`]; R = 8 for up to 6160 al-extents) |
//! | R+1 .. | bitmap blocks ([`bitmap`]): header + 496 words = 124 MiB of device each |
//!
//! Every block carries a CRC32 (crc32fast, the block with its CRC field zeroed) and every
//! AL and bitmap block carries the random `md_id` of its superblock and its own index.
//!
//! **What is corrupt.** A bad superblock is always `Corrupt` (its fields fit in one sector,
//! which is written atomically). After a clean shutdown every block must be valid. After an
//! unclean one, blocks a crash can have torn are tolerated and handled conservatively: the
//! newest AL transaction (ignored; replay uses the previous one) and bitmap blocks (all their
//! bits are set). Anything else that fails — a bad checksum elsewhere, a checksum-valid block
//! with wrong contents, an AL transaction out of sequence — is `Corrupt`, naming file and block.
//! Nothing is ever re-initialised.
//!
//! **Write ordering.** `update` makes the superblock durable before returning. `activate` writes
//! the bitmap blocks of evicted extents (+ fdatasync) before the AL transaction (+ fdatasync);
//! the caller writes data only after `activate` returned. The superblock says "not clean" before
//! any bitmap or AL block is written.

pub mod actlog;
pub mod bitmap;
mod error;
pub mod fault;
mod file;
pub mod gen;
pub mod superblock;

#[cfg(test)]
mod tests;

pub use error::MetaError;
pub use file::{boot_id, dump_file, parse_boot_id, Meta, MetaStats, Recovery, MAX_RUN};
pub use gen::Generations;
pub use superblock::{
    Layout, MetaFlags, Superblock, BYTES_PER_BIT, DEFAULT_AL_EXTENTS, EXTENT_SHIFT, EXTENT_SIZE,
    MAX_AL_EXTENTS, MAX_DEVICE_SIZE, MIN_AL_EXTENTS,
};
