//! tandem: a DRBD-style replicated block device exported over NBD.

pub mod store;
