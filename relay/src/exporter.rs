//! The relay's `/metrics` page: session counters summed over the shards, each worker's
//! datagram and io_uring counters, and the XDP guard's verdict counters. A scrape takes a
//! [`Snapshot`] and encodes it as a `prometheus-client` collector; counter names are written
//! without `_total`, which the encoder appends.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferry_common::xdp::{Counter, CounterValue, slot_labels};
use ferry_core::wire::{HeaderError, RejectReason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{self, Families};
use crate::session::{Counters, DropReason, NoticeKind};
use crate::shards::Sessions;
use crate::worker::WorkerStats;
use crate::xdp::Guard;

/// One per-worker counter family: name, help, and how to read it.
type WorkerMetric = (&'static str, &'static str, fn(&WorkerStats) -> u64);

/// One XDP counter family: name, help, and which half of a counter it shows.
type XdpMetric = (&'static str, &'static str, fn(&CounterValue) -> u64);

/// The per-worker counter families.
const PER_WORKER: [WorkerMetric; 17] = [
    (
        "ferry_worker_rx_packets",
        "Datagrams received, per worker.",
        |s| s.rx_packets.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_rx_bytes",
        "Bytes received, per worker.",
        |s| s.rx_bytes.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_tx_packets",
        "Datagrams sent, per worker.",
        |s| s.tx_packets.load(Ordering::Relaxed),
    ),
    ("ferry_worker_tx_bytes", "Bytes sent, per worker.", |s| {
        s.tx_bytes.load(Ordering::Relaxed)
    }),
    (
        "ferry_worker_rx_undecodable",
        "Receive completions whose header or source address could not be read, dropped.",
        |s| s.rx_undecodable.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_socket_drops",
        "Datagrams the kernel dropped at the worker's sockets before the worker read them \
         (a full receive queue: see relay.udp_recv_buffer_bytes); with UDP GRO a dropped \
         coalesced receive counts once, however many datagrams it held.",
        |s| s.socket_drops.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_rx_no_buffers",
        "Times a receive found no receive buffer lent to the kernel (its datagrams wait in the socket queue until the worker lends more).",
        |s| s.rx_no_buffers.load(Ordering::Relaxed),
    ),
    ("ferry_worker_tx_errors", "Sends the kernel failed.", |s| {
        s.tx_errors.load(Ordering::Relaxed)
    }),
    (
        "ferry_worker_tx_slots_full",
        "Sends dropped with every send slot in use.",
        |s| s.tx_slots_full.load(Ordering::Relaxed),
    ),
    (
        "ferry_uring_submits",
        "io_uring submit-and-wait calls.",
        |s| s.submits.load(Ordering::Relaxed),
    ),
    (
        "ferry_uring_completions",
        "io_uring completions handled.",
        |s| s.completions.load(Ordering::Relaxed),
    ),
    (
        "ferry_uring_batch_waits",
        "Submit-and-wait calls that waited for a whole batch (the worker was behind).",
        |s| s.batch_waits.load(Ordering::Relaxed),
    ),
    (
        "ferry_uring_recv_rearms",
        "Multishot receives re-armed.",
        |s| s.rearms.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_gso_sends",
        "Sends carrying several datagrams at once (UDP GSO).",
        |s| s.gso_sends.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_gro_receives",
        "Receives carrying several datagrams of one sender at once (UDP GRO).",
        |s| s.gro_receives.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_gso_resent",
        "Datagrams of GSO sends refused for their size (EMSGSIZE: over the path MTU), sent \
         again one per send for the kernel to fragment.",
        |s| s.gso_resent.load(Ordering::Relaxed),
    ),
    (
        "ferry_worker_gso_disabled",
        "Times the worker turned UDP GSO off because a GSO send failed with EIO or EINVAL \
         (not an EINVAL of a send naming a source address that is gone).",
        |s| s.gso_disabled.load(Ordering::Relaxed),
    ),
];

/// The XDP guard's per-slot counter families.
const XDP_COUNTERS: [XdpMetric; 2] = [
    (
        "ferry_xdp_packets",
        "Frames the XDP guard passed or dropped, by reason (summed over CPUs).",
        |c| c.packets,
    ),
    (
        "ferry_xdp_bytes",
        "Bytes of those frames, link-layer header included.",
        |c| c.bytes,
    ),
];

/// Renders the page. Takes each shard's lock briefly, one at a time; `xdp` is the guard when
/// it runs.
pub fn render(sessions: &Sessions, workers: &[Arc<WorkerStats>], xdp: Option<&Guard>) -> String {
    metrics::page(Snapshot::take(sessions, workers, xdp))
}

/// What one scrape shows, read from the shards and the guard; the workers' relaxed atomics are
/// read as the page is written.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Session counters summed over the shards.
    pub sessions: Counters,
    /// Sessions held now.
    pub active: usize,
    /// Slots bound now.
    pub bound: usize,
    /// Source IPs tracked by the per-IP limits.
    pub tracked_ips: usize,
    /// Each worker's counters, in worker order.
    pub workers: Vec<Arc<WorkerStats>>,
    /// The XDP guard's part, when it runs.
    pub xdp: Option<XdpSnapshot>,
}

/// The XDP guard's part of a [`Snapshot`].
#[derive(Debug, Default)]
pub struct XdpSnapshot {
    /// Interfaces the guard is attached to, and the mode's label.
    pub attached: Vec<(String, &'static str)>,
    /// Session-map updates the kernel refused.
    pub session_map_errors: u64,
    /// Every counter slot summed over CPUs; `None` when the map could not be read.
    pub counters: Option<Vec<CounterValue>>,
    /// Per attached interface: 1 when the fast path takes DATA in there, and 1 when it sends
    /// DATA out of there.
    pub fast_path: Vec<(String, u64, u64)>,
    /// DATA the fast path forwarded (datagrams, bytes): already added into
    /// [`Snapshot::sessions`]' `forwarded` and `forwarded_bytes`.
    pub fast_forwarded: CounterValue,
}

impl Snapshot {
    /// Reads `sessions`, `workers` and `xdp` (the guard, when it runs).
    pub fn take(sessions: &Sessions, workers: &[Arc<WorkerStats>], xdp: Option<&Guard>) -> Self {
        let (active, bound) = sessions.occupancy();
        // Datagrams too long for a receive buffer never reach the session logic; the workers
        // count them, and they join the session counters' `too_long` rule here.
        let mut counters = sessions.counters();
        for stats in workers {
            stats.add_to_session_counters(&mut counters);
        }
        // DATA forwarded in XDP counts in the same totals as DATA the workers forwarded.
        let fast_forwarded = xdp
            .map(|guard| {
                guard
                    .fast_totals()
                    .inspect_err(|e| tracing::warn!("reading the XDP fast path's totals: {e}"))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        counters.forwarded += fast_forwarded.packets;
        counters.forwarded_bytes += fast_forwarded.bytes;
        let xdp_counters = xdp.map(|guard| {
            guard
                .counters()
                .inspect_err(|e| tracing::warn!("reading the XDP counters: {e}"))
                .ok()
        });
        // So do the CHALLENGEs the guard sent itself.
        if let Some(Some(slots)) = &xdp_counters {
            for counter in [Counter::ChallengeTx, Counter::ChallengeRedirect] {
                if let Some(value) = slots.get(counter.slot() as usize) {
                    counters.challenges += value.packets;
                }
            }
        }
        Self {
            sessions: counters,
            active,
            bound,
            tracked_ips: sessions.tracked_ips(),
            workers: workers.to_vec(),
            xdp: xdp.map(|guard| XdpSnapshot {
                attached: guard
                    .attached()
                    .iter()
                    .map(|(interface, mode)| (interface.clone(), mode.name()))
                    .collect(),
                session_map_errors: guard.session_filter_errors(),
                counters: xdp_counters.flatten(),
                fast_path: guard
                    .fast_path()
                    .iter()
                    .map(|(interface, status)| {
                        (
                            interface.clone(),
                            u64::from(status.takes_data_in()),
                            u64::from(status.sends_data_out()),
                        )
                    })
                    .collect(),
                fast_forwarded,
            }),
        }
    }

    fn encode_sessions(&self, w: &mut Families) -> fmt::Result {
        let c = &self.sessions;
        w.counter(
            "ferry_forwarded_packets",
            "DATA datagrams forwarded to the other slot.",
            c.forwarded,
        )?;
        w.counter(
            "ferry_forwarded_bytes",
            "Bytes of forwarded DATA datagrams, headers included.",
            c.forwarded_bytes,
        )?;
        w.counters(
            "ferry_drops",
            "Datagrams dropped by the session logic, by reason.",
            DropReason::ALL.map(|reason| ([("reason", reason.name())], c.dropped(reason))),
        )?;
        let by_rule = |i: usize| c.malformed_by_rule.get(i).copied().unwrap_or(0);
        let body = c.malformed_by_rule.last().copied().unwrap_or(0);
        w.counters(
            "ferry_malformed",
            "Malformed datagrams, by the first rule of protocol.md section 2.1 they broke (body: a body rule).",
            HeaderError::ALL
                .iter()
                .map(|rule| ([("rule", rule.name())], by_rule(rule.as_index())))
                .chain([([("rule", "body")], body)]),
        )?;
        w.gauge(
            "ferry_sessions_active",
            "Sessions held now.",
            self.active as u64,
        )?;
        w.gauge(
            "ferry_bindings_active",
            "Slots bound now.",
            self.bound as u64,
        )?;
        w.counter(
            "ferry_sessions_opened",
            "Sessions opened (first slot bound).",
            c.sessions_opened,
        )?;
        w.counter(
            "ferry_sessions_closed",
            "Sessions gone, closed or reaped.",
            c.sessions_closed,
        )?;
        w.gauge(
            "ferry_tracked_ips",
            "Source IPs tracked by the per-IP limits.",
            self.tracked_ips as u64,
        )?;
        w.counter(
            "ferry_binds_accepted",
            "BINDs accepted (retransmissions included).",
            c.binds_accepted,
        )?;
        w.counter(
            "ferry_rebinds_accepted",
            "REBINDs accepted: bindings moved to a new address.",
            c.rebinds_accepted,
        )?;
        w.counters(
            "ferry_binds_rejected",
            "BIND and REBIND rejections, by REJECT reason.",
            RejectReason::ALL.iter().map(|reason| {
                let n = c
                    .binds_rejected
                    .get(usize::from(reason.as_u8()))
                    .copied()
                    .unwrap_or(0);
                ([("reason", reason.name())], n)
            }),
        )?;
        w.counter(
            "ferry_challenges",
            "CHALLENGEs sent to BIND/REBIND without a valid cookie (by the relay or its XDP guard).",
            c.challenges,
        )?;
        w.counter(
            "ferry_probes",
            "Gateway health probes answered (BINDs with a probe token; nothing is bound).",
            c.probes,
        )?;
        w.counter("ferry_keepalives", "KEEPALIVEs echoed.", c.keepalives)?;
        w.counter(
            "ferry_closes",
            "Sessions closed by a verified CLOSE.",
            c.closed,
        )?;
        w.counter(
            "ferry_reaped",
            "Bindings removed because they were idle or their token expired.",
            c.reaped,
        )?;
        w.counters(
            "ferry_notices",
            "Datagrams sent to a bound peer unasked: CLOSEs by reason (peer_closed, expired, idle) and peer-present BIND-ACKs.",
            NoticeKind::ALL.map(|kind| ([("kind", kind.name())], c.notices(kind))),
        )
    }

    fn encode_workers(&self, w: &mut Families) -> fmt::Result {
        for (name, help, get) in PER_WORKER {
            w.counters(
                name,
                help,
                self.workers
                    .iter()
                    .enumerate()
                    .map(|(i, stats)| ([("worker", i)], get(stats))),
            )?;
        }
        Ok(())
    }

    /// The guard's part: whether it runs, where, and its per-CPU counters summed.
    fn encode_xdp(&self, w: &mut Families) -> fmt::Result {
        w.gauge(
            "ferry_xdp_enabled",
            "1 when the XDP guard is loaded (xdp.mode is not off).",
            u64::from(self.xdp.is_some()),
        )?;
        let Some(xdp) = &self.xdp else {
            return Ok(());
        };
        w.gauges(
            "ferry_xdp_attached",
            "Interfaces the XDP guard is attached to, and in which mode.",
            xdp.attached
                .iter()
                .map(|(interface, mode)| ([("interface", interface.as_str()), ("mode", *mode)], 1)),
        )?;
        w.gauges(
            "ferry_xdp_fast_path_active",
            "1 when the XDP fast path forwards DATA arriving on this interface.",
            xdp.fast_path
                .iter()
                .map(|(interface, active, _)| ([("interface", interface.as_str())], *active)),
        )?;
        w.gauges(
            "ferry_xdp_fast_path_sends",
            "1 when the XDP fast path sends DATA out of this interface (0 on a veth whose peer takes no XDP frames).",
            xdp.fast_path
                .iter()
                .map(|(interface, _, sends)| ([("interface", interface.as_str())], *sends)),
        )?;
        w.counter(
            "ferry_xdp_fast_forwarded_packets",
            "DATA datagrams forwarded in XDP (included in ferry_forwarded_packets_total).",
            xdp.fast_forwarded.packets,
        )?;
        w.counter(
            "ferry_xdp_fast_forwarded_bytes",
            "Bytes of DATA datagrams forwarded in XDP, headers included (included in ferry_forwarded_bytes_total).",
            xdp.fast_forwarded.bytes,
        )?;
        w.counter(
            "ferry_xdp_session_map_errors",
            "Session-map updates the kernel refused (that session's datagrams are dropped by the guard).",
            xdp.session_map_errors,
        )?;
        let Some(counters) = &xdp.counters else {
            return Ok(());
        };
        for (name, help, get) in XDP_COUNTERS {
            w.counters(
                name,
                help,
                counters.iter().enumerate().filter_map(|(slot, value)| {
                    let (action, reason) = slot_labels(slot as u32)?;
                    Some(([("action", action), ("reason", reason)], get(value)))
                }),
            )?;
        }
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let mut w = Families(encoder);
        self.encode_sessions(&mut w)?;
        self.encode_workers(&mut w)?;
        self.encode_xdp(&mut w)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `name` is a valid metric or label name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    #[test]
    fn names_are_validated() {
        for good in ["ferry_rx_total", "_x", "a:b", "A1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "1a", "a-b", "a b", "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    fn example() -> Snapshot {
        let mut sessions = Counters {
            forwarded: 5,
            data_unbound: 6,
            notices: [0, 0, 3, 1],
            ..Counters::default()
        };
        sessions.binds_rejected[usize::from(RejectReason::WrongSession.as_u8())] = 2;
        if let Some(body) = sessions.malformed_by_rule.last_mut() {
            *body = 4;
        }
        let busy = WorkerStats::default();
        busy.rx_packets.store(9, Ordering::Relaxed);
        Snapshot {
            sessions,
            active: 3,
            bound: 5,
            tracked_ips: 2,
            workers: vec![Arc::default(), Arc::new(busy)],
            xdp: Some(XdpSnapshot {
                attached: vec![("eth0".into(), "native")],
                session_map_errors: 1,
                counters: Some(vec![CounterValue {
                    packets: 7,
                    bytes: 700,
                }]),
                fast_path: vec![("eth0".into(), 1, 1), ("veth0".into(), 1, 0)],
                fast_forwarded: CounterValue {
                    packets: 3,
                    bytes: 300,
                },
            }),
        }
    }

    #[test]
    fn the_page_keeps_its_names_labels_and_types() {
        let page = metrics::page(example());
        for line in [
            "# HELP ferry_forwarded_packets_total DATA datagrams forwarded to the other slot.\n\
             # TYPE ferry_forwarded_packets_total counter\n\
             ferry_forwarded_packets_total 5\n",
            "ferry_drops_total{reason=\"data_unbound\"} 6\n",
            "ferry_malformed_total{rule=\"body\"} 4\n",
            "# TYPE ferry_sessions_active gauge\nferry_sessions_active 3\n",
            "ferry_bindings_active 5\n",
            "ferry_tracked_ips 2\n",
            "ferry_binds_rejected_total{reason=\"wrong_session\"} 2\n",
            "ferry_notices_total{kind=\"peer_closed\"} 0\n\
             ferry_notices_total{kind=\"expired\"} 0\n\
             ferry_notices_total{kind=\"idle\"} 3\n\
             ferry_notices_total{kind=\"peer_present\"} 1\n",
            "ferry_worker_rx_packets_total{worker=\"0\"} 0\n\
             ferry_worker_rx_packets_total{worker=\"1\"} 9\n",
            "# TYPE ferry_uring_recv_rearms_total counter\n",
            "ferry_xdp_enabled 1\n",
            "ferry_xdp_attached{interface=\"eth0\",mode=\"native\"} 1\n",
            "ferry_xdp_fast_path_active{interface=\"eth0\"} 1\n",
            "ferry_xdp_fast_path_active{interface=\"veth0\"} 1\n",
            "ferry_xdp_fast_path_sends{interface=\"eth0\"} 1\n",
            "ferry_xdp_fast_path_sends{interface=\"veth0\"} 0\n",
            "ferry_xdp_fast_forwarded_packets_total 3\n",
            "ferry_xdp_fast_forwarded_bytes_total 300\n",
            "ferry_xdp_session_map_errors_total 1\n",
            "ferry_xdp_packets_total{action=\"pass\",reason=\"relay\"} 7\n",
            "ferry_xdp_bytes_total{action=\"pass\",reason=\"relay\"} 700\n",
        ] {
            assert!(page.contains(line), "{line} not in:\n{page}");
        }
        // Every sample belongs to the family announced just before it, every name is valid,
        // and every counter's name ends in `_total`.
        let mut family = "";
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(valid_name(name), "{line}");
                assert!(kind == "gauge" || name.ends_with("_total"), "{line}");
                family = name;
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                assert!(rest.split(' ').next().is_some_and(valid_name), "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(name, family, "{line}");
                let labels = line
                    .split_once('{')
                    .and_then(|(_, rest)| rest.split_once('}'))
                    .map_or("", |(labels, _)| labels);
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    let key = pair.split('=').next().unwrap_or("");
                    assert!(valid_name(key), "{line}");
                }
            }
        }
    }

    #[test]
    fn without_the_guard_only_its_enabled_gauge_is_shown() {
        let page = metrics::page(Snapshot::default());
        assert!(page.contains("# TYPE ferry_xdp_enabled gauge\nferry_xdp_enabled 0\n"));
        assert!(!page.contains("ferry_xdp_attached"), "{page}");
        assert!(!page.contains("ferry_xdp_packets"), "{page}");
    }

    #[test]
    fn unreadable_xdp_counters_leave_out_their_families_only() {
        let mut snapshot = example();
        if let Some(xdp) = &mut snapshot.xdp {
            xdp.counters = None;
        }
        let page = metrics::page(snapshot);
        assert!(page.contains("ferry_xdp_session_map_errors_total 1\n"));
        assert!(!page.contains("ferry_xdp_packets"), "{page}");
        assert!(!page.contains("ferry_xdp_bytes"), "{page}");
    }
}
