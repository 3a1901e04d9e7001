//! `ferry-relay`: the relay binary's library half.
//!
//! - [`session`]: the sans-IO session table (what the relay does with each packet,
//!   docs/protocol.md §7). The io_uring workers of issue 5 drive it per datagram; the in-memory
//!   demo (`ferry-bench`'s `ferry-demo`) drives it today.

pub mod session;
