//! tandem: a DRBD-style replicated block device exported over NBD.

pub mod cli;
pub mod nbd;
pub mod store;
pub mod units;
