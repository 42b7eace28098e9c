//! The peer link's transport: the wire protocol (`proto`), a link with its request and answer
//! bookkeeping (`link`, `requests`), range locks, and what the peer has not flushed. What a
//! node does with the link is in the `node` module.

pub mod link;
pub mod proto;
pub mod ranges;
pub mod requests;
pub mod unflushed;
