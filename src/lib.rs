//! tandem: a DRBD-style replicated block device exported over NBD.

pub mod attach;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod failure;
pub mod fence;
#[doc(hidden)]
pub mod fuzzing;
pub mod meta;
#[doc(hidden)]
pub mod mutation;
pub mod nbd;
pub mod node;
pub mod policy;
pub mod repl;
pub mod secret;
pub mod signals;
pub mod state;
pub mod store;
pub mod units;
pub mod witness;
