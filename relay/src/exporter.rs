//! The relay's `/metrics` page: session counters summed over the shards, each worker's
//! datagram and io_uring counters, and the XDP guard's verdict counters.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferry_common::xdp::{CounterValue, slot_labels};
use ferry_core::wire::{HeaderError, RejectReason};

use crate::metrics::{Kind, PromWriter};
use crate::session::DropReason;
use crate::shards::Sessions;
use crate::worker::WorkerStats;
use crate::xdp::Guard;

/// One per-worker metric family: name, help, and how to read it.
type WorkerMetric = (&'static str, &'static str, fn(&WorkerStats) -> u64);

/// One XDP counter family: name, help, and which half of a counter it shows.
type XdpMetric = (&'static str, &'static str, fn(&CounterValue) -> u64);

/// Renders the page. Takes each shard's lock briefly, one at a time; `xdp` is the guard when
/// it runs.
pub fn render(sessions: &Sessions, workers: &[Arc<WorkerStats>], xdp: Option<&Guard>) -> String {
    let mut c = sessions.counters();
    for stats in workers {
        stats.add_to_session_counters(&mut c);
    }
    let (active, bound) = sessions.occupancy();
    let mut w = PromWriter::new();
    w.single(
        "ferry_forwarded_packets_total",
        "DATA datagrams forwarded to the other slot.",
        Kind::Counter,
        c.forwarded,
    );
    w.single(
        "ferry_forwarded_bytes_total",
        "Bytes of forwarded DATA datagrams, headers included.",
        Kind::Counter,
        c.forwarded_bytes,
    );
    w.family(
        "ferry_drops_total",
        "Datagrams dropped by the session logic, by reason.",
        Kind::Counter,
    );
    for reason in DropReason::ALL {
        w.sample(
            "ferry_drops_total",
            &[("reason", reason.name())],
            c.dropped(reason),
        );
    }
    w.family(
        "ferry_malformed_total",
        "Malformed datagrams, by the first rule of protocol.md section 2.1 they broke (body: a body rule).",
        Kind::Counter,
    );
    for rule in HeaderError::ALL {
        let n = c
            .malformed_by_rule
            .get(rule.as_index())
            .copied()
            .unwrap_or(0);
        w.sample("ferry_malformed_total", &[("rule", rule.name())], n);
    }
    let body = c.malformed_by_rule.last().copied().unwrap_or(0);
    w.sample("ferry_malformed_total", &[("rule", "body")], body);
    w.single(
        "ferry_sessions_active",
        "Sessions held now.",
        Kind::Gauge,
        active as u64,
    );
    w.single(
        "ferry_bindings_active",
        "Slots bound now.",
        Kind::Gauge,
        bound as u64,
    );
    w.single(
        "ferry_sessions_opened_total",
        "Sessions opened (first slot bound).",
        Kind::Counter,
        c.sessions_opened,
    );
    w.single(
        "ferry_sessions_closed_total",
        "Sessions gone, closed or reaped.",
        Kind::Counter,
        c.sessions_closed,
    );
    w.single(
        "ferry_tracked_ips",
        "Source IPs tracked by the per-IP limits.",
        Kind::Gauge,
        sessions.tracked_ips() as u64,
    );
    w.single(
        "ferry_binds_accepted_total",
        "BINDs accepted (retransmissions included).",
        Kind::Counter,
        c.binds_accepted,
    );
    w.single(
        "ferry_rebinds_accepted_total",
        "REBINDs accepted: bindings moved to a new address.",
        Kind::Counter,
        c.rebinds_accepted,
    );
    w.family(
        "ferry_binds_rejected_total",
        "BIND and REBIND rejections, by REJECT reason.",
        Kind::Counter,
    );
    for reason in RejectReason::ALL {
        let n = c
            .binds_rejected
            .get(usize::from(reason.as_u8()))
            .copied()
            .unwrap_or(0);
        w.sample(
            "ferry_binds_rejected_total",
            &[("reason", reason.name())],
            n,
        );
    }
    w.single(
        "ferry_challenges_total",
        "CHALLENGEs sent to BIND/REBIND without a valid cookie.",
        Kind::Counter,
        c.challenges,
    );
    w.single(
        "ferry_keepalives_total",
        "KEEPALIVEs echoed.",
        Kind::Counter,
        c.keepalives,
    );
    w.single(
        "ferry_closes_total",
        "Sessions closed by a verified CLOSE.",
        Kind::Counter,
        c.closed,
    );
    w.single(
        "ferry_reaped_total",
        "Bindings removed because they were idle or their token expired.",
        Kind::Counter,
        c.reaped,
    );

    let per_worker: [WorkerMetric; 12] = [
        (
            "ferry_worker_rx_packets_total",
            "Datagrams received, per worker.",
            |s| s.rx_packets.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_rx_bytes_total",
            "Bytes received, per worker.",
            |s| s.rx_bytes.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_tx_packets_total",
            "Datagrams sent, per worker.",
            |s| s.tx_packets.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_tx_bytes_total",
            "Bytes sent, per worker.",
            |s| s.tx_bytes.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_rx_undecodable_total",
            "Receive completions whose header or source address could not be read, dropped.",
            |s| s.rx_undecodable.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_rx_no_buffers_total",
            "Times the kernel had no free receive buffer.",
            |s| s.rx_no_buffers.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_tx_errors_total",
            "Sends the kernel failed.",
            |s| s.tx_errors.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_tx_slots_full_total",
            "Sends dropped with every send slot in use.",
            |s| s.tx_slots_full.load(Ordering::Relaxed),
        ),
        (
            "ferry_uring_submits_total",
            "io_uring submit-and-wait calls.",
            |s| s.submits.load(Ordering::Relaxed),
        ),
        (
            "ferry_uring_completions_total",
            "io_uring completions handled.",
            |s| s.completions.load(Ordering::Relaxed),
        ),
        (
            "ferry_uring_recv_rearms_total",
            "Multishot receives re-armed.",
            |s| s.rearms.load(Ordering::Relaxed),
        ),
        (
            "ferry_worker_gso_sends_total",
            "Sends carrying several datagrams at once (UDP GSO).",
            |s| s.gso_sends.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in per_worker {
        w.family(name, help, Kind::Counter);
        for (i, stats) in workers.iter().enumerate() {
            w.sample(name, &[("worker", &i.to_string())], get(stats));
        }
    }
    render_xdp(&mut w, xdp);
    w.finish()
}

/// The guard's part: whether it runs, where, and its per-CPU counters summed.
fn render_xdp(w: &mut PromWriter, xdp: Option<&Guard>) {
    w.single(
        "ferry_xdp_enabled",
        "1 when the XDP guard is loaded (xdp.mode is not off).",
        Kind::Gauge,
        u64::from(xdp.is_some()),
    );
    let Some(guard) = xdp else {
        return;
    };
    w.family(
        "ferry_xdp_attached",
        "Interfaces the XDP guard is attached to, and in which mode.",
        Kind::Gauge,
    );
    for (interface, mode) in guard.attached() {
        w.sample(
            "ferry_xdp_attached",
            &[("interface", interface), ("mode", mode.name())],
            1,
        );
    }
    w.single(
        "ferry_xdp_session_map_errors_total",
        "Session-map updates the kernel refused (that session's datagrams are dropped by the guard).",
        Kind::Counter,
        guard.session_filter_errors(),
    );
    let counters = match guard.counters() {
        Ok(counters) => counters,
        Err(e) => {
            tracing::warn!("reading the XDP counters: {e}");
            return;
        }
    };
    let families: [XdpMetric; 2] = [
        (
            "ferry_xdp_packets_total",
            "Frames the XDP guard passed or dropped, by reason (summed over CPUs).",
            |c| c.packets,
        ),
        (
            "ferry_xdp_bytes_total",
            "Bytes of those frames, link-layer header included.",
            |c| c.bytes,
        ),
    ];
    for (name, help, get) in families {
        w.family(name, help, Kind::Counter);
        for (slot, value) in counters.iter().enumerate() {
            if let Some((action, reason)) = slot_labels(slot as u32) {
                w.sample(name, &[("action", action), ("reason", reason)], get(value));
            }
        }
    }
}
