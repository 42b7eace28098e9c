//! Replication between the two nodes: the peer protocol, the link, range locks, the
//! replicated store the primary serves NBD from, resync and online verify.

pub mod link;
pub mod proto;
pub mod ranges;
pub mod replicated;
pub mod session;
pub mod unflushed;
