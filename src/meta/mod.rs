//! Per-node metadata in the node's meta file: superblock with generations and flags, the
//! out-of-sync bitmap and the activity log, each block protected by a CRC32.

pub mod gen;

pub use gen::Generations;
