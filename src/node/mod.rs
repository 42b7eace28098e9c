//! The node: its state and the pure decisions that drive it (`decide`), the running node
//! (`runtime`, `failover`), its peer link (`handshake`, `dispatch`, `resync`), the store it
//! serves (`replicated`), its admin socket (`control`) and `up`.

pub mod control;
pub mod core;
pub mod decide;
mod dispatch;
pub mod duty;
pub mod failover;
mod handshake;
pub mod records;
pub mod replicated;
pub mod resync;
pub mod rules;
pub mod runtime;
pub mod up;

pub use crate::state::{DiskState, Role};
pub use handshake::run as run_link;
