//! `ferry-bench`: Ferry's benchmarks and its in-memory demo.
//!
//! - `benches/core.rs`: criterion micro-benchmarks of `ferry-core` (header parse, token
//!   verification, transport seal+open against the raw AEAD). See docs/bench.md.
//! - [`demo`]: the gateway, the relay's session table and two peers in one process, joined by
//!   an in-memory network; `ferry-demo` runs it, `.ci/demo` runs `ferry-demo`.
//! - [`udp`]: batched `sendmmsg`/`recvmmsg`; `ferry-plainfwd` (the baseline forwarder) and
//!   `ferry-fwdbench` (Ferry against that baseline, same run, same topology) are built on it.
//! - [`netns`]: namespaces and veth for `ferry-floodbench` (the XDP guard under a flood);
//!   `ferry-xdpbench` times the guard's paths with `BPF_PROG_TEST_RUN`.

pub mod demo;
pub mod live;
pub mod netns;
pub mod relay_process;
pub mod udp;
