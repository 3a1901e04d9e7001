//! `ferry-bench`, the harness capacity planners run: a topology ([`topology`]), a batched,
//! paced load generator with timestamps in its payloads and a sink that records one-way
//! latency ([`load`]), the forwarders under test and the baselines beside them ([`paths`]),
//! the scenarios that drive them ([`scenario`]), a spoofed-source flood ([`flood`]) and the
//! reports they write ([`report`], [`schema`], [`charts`]); and for real hardware, a testbed
//! from a config file ([`testbed`]) whose coordinator ([`remote`]) drives `ferry-bench agent`s
//! ([`agent`]) on other machines. docs/bench.md says how to run it and how to read what it writes.

pub mod agent;
pub mod charts;
pub mod flood;
pub mod load;
pub mod paths;
pub mod remote;
pub mod report;
pub mod scenario;
pub mod schema;
pub mod testbed;
pub mod topology;
pub mod turn;

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Turns SIGINT and SIGTERM into a flag that [`check_interrupted`] reads, so that a run stops
/// at its next check and unwinds, removing its namespaces and stopping its processes on the
/// way out. A second signal ends the process at once (the namespaces then stay; `ferry-bench
/// cleanup` removes them).
pub fn catch_interrupts() -> anyhow::Result<()> {
    let flag = Arc::clone(INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false))));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The order matters: the second registration sees the flag the first one set.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&flag))?;
        signal_hook::flag::register(signal, Arc::clone(&flag))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|flag| flag.load(Ordering::Relaxed))
}

/// An error when SIGINT or SIGTERM arrived: every loop of the harness calls it.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted (SIGINT or SIGTERM): stopping and cleaning up");
    }
    Ok(())
}
