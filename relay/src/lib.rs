//! `ferry-relay`: the relay binary's library half. From `main.rs`, the data path is two hops
//! away: [`worker`] (one pinned io_uring loop per core) calls [`shards::Sessions::handle`],
//! which runs [`session::SessionTable`] (protocol.md §7, sans-IO) for the datagram's session.
//!
//! - [`config`]: the TOML config, validated before it is applied (`check-config`, SIGHUP).
//! - [`session`]: the sans-IO session table; [`limits`]: token buckets and per-IP accounting.
//! - [`shards`]: the session tables shared by all workers, sharded by session id.
//! - [`uring`]: the unsafe io_uring plumbing (buffer ring, multishot recvmsg, sends), one module.
//! - [`worker`]: the per-core loop that drives a ring and the shared sessions.
//! - [`xdp`]: loads the XDP guard (`ebpf/xdp`), writes its limits and lists, reads its counters.
//! - [`metrics`], [`exporter`], [`admin`]: Prometheus text, the relay's page, and the loopback
//!   admin listener.

pub mod admin;
pub mod config;
pub mod exporter;
pub mod limits;
pub mod metrics;
pub mod session;
pub mod shards;
pub mod uring;
pub mod worker;
pub mod xdp;
