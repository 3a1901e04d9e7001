//! The relay's session logic, sans-IO: one call per received datagram, one [`Outcome`] back.
//!
//! This module does not touch sockets, threads, locks or the clock. The caller passes the
//! receive time twice: a monotonic [`Instant`] for idle timers and a wall-clock [`UnixTime`]
//! for token validity and address cookies. It implements docs/protocol.md §7 (what the relay
//! does with each packet) in two halves, so that the expensive half needs no shared state:
//!
//! 1. [`check`]: what needs no session state. Parse, the address cookie, the source's bind
//!    rate (charged through the caller), and for a BIND the token (Ed25519 signature, unsealing
//!    the slot secret) and the slot proof. It answers CHALLENGEs, unauthenticated REJECTs and
//!    drops by itself ([`Answered`], with a [`Tally`] for the caller to count), and hands
//!    everything else on as an [`Input`]; a BIND only as a [`VerifiedBind`], which nothing
//!    else can make.
//! 2. [`SessionTable::handle`]: what needs the table. Replays, slot occupancy, the session cap,
//!    binding, forwarding. It charges slots to a [`SlotAccounts`] the caller passes in, and
//!    queues a [`SessionEvent`] whenever a session appears, its bound addresses change, or it goes, for the caller to hand on
//!    ([`SessionTable::take_events`]), like commands for an IO layer.
//!
//! [`crate::shards::Sessions`] runs the first half before it locks a shard and the second under
//! the lock. [`SessionTable::reap`], called on a timer, unbinds idle and expired slots and hands
//! back a [`Notice`] (an authenticated CLOSE saying why) for each of their peers to send.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_core::proof::SlotKeys;
use ferry_core::time::UnixTime;
use ferry_core::token::{TokenError, TokenReplayCache};
use ferry_core::wire::{
    self, CLOSE_BODY_LEN, CloseReason, HEADER_LEN, HeaderError, MAX_DATAGRAM, RejectReason, Slot,
};

use crate::limits::{SlotAccounts, TokenBucket};

mod admit;
mod ids;
#[cfg(test)]
mod tests;

pub use admit::{Answered, Checked, Input, Tally, VerifiedBind, check};

/// Limits of one session table. Defaults are the ones in docs/protocol.md §8.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// A slot that received nothing for this long is unbound.
    pub idle_timeout: Duration,
    /// Sessions held at once; BINDs that would open one more get `OVERLOADED`.
    pub max_sessions: usize,
    /// Token ids remembered for replay protection; when all are live, new BINDs are refused.
    pub replay_cache_capacity: usize,
    /// Bytes per second a slot may send when its token does not say (claim 0).
    pub default_session_rate: u64,
    /// The most bytes per second a token may grant a slot; larger claims are capped.
    pub max_session_rate: u64,
}

impl SessionLimits {
    /// The byte rate a slot gets for a token that claims `claimed` bytes per second.
    pub fn slot_rate(&self, claimed: u64) -> u64 {
        match claimed {
            0 => self.default_session_rate,
            n => n.min(self.max_session_rate),
        }
    }

    /// The burst a slot may send at once: a second of its rate, and never less than two full
    /// datagrams, so that a slow slot can still send a maximal one.
    pub fn slot_burst(rate: u64) -> u64 {
        rate.max(2 * MAX_DATAGRAM as u64)
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            max_sessions: 100_000,
            replay_cache_capacity: 200_000,
            default_session_rate: 1_250_000,
            max_session_rate: 125_000_000,
        }
    }
}

/// What the caller does with a datagram after [`SessionTable::handle`].
///
/// Every send names its source address (`src`, `notify_src`): the relay address the peer it
/// goes to sends to, so that the peer sees it come from there (docs/protocol.md §1). For a
/// reply to the datagram that is the datagram's own destination; for a forward or a notice,
/// the one the receiving slot was bound through. `None` when the relay does not know it, on a
/// socket bound to a specific address, whose address it is anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the received datagram, unchanged, to this address.
    Forward {
        /// The other slot's bound address.
        to: SocketAddr,
        /// The relay address the other slot was bound through.
        src: Option<IpAddr>,
    },
    /// Send the first `len` bytes of the reply buffer to this address.
    Reply {
        /// Where the reply goes.
        to: SocketAddr,
        /// The relay address it leaves from.
        src: Option<IpAddr>,
        /// Bytes written into the reply buffer.
        len: usize,
    },
    /// Send the first `len` bytes of the reply buffer to `to`, and the `notice_len` bytes
    /// after them (`reply[len..len + notice_len]`) to `notify`: the BIND-ACK of a BIND that
    /// completed a session, and the peer-present notice to the other slot's peer
    /// (docs/protocol.md §3.3).
    ReplyAndNotify {
        /// Where the reply goes.
        to: SocketAddr,
        /// The relay address the reply leaves from (the BIND's destination).
        src: Option<IpAddr>,
        /// Bytes of the reply, at the start of the reply buffer.
        len: usize,
        /// Where the notice goes: the other slot's bound address.
        notify: SocketAddr,
        /// The relay address the notice leaves from: the one the other slot was bound through.
        notify_src: Option<IpAddr>,
        /// Bytes of the notice, right after the reply.
        notice_len: usize,
    },
    /// The datagram was taken into account and needs no answer.
    Consumed,
    /// The datagram was dropped; the reason has been counted.
    Drop(DropReason),
}

/// Why the relay dropped a datagram. Each reason is a counter in [`Counters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Broke a rule of docs/protocol.md §2.1 or a body rule of §3.
    Malformed,
    /// A type only the relay sends (CHALLENGE, BIND-ACK, REJECT).
    UnexpectedType,
    /// DATA for an unknown session, from an unbound source, or with the other slot empty.
    DataUnbound,
    /// KEEPALIVE from a source that is not bound to the session.
    KeepaliveUnbound,
    /// CLOSE whose proof did not verify, or for an unknown session or slot.
    BadClose,
    /// DATA over the sending slot's byte budget.
    RateLimited,
    /// BIND/REBIND from a source IP over its bind rate.
    BindRateLimited,
}

impl DropReason {
    /// Every reason, in the order of [`DropReason::name`]'s metrics labels.
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::UnexpectedType,
        DropReason::DataUnbound,
        DropReason::KeepaliveUnbound,
        DropReason::BadClose,
        DropReason::RateLimited,
        DropReason::BindRateLimited,
    ];

    /// The reason as a metrics label value.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnexpectedType => "unexpected_type",
            DropReason::DataUnbound => "data_unbound",
            DropReason::KeepaliveUnbound => "keepalive_unbound",
            DropReason::BadClose => "bad_close",
            DropReason::RateLimited => "rate_limited",
            DropReason::BindRateLimited => "bind_rate_limited",
        }
    }
}

/// A datagram the relay sends a bound peer unasked (docs/protocol.md §3.3, §3.8), each counted
/// under its kind in [`Counters::notices`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// A CLOSE: the other peer closed the session.
    PeerClosed,
    /// A CLOSE: the slot's token passed its `exp` plus the clock skew, and the slot was unbound.
    Expired,
    /// A CLOSE: the slot was idle for the idle timeout, and was unbound.
    Idle,
    /// A BIND-ACK: the other slot of the session has just been bound.
    PeerPresent,
}

impl NoticeKind {
    /// Every kind, in the order of [`Counters::notices`].
    pub const ALL: [NoticeKind; 4] = [
        NoticeKind::PeerClosed,
        NoticeKind::Expired,
        NoticeKind::Idle,
        NoticeKind::PeerPresent,
    ];

    /// The kind as a metrics label value.
    pub const fn name(self) -> &'static str {
        match self {
            NoticeKind::PeerClosed => "peer_closed",
            NoticeKind::Expired => "expired",
            NoticeKind::Idle => "idle",
            NoticeKind::PeerPresent => "peer_present",
        }
    }

    /// The kind of a relay CLOSE sent for `reason`.
    pub const fn of_close(reason: CloseReason) -> Self {
        match reason {
            CloseReason::PeerClosed => NoticeKind::PeerClosed,
            CloseReason::Expired => NoticeKind::Expired,
            CloseReason::Idle => NoticeKind::Idle,
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// A CLOSE the reaper sends a peer whose binding it removed: where to, and the datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The peer's bound address.
    pub to: SocketAddr,
    /// The relay address the peer was bound through, which the notice leaves from (`None`:
    /// unknown, on a socket bound to a specific address).
    pub src: Option<IpAddr>,
    /// The whole datagram (a CLOSE, 44 bytes).
    pub datagram: Vec<u8>,
}

/// Counters of one session table; the relay exports them as Prometheus metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// DATA datagrams forwarded.
    pub forwarded: u64,
    /// Bytes of forwarded DATA datagrams (whole datagrams, header included).
    pub forwarded_bytes: u64,
    /// Dropped: malformed.
    pub malformed: u64,
    /// Malformed datagrams by the rule they broke: indexed by
    /// [`HeaderError::as_index`], with the last entry for body-level rules.
    pub malformed_by_rule: [u64; HeaderError::COUNT + 1],
    /// Dropped: relay-only packet type received.
    pub unexpected_type: u64,
    /// Dropped: DATA not from a bound source of a fully bound session.
    pub data_unbound: u64,
    /// Dropped: KEEPALIVE from an unbound source.
    pub keepalive_unbound: u64,
    /// Dropped: CLOSE that failed verification.
    pub bad_close: u64,
    /// Dropped: DATA over its slot's byte budget.
    pub rate_limited: u64,
    /// Dropped: BIND/REBIND over its source IP's bind rate.
    pub bind_rate_limited: u64,
    /// CHALLENGEs sent for BIND/REBIND without a valid cookie.
    pub challenges: u64,
    /// Gateway health probes answered (a BIND with a verified probe token, which binds
    /// nothing).
    pub probes: u64,
    /// BINDs accepted (including retransmissions re-acknowledged).
    pub binds_accepted: u64,
    /// REBINDs accepted (binding moved to a new address).
    pub rebinds_accepted: u64,
    /// BIND/REBIND rejections, indexed by [`RejectReason::as_u8`].
    pub binds_rejected: [u64; 16],
    /// KEEPALIVEs echoed.
    pub keepalives: u64,
    /// Sessions closed by a verified CLOSE.
    pub closed: u64,
    /// Bindings reaped because they were idle or their token expired.
    pub reaped: u64,
    /// Datagrams sent to a peer unasked, indexed by [`NoticeKind`] in the order of
    /// [`NoticeKind::ALL`]: relay CLOSEs by reason, and peer-present BIND-ACKs.
    pub notices: [u64; NoticeKind::ALL.len()],
    /// Sessions opened (first slot bound).
    pub sessions_opened: u64,
    /// Sessions gone (closed, or both slots reaped).
    pub sessions_closed: u64,
}

impl Counters {
    /// Adds `other` into `self` (to sum the shards of a relay).
    pub fn add(&mut self, other: &Counters) {
        self.forwarded += other.forwarded;
        self.forwarded_bytes += other.forwarded_bytes;
        self.malformed += other.malformed;
        for (sum, n) in self
            .malformed_by_rule
            .iter_mut()
            .zip(other.malformed_by_rule)
        {
            *sum += n;
        }
        self.unexpected_type += other.unexpected_type;
        self.data_unbound += other.data_unbound;
        self.keepalive_unbound += other.keepalive_unbound;
        self.bad_close += other.bad_close;
        self.rate_limited += other.rate_limited;
        self.bind_rate_limited += other.bind_rate_limited;
        self.challenges += other.challenges;
        self.probes += other.probes;
        self.binds_accepted += other.binds_accepted;
        self.rebinds_accepted += other.rebinds_accepted;
        for (sum, n) in self.binds_rejected.iter_mut().zip(other.binds_rejected) {
            *sum += n;
        }
        self.keepalives += other.keepalives;
        self.closed += other.closed;
        self.reaped += other.reaped;
        for (sum, n) in self.notices.iter_mut().zip(other.notices) {
            *sum += n;
        }
        self.sessions_opened += other.sessions_opened;
        self.sessions_closed += other.sessions_closed;
    }

    /// Drops of `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Malformed => self.malformed,
            DropReason::UnexpectedType => self.unexpected_type,
            DropReason::DataUnbound => self.data_unbound,
            DropReason::KeepaliveUnbound => self.keepalive_unbound,
            DropReason::BadClose => self.bad_close,
            DropReason::RateLimited => self.rate_limited,
            DropReason::BindRateLimited => self.bind_rate_limited,
        }
    }

    /// Notices of `kind` sent so far.
    pub fn notices(&self, kind: NoticeKind) -> u64 {
        self.notices[kind.index()]
    }

    /// Counts one notice of `kind`.
    fn count_notice(&mut self, kind: NoticeKind) {
        self.notices[kind.index()] += 1;
    }

    /// Counts one drop for `reason`.
    fn count_drop(&mut self, reason: DropReason) {
        let n = match reason {
            DropReason::Malformed => &mut self.malformed,
            DropReason::UnexpectedType => &mut self.unexpected_type,
            DropReason::DataUnbound => &mut self.data_unbound,
            DropReason::KeepaliveUnbound => &mut self.keepalive_unbound,
            DropReason::BadClose => &mut self.bad_close,
            DropReason::RateLimited => &mut self.rate_limited,
            DropReason::BindRateLimited => &mut self.bind_rate_limited,
        };
        *n += 1;
    }

    /// Counts one REJECT sent for `reason`.
    fn count_reject(&mut self, reason: RejectReason) {
        if let Some(n) = self.binds_rejected.get_mut(usize::from(reason.as_u8())) {
            *n += 1;
        }
    }

    /// Counts an answer [`check`] gave by itself.
    pub fn tally(&mut self, tally: Tally) {
        match tally {
            Tally::Malformed { rule } => {
                if let Some(n) = self.malformed_by_rule.get_mut(rule) {
                    *n += 1;
                }
                self.count_drop(DropReason::Malformed);
            }
            Tally::Dropped(reason) => self.count_drop(reason),
            Tally::Challenged => self.challenges += 1,
            Tally::Probed => self.probes += 1,
            Tally::Rejected(reason) => self.count_reject(reason),
        }
    }
}

/// One peer's claim on a slot.
///
/// Laid out in declaration order (`repr(C)`), the fields every DATA datagram reads or writes
/// first: with the other slot's address they are all a forward touches, and they share the
/// binding's first two cache lines instead of lying anywhere in it. The slot keys (ring's
/// precomputed HMAC states, 320 bytes), which only the control messages use, live in an
/// allocation of their own, so a session's two bindings are a few lines apart, not 1 KB.
/// Below saturation each datagram finds the table cold in the cache, and every line it does
/// not touch is a miss it does not pay.
#[repr(C)]
struct Binding {
    addr: SocketAddr,
    /// The relay address the peer sends to (that its accepted BIND or REBIND was sent to),
    /// when the socket said: every datagram to the peer leaves from it.
    local: Option<IpAddr>,
    last_seen: Instant,
    /// What the slot may still send.
    budget: TokenBucket,
    // Only control messages and the reaper read these.
    keys: Box<SlotKeys>,
    token_id: [u8; 16],
    last_seq: u64,
    expires: UnixTime,
    /// The rate the token claimed (0 = the relay's default), kept to re-cap on reload.
    claimed_rate: u64,
    /// When `budget` was last created or given a new rate, whether it was created then, and
    /// its rate before.
    budget_set: (Instant, bool, u64),
}

#[derive(Default)]
struct Session {
    slots: [Option<Binding>; 2],
}

impl Session {
    /// The event telling the guard where session `id`'s slots are bound now.
    fn bound_event(&self, id: u64) -> SessionEvent {
        SessionEvent::Bound {
            session: id,
            slots: [0, 1].map(|i| self.slots[i].as_ref().map(|b| b.addr)),
            locals: [0, 1].map(|i| self.slots[i].as_ref().and_then(|b| b.local)),
            budgets: [0, 1].map(|i| {
                self.slots[i].as_ref().map(|b| SlotBudget {
                    rate: b.budget.rate(),
                    set_at: b.budget_set.0,
                    fresh: b.budget_set.1,
                    previous_rate: b.budget_set.2,
                })
            }),
        }
    }

    /// The slot bound at `addr`. A session never has both slots at one address (a BIND or
    /// REBIND that would do it is refused), so the answer is unambiguous.
    fn slot_of(&self, addr: SocketAddr) -> Option<usize> {
        self.slots
            .iter()
            .position(|b| b.as_ref().is_some_and(|b| b.addr == addr))
    }
}

/// Who asked for what: the part of a BIND or REBIND every answer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The source address.
    pub from: SocketAddr,
    /// The relay address it was sent to, when the socket said.
    pub local: Option<IpAddr>,
    /// The session asked for.
    pub session_id: u64,
    /// The slot asked for.
    pub slot: Slot,
    /// The request's bind sequence number.
    pub seq: u64,
}

/// All sessions of a relay (or of one shard of it), without the token verifier and the
/// address-cookie jar, which [`check`] uses before the table is consulted.
pub struct SessionTable {
    limits: SessionLimits,
    /// The token verifier's tolerated clock skew, for the replay cache and token expiry.
    max_skew_secs: u64,
    replay: TokenReplayCache,
    /// By session id, hashed with [`ids::SessionIds`] (see there why not with SipHash).
    sessions: HashMap<u64, Session, ids::SessionIds>,
    counters: Counters,
    /// Sessions opened, moved and forgotten since the last [`SessionTable::take_events`].
    events: Vec<SessionEvent>,
}

/// A session appearing, changing or leaving the table: what the XDP guard's session filter
/// follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The session's slots (A, B) are bound to these addresses now, with these DATA byte
    /// budgets: after a BIND or REBIND was accepted, after one slot was reaped while the other
    /// stays, or after a reload changed a slot's rate. A session's first `Bound` opens it.
    Bound {
        /// The session id.
        session: u64,
        /// Where slot A and slot B are bound, if they are.
        slots: [Option<SocketAddr>; 2],
        /// The relay address each bound slot was bound through (and DATA to it leaves from),
        /// when the relay knows it: on a socket bound to a wildcard address.
        locals: [Option<IpAddr>; 2],
        /// Each bound slot's DATA byte budget.
        budgets: [Option<SlotBudget>; 2],
    },
    /// The session was closed or reaped, and is forgotten.
    Closed(u64),
}

/// A bound slot's DATA byte budget, as a [`SessionEvent::Bound`] tells it: a token bucket of
/// `rate` bytes a second and a burst of [`SessionLimits::slot_burst`] of it, which was created
/// full at `set_at` (`fresh`) or had its rate changed then, keeping what was saved up to the
/// new burst (a reload). A cache of the budget starts or carries over its meter at `set_at`
/// the same way, and so admits exactly what the table's bucket admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotBudget {
    /// Bytes a second.
    pub rate: u64,
    /// When the bucket was created or last given a new rate.
    pub set_at: Instant,
    /// Created then (full), rather than given a new rate.
    pub fresh: bool,
    /// The rate before `set_at` (the same as `rate` when `fresh`).
    pub previous_rate: u64,
}

impl SessionEvent {
    /// The session the event is about.
    pub fn session(&self) -> u64 {
        match *self {
            SessionEvent::Bound { session, .. } | SessionEvent::Closed(session) => session,
        }
    }
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("sessions", &self.sessions.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn slot_index(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

/// Maps a token failure to the reason a REJECT carries (docs/protocol.md §3.4).
fn reject_reason(err: &TokenError) -> RejectReason {
    match err {
        TokenError::Expired { .. } => RejectReason::TokenExpired,
        TokenError::NotYetValid { .. } => RejectReason::TokenNotYetValid,
        TokenError::WrongSession { .. } | TokenError::WrongSlot { .. } => {
            RejectReason::WrongSession
        }
        TokenError::Replayed => RejectReason::Replayed,
        TokenError::ReplayCacheFull { .. } => RejectReason::Overloaded,
        _ => RejectReason::TokenInvalid,
    }
}

/// Writes a REJECT of `req` into `reply`, authenticated when the slot's keys are known.
fn encode_reject(
    req: &Request,
    reason: RejectReason,
    keys: Option<&SlotKeys>,
    reply: &mut [u8],
) -> Outcome {
    let fields = wire::RejectFields {
        reason,
        slot: req.slot,
        bind_seq: req.seq,
    };
    let written = match keys {
        Some(k) => wire::encode_reject(reply, req.session_id, &fields, |m| k.relay.mac(m)),
        None => wire::encode_reject_unauthenticated(reply, req.session_id, &fields),
    };
    match written {
        Ok(len) => Outcome::Reply {
            to: req.from,
            src: req.local,
            len,
        },
        Err(_) => Outcome::Consumed,
    }
}

/// A CLOSE telling the peer bound to `slot` with `binding` that its binding ended for
/// `reason`: its last accepted sequence number, a MAC under its `K_relay` (docs/protocol.md
/// §3.8).
fn close_notice(sid: u64, slot: Slot, binding: &Binding, reason: CloseReason) -> Option<Notice> {
    let mut datagram = vec![0; HEADER_LEN + CLOSE_BODY_LEN];
    let fields = wire::CloseFields {
        slot,
        reason,
        seq: binding.last_seq,
    };
    let len =
        wire::encode_close(&mut datagram, sid, &fields, |m| binding.keys.relay.mac(m)).ok()?;
    datagram.truncate(len);
    Some(Notice {
        to: binding.addr,
        src: binding.local,
        datagram,
    })
}

impl SessionTable {
    /// An empty table; `max_skew_secs` is the token verifier's tolerated clock skew, by which a
    /// token outlives its `exp` here as it does in the verifier.
    pub fn new(limits: SessionLimits, max_skew_secs: u64) -> Self {
        let replay = TokenReplayCache::new(limits.replay_cache_capacity);
        Self {
            limits,
            max_skew_secs,
            replay,
            sessions: HashMap::default(),
            counters: Counters::default(),
            events: Vec::new(),
        }
    }

    /// The events queued since the last call, oldest first. The owner takes them after every
    /// call that can open or forget a session ([`SessionTable::handle`],
    /// [`SessionTable::reap`]) and hands them on in this order; the table only queues them.
    pub fn take_events(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }

    /// Whether events are waiting for [`SessionTable::take_events`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Applies new limits (SIGHUP) without dropping sessions: slot budgets are re-capped at
    /// the new maximum rate, and each session whose budgets changed gets a
    /// [`SessionEvent::Bound`] with them. The replay cache keeps its size until the relay
    /// restarts.
    pub fn set_limits(&mut self, limits: SessionLimits, now: Instant) {
        for (&id, session) in &mut self.sessions {
            let mut changed = false;
            for binding in session.slots.iter_mut().flatten() {
                let rate = limits.slot_rate(binding.claimed_rate);
                if rate != binding.budget.rate() {
                    changed = true;
                    binding.budget_set = (now, false, binding.budget.rate());
                }
                binding
                    .budget
                    .set_rate(rate, SessionLimits::slot_burst(rate), now);
            }
            if changed {
                self.events.push(session.bound_event(id));
            }
        }
        self.limits = limits;
    }

    /// Bound slots now (both slots of every session count).
    pub fn binding_count(&self) -> usize {
        self.sessions
            .values()
            .map(|s| s.slots.iter().flatten().count())
            .sum()
    }

    /// The counters so far (of what reached the table; [`check`]'s own answers are counted
    /// by the caller, from their [`Tally`]).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether the session is held (half or fully bound).
    pub fn holds(&self, session_id: u64) -> bool {
        self.sessions.contains_key(&session_id)
    }

    /// Sessions currently held (half or fully bound).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Handles one datagram that passed [`check`], charging slots to `ips`. Replies are
    /// written into `reply`, which must hold at least [`wire::MAX_DATAGRAM`] bytes.
    pub fn handle(
        &mut self,
        now: Instant,
        wall: UnixTime,
        input: Input<'_>,
        ips: &mut impl SlotAccounts,
        reply: &mut [u8],
    ) -> Outcome {
        match input {
            Input::Data {
                from,
                session_id,
                len,
            } => self.on_data(now, from, session_id, len),
            Input::Bind(bind) => self.on_bind(now, wall, bind, ips, reply),
            Input::Rebind { req, rebind } => self.on_rebind(now, &req, &rebind, ips, reply),
            Input::Keepalive {
                from,
                local,
                session_id,
            } => self.on_keepalive(now, (from, local), session_id, reply),
            Input::Close(close) => self.on_close(&close, ips, reply),
        }
    }

    /// Unbinds slots idle for longer than the idle timeout or whose token expired more than
    /// the clock skew ago, and forgets sessions with no slot left, giving their slots back to
    /// `ips`. Each unbound slot's peer is told why with an authenticated CLOSE (reason
    /// `EXPIRED` when the token passed `exp` + skew, else `IDLE`), appended to `notices` for
    /// the caller to send. Returns how many bindings went. Call it about once a second.
    pub fn reap(
        &mut self,
        now: Instant,
        wall: UnixTime,
        ips: &mut impl SlotAccounts,
        notices: &mut Vec<Notice>,
    ) -> usize {
        self.reap_seen(now, wall, ips, notices, |_| [None, None])
    }

    /// [`SessionTable::reap`], for a relay whose DATA partly bypasses the table (the XDP fast
    /// path): before a slot is reaped as idle, `seen(session)` says when each slot last sent
    /// DATA elsewhere, and a slot that did so within the idle timeout stays (its last-seen
    /// time moves up to then). Asked only for slots about to be reaped as idle.
    pub fn reap_seen(
        &mut self,
        now: Instant,
        wall: UnixTime,
        ips: &mut impl SlotAccounts,
        notices: &mut Vec<Notice>,
        mut seen: impl FnMut(u64) -> [Option<Instant>; 2],
    ) -> usize {
        let idle = self.limits.idle_timeout;
        let skew = self.max_skew_secs;
        let mut reaped = 0;
        let mut gone = 0;
        let events = &mut self.events;
        let counters = &mut self.counters;
        self.sessions.retain(|&sid, session| {
            let reaped_before = reaped;
            let mut elsewhere = None;
            for ((slot, index), i) in session.slots.iter_mut().zip([Slot::A, Slot::B]).zip(0..) {
                let reason = slot.as_mut().and_then(|b| {
                    if wall >= b.expires.saturating_add(skew) {
                        return Some(CloseReason::Expired);
                    }
                    if now.saturating_duration_since(b.last_seen) < idle {
                        return None;
                    }
                    let seen: &[Option<Instant>; 2] = elsewhere.get_or_insert_with(|| seen(sid));
                    if let Some(at) = seen[i].filter(|at| *at > b.last_seen) {
                        b.last_seen = at;
                    }
                    (now.saturating_duration_since(b.last_seen) >= idle)
                        .then_some(CloseReason::Idle)
                });
                let Some(reason) = reason else {
                    continue;
                };
                if let Some(b) = slot.take() {
                    ips.detach(b.addr.ip());
                    if let Some(notice) = close_notice(sid, index, &b, reason) {
                        counters.count_notice(NoticeKind::of_close(reason));
                        notices.push(notice);
                    }
                }
                reaped += 1;
            }
            let keep = session.slots.iter().any(Option::is_some);
            if !keep {
                gone += 1;
                events.push(SessionEvent::Closed(sid));
            } else if reaped > reaped_before {
                events.push(session.bound_event(sid));
            }
            keep
        });
        counters.reaped += reaped as u64;
        counters.sessions_closed += gone;
        reaped
    }

    fn drop(&mut self, reason: DropReason) -> Outcome {
        self.counters.count_drop(reason);
        Outcome::Drop(reason)
    }

    fn on_data(&mut self, now: Instant, from: SocketAddr, session_id: u64, len: usize) -> Outcome {
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return self.drop(DropReason::DataUnbound);
        };
        let Some(i) = session.slot_of(from) else {
            return self.drop(DropReason::DataUnbound);
        };
        let Some((to, src)) = session.slots[1 - i].as_ref().map(|b| (b.addr, b.local)) else {
            return self.drop(DropReason::DataUnbound);
        };
        let Some(sender) = session.slots[i].as_mut() else {
            return self.drop(DropReason::DataUnbound);
        };
        sender.last_seen = now;
        if !sender.budget.try_take(len as u64, now) {
            return self.drop(DropReason::RateLimited);
        }
        self.counters.forwarded += 1;
        self.counters.forwarded_bytes += len as u64;
        Outcome::Forward { to, src }
    }

    /// Answers `req` with a REJECT authenticated with `keys` (the requester proved them).
    fn reject(
        &mut self,
        req: &Request,
        reason: RejectReason,
        keys: &SlotKeys,
        reply: &mut [u8],
    ) -> Outcome {
        self.counters.count_reject(reason);
        encode_reject(req, reason, Some(keys), reply)
    }

    /// Answers `req` with an unauthenticated REJECT (the requester proved nothing).
    fn reject_unauthenticated(
        &mut self,
        req: &Request,
        reason: RejectReason,
        reply: &mut [u8],
    ) -> Outcome {
        self.counters.count_reject(reason);
        encode_reject(req, reason, None, reply)
    }

    /// Writes into `out` a BIND-ACK for `slot` of session `sid`, bound with `binding`: its
    /// last accepted sequence number and `exp`, MAC'd under its `K_relay`.
    fn encode_ack(
        &self,
        sid: u64,
        slot: Slot,
        binding: &Binding,
        peer_present: bool,
        out: &mut [u8],
    ) -> Result<usize, wire::WireError> {
        let fields = wire::BindAckFields {
            slot,
            peer_present,
            idle_timeout_secs: u32::try_from(self.limits.idle_timeout.as_secs())
                .unwrap_or(u32::MAX),
            bind_seq: binding.last_seq,
            expires_at: binding.expires.as_secs(),
        };
        wire::encode_bind_ack(out, sid, &fields, |m| binding.keys.relay.mac(m))
    }

    /// Acknowledges the binding of `req`'s slot.
    fn ack(&self, req: &Request, reply: &mut [u8]) -> Outcome {
        let i = slot_index(req.slot);
        let Some(session) = self.sessions.get(&req.session_id) else {
            return Outcome::Consumed;
        };
        let Some(binding) = session.slots[i].as_ref() else {
            return Outcome::Consumed;
        };
        let peer_present = session.slots[1 - i].is_some();
        match self.encode_ack(req.session_id, req.slot, binding, peer_present, reply) {
            Ok(len) => Outcome::Reply {
                to: req.from,
                src: req.local,
                len,
            },
            Err(_) => Outcome::Consumed,
        }
    }

    /// Acknowledges the binding of `req`'s slot, which was free until now, and, when the other
    /// slot is bound, tells that slot's peer with an unsolicited BIND-ACK of its own binding
    /// (peer present, docs/protocol.md §3.3), written into `reply` right after the ACK.
    fn ack_and_notify(&mut self, req: &Request, reply: &mut [u8]) -> Outcome {
        let reply_to = self.ack(req, reply);
        let Outcome::Reply { to, src, len } = reply_to else {
            return Outcome::Consumed;
        };
        let other = req.slot.other();
        let Some(binding) = self
            .sessions
            .get(&req.session_id)
            .and_then(|s| s.slots[slot_index(other)].as_ref())
        else {
            return reply_to;
        };
        let (notify, notify_src) = (binding.addr, binding.local);
        let written = reply
            .get_mut(len..)
            .map(|out| self.encode_ack(req.session_id, other, binding, true, out));
        let Some(Ok(notice_len)) = written else {
            return reply_to;
        };
        self.counters.count_notice(NoticeKind::PeerPresent);
        Outcome::ReplyAndNotify {
            to,
            src,
            len,
            notify,
            notify_src,
            notice_len,
        }
    }

    /// Whether the other slot of `req`'s session is bound at `req`'s address: one address may
    /// not hold both slots, or DATA from it could not tell which slot sent it.
    fn other_slot_is_at(&self, req: &Request) -> bool {
        let other = 1 - slot_index(req.slot);
        self.sessions
            .get(&req.session_id)
            .and_then(|s| s.slots[other].as_ref())
            .is_some_and(|b| b.addr == req.from)
    }

    fn on_bind(
        &mut self,
        now: Instant,
        wall: UnixTime,
        bind: Box<VerifiedBind>,
        ips: &mut impl SlotAccounts,
        reply: &mut [u8],
    ) -> Outcome {
        let VerifiedBind {
            req,
            token_id,
            expires,
            claimed_rate,
            keys,
        } = *bind;
        let from = req.from;
        let i = slot_index(req.slot);
        if self.other_slot_is_at(&req) {
            return self.reject(&req, RejectReason::SessionFull, &keys, reply);
        }

        // The slot may already be held: by this token (a retransmission or a duplicate), or by
        // another one (a renewal from the same address, or somebody else).
        let held = self
            .sessions
            .get(&req.session_id)
            .and_then(|s| s.slots[i].as_ref())
            .map(|b| (b.token_id == token_id, b.addr == from, b.last_seq));
        match held {
            Some((true, true, last)) if req.seq >= last => {
                // Same token, same place: the ACK was lost, or a newer sequence. Re-ACK.
                self.touch(req.session_id, i, now, &req);
                self.counters.binds_accepted += 1;
                return self.ack(&req, reply);
            }
            Some((true, _, _)) => {
                // A token already used from another place, or an old sequence: a replay.
                return self.reject(&req, RejectReason::Replayed, &keys, reply);
            }
            Some((false, false, _)) => {
                return self.reject(&req, RejectReason::SessionFull, &keys, reply);
            }
            Some((false, true, _)) | None => {}
        }
        let new_session = !self.sessions.contains_key(&req.session_id);
        if new_session && self.sessions.len() >= self.limits.max_sessions {
            return self.reject(&req, RejectReason::Overloaded, &keys, reply);
        }
        // A renewal replaces a binding at the same address, which holds no extra slot.
        if held.is_none() && ips.may_attach(from.ip()).is_err() {
            return self.reject(&req, RejectReason::Overloaded, &keys, reply);
        }
        if let Err(e) =
            self.replay
                .check_and_insert(token_id, expires, wall, now, self.max_skew_secs)
        {
            return self.reject(&req, reject_reason(&e), &keys, reply);
        }
        let rate = self.limits.slot_rate(claimed_rate);
        let binding = Binding {
            addr: from,
            local: req.local,
            token_id,
            keys: Box::new(keys),
            last_seq: req.seq,
            expires,
            last_seen: now,
            claimed_rate,
            budget: TokenBucket::new(rate, SessionLimits::slot_burst(rate), now),
            budget_set: (now, true, rate),
        };
        if held.is_none() {
            ips.attach(from.ip(), now);
        }
        self.counters.sessions_opened += u64::from(new_session);
        let session = self.sessions.entry(req.session_id).or_default();
        session.slots[i] = Some(binding);
        self.events.push(session.bound_event(req.session_id));
        self.counters.binds_accepted += 1;
        // A renewal replaces a binding the other peer already knows of; a slot bound anew is
        // news to it.
        match held {
            Some(_) => self.ack(&req, reply),
            None => self.ack_and_notify(&req, reply),
        }
    }

    /// Refreshes slot `i` of session `sid` for a BIND accepted again (`req`): its last-seen
    /// time, sequence number, and the relay address it was sent to, which the guard hears of
    /// if it changed.
    fn touch(&mut self, sid: u64, i: usize, now: Instant, req: &Request) {
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        if let Some(b) = session.slots[i].as_mut() {
            b.last_seen = now;
            b.last_seq = req.seq;
            if b.local != req.local {
                b.local = req.local;
                self.events.push(session.bound_event(sid));
            }
        }
    }

    fn on_rebind(
        &mut self,
        now: Instant,
        req: &Request,
        rebind: &wire::Rebind<'_>,
        ips: &mut impl SlotAccounts,
        reply: &mut [u8],
    ) -> Outcome {
        let i = slot_index(req.slot);
        let other_slot_is_at = self.other_slot_is_at(req);
        let Some(binding) = self
            .sessions
            .get_mut(&req.session_id)
            .and_then(|s| s.slots[i].as_mut())
        else {
            return self.reject_unauthenticated(req, RejectReason::UnknownSession, reply);
        };
        if !binding.keys.peer.verify(rebind.mac_input(), rebind.mac()) {
            return self.reject_unauthenticated(req, RejectReason::BadProof, reply);
        }
        // Authenticated from here on, so the answers can be too; the keys are cloned out of
        // the borrow of the table.
        if req.seq <= binding.last_seq {
            let keys = binding.keys.clone();
            return self.reject(req, RejectReason::Replayed, &keys, reply);
        }
        if other_slot_is_at {
            let keys = binding.keys.clone();
            return self.reject(req, RejectReason::SessionFull, &keys, reply);
        }
        if ips
            .move_slot(binding.addr.ip(), req.from.ip(), now)
            .is_err()
        {
            let keys = binding.keys.clone();
            return self.reject(req, RejectReason::Overloaded, &keys, reply);
        }
        binding.addr = req.from;
        binding.local = req.local;
        binding.last_seq = req.seq;
        binding.last_seen = now;
        self.counters.rebinds_accepted += 1;
        if let Some(session) = self.sessions.get(&req.session_id) {
            self.events.push(session.bound_event(req.session_id));
        }
        self.ack(req, reply)
    }

    /// Echoes a KEEPALIVE from `from.0` (sent to `from.1`) if that address is bound.
    fn on_keepalive(
        &mut self,
        now: Instant,
        (from, local): (SocketAddr, Option<IpAddr>),
        sid: u64,
        reply: &mut [u8],
    ) -> Outcome {
        let bound = self.sessions.get_mut(&sid).and_then(|s| {
            let i = s.slot_of(from)?;
            s.slots[i].as_mut()
        });
        let Some(binding) = bound else {
            return self.drop(DropReason::KeepaliveUnbound);
        };
        binding.last_seen = now;
        self.counters.keepalives += 1;
        match wire::encode_keepalive(reply, sid) {
            Ok(len) => Outcome::Reply {
                to: from,
                src: local,
                len,
            },
            Err(_) => Outcome::Consumed,
        }
    }

    fn on_close(
        &mut self,
        close: &wire::Close<'_>,
        ips: &mut impl SlotAccounts,
        reply: &mut [u8],
    ) -> Outcome {
        let (sid, i, seq) = (close.session_id(), slot_index(close.slot()), close.seq());
        let verified = self
            .sessions
            .get(&sid)
            .and_then(|s| s.slots[i].as_ref())
            .is_some_and(|b| {
                seq > b.last_seq && b.keys.peer.verify(close.mac_input(), close.mac())
            });
        if !verified {
            return self.drop(DropReason::BadClose);
        }
        self.counters.closed += 1;
        let Some(session) = self.sessions.remove(&sid) else {
            return Outcome::Consumed;
        };
        self.counters.sessions_closed += 1;
        self.events.push(SessionEvent::Closed(sid));
        for b in session.slots.iter().flatten() {
            ips.detach(b.addr.ip());
        }
        let Some(other) = session.slots[1 - i].as_ref() else {
            return Outcome::Consumed;
        };
        let fields = wire::CloseFields {
            slot: close.slot().other(),
            reason: CloseReason::PeerClosed,
            seq: other.last_seq,
        };
        match wire::encode_close(reply, sid, &fields, |m| other.keys.relay.mac(m)) {
            Ok(len) => {
                self.counters.count_notice(NoticeKind::PeerClosed);
                Outcome::Reply {
                    to: other.addr,
                    src: other.local,
                    len,
                }
            }
            Err(_) => Outcome::Consumed,
        }
    }
}
