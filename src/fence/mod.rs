//! Fencing: the witness client and the fence-peer handler.

pub mod handler;
pub mod witness_client;
