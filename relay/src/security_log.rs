//! Security events, logged as well as counted: refused binds (with the relay's REJECT reason),
//! CLOSEs for a live session that failed their checks, and sources over their bind rate. Each line names the event,
//! the source address, the session and the reason, so that an incident can be reconstructed
//! from the logs; never a token, a key, a MAC or a payload.
//!
//! The lines go to the `ferry::security` tracing target at WARN. A flood of refusals must not
//! become a flood of log lines, so each worker writes at most [`LINES_PER_SECOND`] a second
//! (with bursts of [`LINE_BURST`]); what it holds back it counts, and the next line it writes,
//! or its next tick, says how many were suppressed. The counters on `/metrics` stay exact.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_core::ratelimit::TokenBucket;
use ferry_core::wire::{self, Packet};

use crate::session::{DropReason, Outcome};

/// Security lines a worker writes per second at most.
pub const LINES_PER_SECOND: u64 = 10;
/// Lines a quiet worker may write at once.
pub const LINE_BURST: u64 = 50;

/// The log target of security events.
pub const TARGET: &str = "ferry::security";

/// One security event, as it is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened: `bind_refused`, `close_refused` or `bind_rate_limited`.
    pub kind: &'static str,
    /// The source address of the datagram.
    pub source: SocketAddr,
    /// The session the datagram named.
    pub session: u64,
    /// Why (the REJECT reason's name for a refused bind; the drop reason otherwise).
    pub reason: &'static str,
}

impl Event {
    /// The security event `outcome` is, for a `datagram` from `source` whose answer, if any,
    /// is in `reply`; `None` for everything else (forwards, acknowledgements, CHALLENGEs,
    /// ordinary drops).
    pub fn of(
        source: SocketAddr,
        datagram: &[u8],
        outcome: &Outcome,
        reply: &[u8],
    ) -> Option<Event> {
        let session = || match wire::parse(datagram) {
            Ok(packet) => packet.header().session_id,
            Err(_) => 0,
        };
        match *outcome {
            Outcome::Reply { len, .. } => match wire::parse(reply.get(..len)?) {
                Ok(Packet::Reject(reject)) => Some(Event {
                    kind: "bind_refused",
                    source,
                    session: reject.session_id(),
                    reason: reject.reason().name(),
                }),
                _ => None,
            },
            Outcome::Drop(DropReason::BadClose) => Some(Event {
                kind: "close_refused",
                source,
                session: session(),
                reason: "bad_close",
            }),
            Outcome::Drop(DropReason::BindRateLimited) => Some(Event {
                kind: "bind_rate_limited",
                source,
                session: session(),
                reason: "bind_rate_limited",
            }),
            _ => None,
        }
    }
}

/// One worker's rate-limited security log.
#[derive(Debug)]
pub struct SecurityLog {
    lines: TokenBucket,
    suppressed: u64,
}

impl SecurityLog {
    /// A log that may write its first [`LINE_BURST`] lines at once.
    pub fn new(now: Instant) -> Self {
        Self {
            lines: TokenBucket::new(LINES_PER_SECOND, LINE_BURST, now),
            suppressed: 0,
        }
    }

    /// Logs `event` if the rate allows, with the count of lines suppressed before it.
    pub fn record(&mut self, now: Instant, event: &Event) -> bool {
        if !self.lines.try_take(1, now) {
            self.suppressed += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(
            target: TARGET,
            event = event.kind,
            source = %event.source,
            session = %format_args!("{:016x}", event.session),
            reason = event.reason,
            suppressed_before = suppressed,
            "security event"
        );
        true
    }

    /// Says how many lines were held back since the last line, if any and the rate allows.
    /// Call it from the worker's tick, so that the count is told even when no further event
    /// comes.
    pub fn flush(&mut self, now: Instant) {
        if self.suppressed > 0 && self.lines.try_take(1, now) {
            let suppressed = std::mem::take(&mut self.suppressed);
            tracing::warn!(
                target: TARGET,
                suppressed,
                "security events not logged (over {LINES_PER_SECOND} lines a second); the \
                 counters on /metrics have them all"
            );
        }
    }

    /// Events held back since the last line written.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// How often a worker's tick flushes the suppressed count at most (its tick comes every
/// 100 ms by default).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::proof::SlotKeys;
    use ferry_core::wire::{CloseFields, CloseReason, RejectFields, RejectReason, Slot};

    fn source() -> SocketAddr {
        "198.18.0.7:4000".parse().expect("address")
    }

    #[test]
    fn refused_binds_bad_closes_and_rate_limited_binds_are_events_and_nothing_else_is() {
        let keys = SlotKeys::derive(&ferry_core::proof::SlotSecret::from_bytes([1; 32]));
        let mut reply = vec![0u8; wire::MAX_DATAGRAM];
        let fields = RejectFields {
            slot: Slot::A,
            reason: RejectReason::BadProof,
            bind_seq: 3,
        };
        let n =
            wire::encode_reject(&mut reply, 0xabc, &fields, |m| keys.relay.mac(m)).expect("encode");
        let to = source();
        let event = Event::of(
            to,
            &[],
            &Outcome::Reply {
                to,
                src: None,
                len: n,
            },
            &reply,
        );
        assert_eq!(
            event,
            Some(Event {
                kind: "bind_refused",
                source: to,
                session: 0xabc,
                reason: "bad_proof"
            })
        );
        let mut close = vec![0u8; wire::MAX_DATAGRAM];
        let fields = CloseFields {
            slot: Slot::B,
            reason: CloseReason::PeerClosed,
            seq: 9,
        };
        let n = wire::encode_close(&mut close, 0xdef, &fields, |_| [0; 16]).expect("encode");
        let event = Event::of(to, &close[..n], &Outcome::Drop(DropReason::BadClose), &[]);
        assert_eq!(
            event.map(|e| (e.kind, e.session)),
            Some(("close_refused", 0xdef))
        );
        let event = Event::of(
            to,
            b"junk",
            &Outcome::Drop(DropReason::BindRateLimited),
            &[],
        );
        assert_eq!(
            event.map(|e| (e.kind, e.session)),
            Some(("bind_rate_limited", 0))
        );
        // Forwards, acknowledgements and ordinary drops are not security events.
        assert_eq!(
            Event::of(to, &[], &Outcome::Forward { to, src: None }, &[]),
            None
        );
        assert_eq!(Event::of(to, &[], &Outcome::Consumed, &[]), None);
        assert_eq!(
            Event::of(to, &[], &Outcome::Drop(DropReason::DataUnbound), &[]),
            None
        );
    }

    #[test]
    fn a_flood_of_events_is_cut_to_the_line_rate_and_the_rest_is_counted() {
        let t0 = Instant::now();
        let mut log = SecurityLog::new(t0);
        let event = Event {
            kind: "bind_refused",
            source: source(),
            session: 1,
            reason: "bad_proof",
        };
        let written = (0..1000).filter(|_| log.record(t0, &event)).count();
        assert_eq!(written, LINE_BURST as usize);
        assert_eq!(log.suppressed(), 1000 - LINE_BURST);
        // A second later there is room for about LINES_PER_SECOND more; the first of them
        // carries the suppressed count, which then starts again from zero.
        let later = t0 + Duration::from_secs(1);
        assert!(log.record(later, &event));
        assert_eq!(log.suppressed(), 0);
        // The tick tells a count even when no event follows.
        for _ in 0..100 {
            log.record(later, &event);
        }
        assert!(log.suppressed() > 0);
        log.flush(later + Duration::from_secs(2));
        assert_eq!(log.suppressed(), 0);
    }
}
