//! `ferry-bench`: Ferry's benchmarks and its in-memory demo.
//!
//! - `benches/core.rs`: criterion micro-benchmarks of `ferry-core` (header parse, token
//!   verification, transport seal+open against the raw AEAD). See docs/bench.md.
//! - [`demo`]: the gateway, the relay's session table and two peers in one process, joined by
//!   an in-memory network; `ferry-demo` runs it, `.ci/demo` runs `ferry-demo`.
//! - [`live`]: the real `ferry-relay` process and two peers over UDP, the second half of
//!   `ferry-demo`.
//! - [`udp`]: batched `sendmmsg`/`recvmmsg`, UDP GSO sends and GRO receives; the generator
//!   and sink of [`harness`] and `ferry-plainfwd` (the baseline forwarder) are built on it.
//! - [`cpu`]: a process's CPU time, for the CPU-per-packet figures.
//! - [`harness`]: `ferry-bench`, the harness capacity planners run: a namespace topology,
//!   a batched and paced load generator, the scenarios (zero-loss throughput, latency, fixed
//!   rates, session scale, worker scaling, a spoofed flood with the XDP guard off and on)
//!   against baselines (`ferry-plainfwd`, `ferry-tokiorelay`, coturn) and beside Ferry's XDP
//!   fast path in the same run, and the JSON and Markdown reports.
//! - `ferry-xdpbench` times the guard's paths with `BPF_PROG_TEST_RUN`.
//!
//! The relay process, the namespaces, the peers and the metrics page come from
//! `ferry-testkit`, which the relay's and the gateway's tests share.

pub mod cpu;
pub mod demo;
pub mod harness;
pub mod live;
pub mod udp;
