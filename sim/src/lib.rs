//! A deterministic simulator for tandem (issue 12): two nodes and a witness in a simulated
//! world of delays, partitions, one-way links, crashes, clock drift and lost caches, driven
//! from one seed, with the invariants of DESIGN.md checked after every step.
//!
//! What is real and what is simulated:
//! * **Real:** the node's state machine and its checked transition table (`node::core::State`),
//!   every failover decision (`node::rules`: holding a write, fencing on link loss, taking
//!   over, the lease, the witness's answers, the promotion's fence), what is recorded with
//!   each state change (`node::records`), the connect-time decision and what the link
//!   becomes (`node::decide`: generations, split brain, epochs, `plan`), the generations
//!   themselves (`meta::gen`), the metadata file with its superblock, bitmap and activity log
//!   and its crash recovery (`meta::Meta` on a file in a temporary directory), the unflushed
//!   set (`repl::unflushed`), and the witness's state machine
//!   (`witness::state::ResourceState`).
//! * **Simulated:** the network, the data disks (a page cache that a machine crash loses in
//!   part), the clocks, the client, and the node's IO shell: the order in which the runtime
//!   (`node/failover.rs`, `handshake.rs`, `dispatch.rs`, `resync.rs`, `replicated.rs`) calls
//!   those pieces is reproduced here as plain event handlers.

pub mod check;
pub mod node;
pub mod world;

pub use check::Outcome;
pub use node::{run, Options};
