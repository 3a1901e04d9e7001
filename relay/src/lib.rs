//! `ferry-relay`: the relay binary's library half. From `main.rs`, the data path is two hops
//! away: [`worker`] (one pinned io_uring loop per core) calls its [`shards::SessionsHandler`],
//! whose [`shards::Sessions::handle`] runs [`session::check`] and then
//! [`session::SessionTable`] (protocol.md §7, sans-IO) for the datagram's session.
//!
//! - [`config`]: the TOML config, validated before it is applied (`check-config`, SIGHUP).
//! - [`session`]: the sans-IO session logic; [`limits`]: token buckets and per-source
//!   accounting.
//! - [`shards`]: the session tables shared by all workers, sharded by session id, and the
//!   workers' handler that drives them; [`security_log`]: refused binds and the like, logged
//!   at a bounded rate.
//! - [`uring`]: the unsafe io_uring plumbing (buffer ring, multishot recvmsg, sends), one module.
//! - [`worker`]: the per-core loop that drives a ring and the shared sessions.
//! - [`xdp`]: loads the XDP guard (`ebpf/xdp`), writes its limits and lists, reads its counters;
//!   [`ethtool`]: a device's driver and statistics, which it asks of a veth.
//! - [`metrics`], [`exporter`], [`admin`]: Prometheus text, the relay's page, and the loopback
//!   admin listener.

pub mod admin;
pub mod config;
pub mod ethtool;
pub mod exporter;
pub mod heartbeat;
pub mod limits;
pub mod metrics;
pub mod security_log;
pub mod session;
pub mod shards;
pub mod uring;
pub mod worker;
pub mod xdp;
