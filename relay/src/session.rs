//! The relay's session table, sans-IO: one call per received datagram, one [`Outcome`] back.
//!
//! This module does not touch sockets, threads or the clock. The caller passes the receive
//! time twice: a monotonic [`Instant`] for idle timers and a wall-clock [`UnixTime`] for token
//! validity and address cookies. It implements docs/protocol.md §7 (what the relay does with
//! each packet); the io_uring workers (issue 5) and the in-memory demo both drive it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_core::proof::{CookieJar, SlotKeys};
use ferry_core::time::UnixTime;
use ferry_core::token::{TokenError, TokenReplayCache, TokenVerifier};
use ferry_core::wire::{self, HeaderError, MAX_DATAGRAM, Packet, RejectReason, Slot};

use crate::limits::{IpTable, TokenBucket};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the received datagram, unchanged, to this address.
    Forward {
        /// The other slot's bound address.
        to: SocketAddr,
    },
    /// Send the first `len` bytes of the reply buffer to this address.
    Reply {
        /// Where the reply goes.
        to: SocketAddr,
        /// Bytes written into the reply buffer.
        len: usize,
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
        self.binds_accepted += other.binds_accepted;
        self.rebinds_accepted += other.rebinds_accepted;
        for (sum, n) in self.binds_rejected.iter_mut().zip(other.binds_rejected) {
            *sum += n;
        }
        self.keepalives += other.keepalives;
        self.closed += other.closed;
        self.reaped += other.reaped;
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
}

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it: every update
/// under these locks leaves the tables consistent between statements that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One peer's claim on a slot.
struct Binding {
    addr: SocketAddr,
    token_id: [u8; 16],
    keys: SlotKeys,
    last_seq: u64,
    expires: UnixTime,
    last_seen: Instant,
    /// The rate the token claimed (0 = the relay's default), kept to re-cap on reload.
    claimed_rate: u64,
    /// What the slot may still send.
    budget: TokenBucket,
}

#[derive(Default)]
struct Session {
    slots: [Option<Binding>; 2],
}

impl Session {
    fn slot_of(&self, addr: SocketAddr) -> Option<usize> {
        self.slots
            .iter()
            .position(|b| b.as_ref().is_some_and(|b| b.addr == addr))
    }
}

/// Who asked for what: the part of a BIND or REBIND every answer needs.
struct Request {
    from: SocketAddr,
    session_id: u64,
    slot: Slot,
    seq: u64,
}

/// All sessions of a relay, with the token verifier and the address-cookie jar.
pub struct SessionTable {
    limits: SessionLimits,
    verifier: TokenVerifier,
    replay: TokenReplayCache,
    cookies: CookieJar,
    sessions: HashMap<u64, Session>,
    counters: Counters,
    ips: Arc<Mutex<IpTable>>,
    /// Sessions opened and forgotten since the last [`SessionTable::drain_events`], when the
    /// owner asked for them ([`SessionTable::record_events`]).
    events: Option<Vec<SessionEvent>>,
}

/// A session appearing in or leaving the table: what the XDP guard's session filter follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The first slot of this session bound.
    Opened(u64),
    /// The session was closed or reaped, and is forgotten.
    Closed(u64),
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

impl SessionTable {
    /// A table that admits tokens accepted by `verifier`, answers BINDs with cookies from
    /// `cookies`, and accounts binds per source IP in `ips` (shared with the other shards).
    pub fn new(
        limits: SessionLimits,
        verifier: TokenVerifier,
        cookies: CookieJar,
        ips: Arc<Mutex<IpTable>>,
    ) -> Self {
        let replay = TokenReplayCache::new(limits.replay_cache_capacity);
        Self {
            limits,
            verifier,
            replay,
            cookies,
            sessions: HashMap::new(),
            counters: Counters::default(),
            ips,
            events: None,
        }
    }

    /// From now on, record [`SessionEvent`]s for [`SessionTable::drain_events`]; the owner
    /// must drain them after every call that can open or forget a session (`handle`, `reap`).
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The events recorded since the last call, oldest first (none unless
    /// [`SessionTable::record_events`] was called).
    pub fn drain_events(&mut self) -> impl Iterator<Item = SessionEvent> + '_ {
        self.events.iter_mut().flat_map(|events| events.drain(..))
    }

    fn event(&mut self, event: SessionEvent) {
        if let Some(events) = &mut self.events {
            events.push(event);
        }
    }

    /// The token verifier, to change its trusted gateway keys (SIGHUP).
    pub fn verifier_mut(&mut self) -> &mut TokenVerifier {
        &mut self.verifier
    }

    /// Applies new limits (SIGHUP) without dropping sessions: slot budgets are re-capped at
    /// the new maximum rate. The replay cache keeps its size until the relay restarts.
    pub fn set_limits(&mut self, limits: SessionLimits, now: Instant) {
        for binding in self
            .sessions
            .values_mut()
            .flat_map(|s| s.slots.iter_mut().flatten())
        {
            let rate = limits.slot_rate(binding.claimed_rate);
            binding
                .budget
                .set_rate(rate, SessionLimits::slot_burst(rate), now);
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

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Sessions currently held (half or fully bound).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Handles one datagram received from `from`. Replies are written into `reply`, which
    /// must hold at least [`wire::MAX_DATAGRAM`] bytes.
    pub fn handle(
        &mut self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        let packet = match wire::parse(datagram) {
            Ok(p) => p,
            Err(e) => {
                // Counted by the rule it broke (docs/protocol.md §2.1); body-level problems
                // (reserved bytes, slot, flags) have one bucket of their own.
                let rule = match e {
                    wire::WireError::Header(h) => h.as_index(),
                    _ => HeaderError::COUNT,
                };
                if let Some(n) = self.counters.malformed_by_rule.get_mut(rule) {
                    *n += 1;
                }
                return self.drop(DropReason::Malformed);
            }
        };
        match packet {
            Packet::Data(data) => self.on_data(now, from, data.session_id(), datagram.len()),
            Packet::Bind(bind) => self.on_bind(now, wall, from, &bind, reply),
            Packet::Rebind(rebind) => self.on_rebind(now, wall, from, &rebind, reply),
            Packet::Keepalive(ka) => self.on_keepalive(now, from, ka.session_id(), reply),
            Packet::Close(close) => self.on_close(&close, reply),
            Packet::Challenge(_) | Packet::BindAck(_) | Packet::Reject(_) => {
                self.drop(DropReason::UnexpectedType)
            }
        }
    }

    /// Unbinds slots idle for longer than the idle timeout or whose token has expired, and
    /// forgets sessions with no slot left. Returns how many bindings went. Call it about once
    /// a second.
    pub fn reap(&mut self, now: Instant, wall: UnixTime) -> usize {
        let idle = self.limits.idle_timeout;
        let skew = self.verifier.config().max_skew_secs;
        let mut reaped = 0;
        let mut gone = 0;
        let mut ips = lock(&self.ips);
        let mut forgotten = Vec::new();
        self.sessions.retain(|&sid, session| {
            for slot in session.slots.iter_mut() {
                let stale = slot.as_ref().is_some_and(|b| {
                    now.saturating_duration_since(b.last_seen) >= idle
                        || wall >= b.expires.saturating_add(skew)
                });
                if stale {
                    if let Some(b) = slot.take() {
                        ips.detach(b.addr.ip());
                    }
                    reaped += 1;
                }
            }
            let keep = session.slots.iter().any(Option::is_some);
            gone += u64::from(!keep);
            if !keep {
                forgotten.push(sid);
            }
            keep
        });
        drop(ips);
        for sid in forgotten {
            self.event(SessionEvent::Closed(sid));
        }
        self.counters.reaped += reaped as u64;
        self.counters.sessions_closed += gone;
        reaped
    }

    fn drop(&mut self, reason: DropReason) -> Outcome {
        let c = &mut self.counters;
        match reason {
            DropReason::Malformed => c.malformed += 1,
            DropReason::UnexpectedType => c.unexpected_type += 1,
            DropReason::DataUnbound => c.data_unbound += 1,
            DropReason::KeepaliveUnbound => c.keepalive_unbound += 1,
            DropReason::BadClose => c.bad_close += 1,
            DropReason::RateLimited => c.rate_limited += 1,
            DropReason::BindRateLimited => c.bind_rate_limited += 1,
        }
        Outcome::Drop(reason)
    }

    fn on_data(&mut self, now: Instant, from: SocketAddr, session_id: u64, len: usize) -> Outcome {
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return self.drop(DropReason::DataUnbound);
        };
        let Some(i) = session.slot_of(from) else {
            return self.drop(DropReason::DataUnbound);
        };
        let Some(to) = session.slots[1 - i].as_ref().map(|b| b.addr) else {
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
        Outcome::Forward { to }
    }

    /// Answers `req` with a CHALLENGE carrying a cookie for its source address.
    fn challenge(&mut self, wall: UnixTime, req: &Request, reply: &mut [u8]) -> Outcome {
        let cookie = self
            .cookies
            .issue(wall, req.session_id, req.slot.as_u8(), req.from);
        self.counters.challenges += 1;
        let fields = wire::ChallengeFields {
            bind_seq: req.seq,
            cookie,
        };
        match wire::encode_challenge(reply, req.session_id, &fields) {
            Ok(len) => Outcome::Reply { to: req.from, len },
            Err(_) => Outcome::Consumed,
        }
    }

    /// Answers `req` with a REJECT, authenticated when the relay knows the slot's keys.
    fn reject(
        &mut self,
        req: &Request,
        reason: RejectReason,
        keys: Option<&SlotKeys>,
        reply: &mut [u8],
    ) -> Outcome {
        if let Some(n) = self
            .counters
            .binds_rejected
            .get_mut(usize::from(reason.as_u8()))
        {
            *n += 1;
        }
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
            Ok(len) => Outcome::Reply { to: req.from, len },
            Err(_) => Outcome::Consumed,
        }
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
        let fields = wire::BindAckFields {
            slot: req.slot,
            peer_present: session.slots[1 - i].is_some(),
            idle_timeout_secs: u32::try_from(self.limits.idle_timeout.as_secs())
                .unwrap_or(u32::MAX),
            bind_seq: binding.last_seq,
            expires_at: binding.expires.as_secs(),
        };
        match wire::encode_bind_ack(reply, req.session_id, &fields, |m| {
            binding.keys.relay.mac(m)
        }) {
            Ok(len) => Outcome::Reply { to: req.from, len },
            Err(_) => Outcome::Consumed,
        }
    }

    /// The checks every BIND and REBIND passes before any expensive work: a cookie for its
    /// source address (docs/protocol.md §5), then the source IP's bind rate. `Err` carries the
    /// answer (CHALLENGE or a counted drop).
    fn admit(
        &mut self,
        now: Instant,
        wall: UnixTime,
        req: &Request,
        cookie: &[u8; 16],
        reply: &mut [u8],
    ) -> Result<(), Outcome> {
        if !self
            .cookies
            .check(wall, cookie, req.session_id, req.slot.as_u8(), req.from)
        {
            return Err(self.challenge(wall, req, reply));
        }
        // Rate-limited only once the address is proven, so that nobody can spend another
        // host's bind budget by spoofing its address.
        if lock(&self.ips)
            .try_bind_attempt(req.from.ip(), now)
            .is_err()
        {
            return Err(self.drop(DropReason::BindRateLimited));
        }
        Ok(())
    }

    fn on_bind(
        &mut self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        bind: &wire::Bind<'_>,
        reply: &mut [u8],
    ) -> Outcome {
        let req = Request {
            from,
            session_id: bind.session_id(),
            slot: bind.slot(),
            seq: bind.bind_seq(),
        };
        if let Err(answer) = self.admit(now, wall, &req, bind.cookie(), reply) {
            return answer;
        }
        let verified =
            match self
                .verifier
                .verify(bind.token(), wall, req.session_id, req.slot.as_u8())
            {
                Ok(v) => v,
                Err(e) => return self.reject(&req, reject_reason(&e), None, reply),
            };
        let keys = SlotKeys::derive(&verified.slot_secret);
        if !keys.peer.verify(bind.mac_input(), bind.mac()) {
            return self.reject(&req, RejectReason::BadProof, None, reply);
        }
        let claims = verified.claims;
        let i = slot_index(req.slot);

        // The slot may already be held: by this token (a retransmission or a duplicate), or by
        // another one (a renewal from the same address, or somebody else).
        let held = self
            .sessions
            .get(&req.session_id)
            .and_then(|s| s.slots[i].as_ref())
            .map(|b| (b.token_id == claims.token_id, b.addr == from, b.last_seq));
        match held {
            Some((true, true, last)) if req.seq >= last => {
                // Same token, same place: the ACK was lost, or a newer sequence. Re-ACK.
                self.touch(req.session_id, i, now, req.seq);
                self.counters.binds_accepted += 1;
                return self.ack(&req, reply);
            }
            Some((true, _, _)) => {
                // A token already used from another place, or an old sequence: a replay.
                return self.reject(&req, RejectReason::Replayed, Some(&keys), reply);
            }
            Some((false, false, _)) => {
                return self.reject(&req, RejectReason::SessionFull, Some(&keys), reply);
            }
            Some((false, true, _)) | None => {}
        }
        let new_session = !self.sessions.contains_key(&req.session_id);
        if new_session && self.sessions.len() >= self.limits.max_sessions {
            return self.reject(&req, RejectReason::Overloaded, Some(&keys), reply);
        }
        // A renewal replaces a binding at the same address, which holds no extra slot.
        if held.is_none() && lock(&self.ips).may_attach(from.ip()).is_err() {
            return self.reject(&req, RejectReason::Overloaded, Some(&keys), reply);
        }
        let skew = self.verifier.config().max_skew_secs;
        if let Err(e) = self
            .replay
            .check_and_insert(claims.token_id, claims.expires, wall, skew)
        {
            return self.reject(&req, reject_reason(&e), Some(&keys), reply);
        }
        let rate = self.limits.slot_rate(claims.rate_bytes_per_sec);
        let binding = Binding {
            addr: from,
            token_id: claims.token_id,
            keys,
            last_seq: req.seq,
            expires: claims.expires,
            last_seen: now,
            claimed_rate: claims.rate_bytes_per_sec,
            budget: TokenBucket::new(rate, SessionLimits::slot_burst(rate), now),
        };
        if held.is_none() {
            lock(&self.ips).attach(from.ip(), now);
        }
        self.counters.sessions_opened += u64::from(new_session);
        if new_session {
            self.event(SessionEvent::Opened(req.session_id));
        }
        self.sessions.entry(req.session_id).or_default().slots[i] = Some(binding);
        self.counters.binds_accepted += 1;
        self.ack(&req, reply)
    }

    fn touch(&mut self, sid: u64, i: usize, now: Instant, seq: u64) {
        if let Some(b) = self
            .sessions
            .get_mut(&sid)
            .and_then(|s| s.slots[i].as_mut())
        {
            b.last_seen = now;
            b.last_seq = seq;
        }
    }

    fn on_rebind(
        &mut self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        rebind: &wire::Rebind<'_>,
        reply: &mut [u8],
    ) -> Outcome {
        let req = Request {
            from,
            session_id: rebind.session_id(),
            slot: rebind.slot(),
            seq: rebind.bind_seq(),
        };
        if let Err(answer) = self.admit(now, wall, &req, rebind.cookie(), reply) {
            return answer;
        }
        let i = slot_index(req.slot);
        let Some(binding) = self
            .sessions
            .get_mut(&req.session_id)
            .and_then(|s| s.slots[i].as_mut())
        else {
            return self.reject(&req, RejectReason::UnknownSession, None, reply);
        };
        if !binding.keys.peer.verify(rebind.mac_input(), rebind.mac()) {
            return self.reject(&req, RejectReason::BadProof, None, reply);
        }
        if req.seq <= binding.last_seq {
            // Authenticated, so the answer can be too; the keys are cloned out of the borrow.
            let keys = binding.keys.clone();
            return self.reject(&req, RejectReason::Replayed, Some(&keys), reply);
        }
        let old = binding.addr;
        if old.ip() != from.ip() {
            let mut ips = lock(&self.ips);
            if ips.may_attach(from.ip()).is_err() {
                let keys = binding.keys.clone();
                drop(ips);
                return self.reject(&req, RejectReason::Overloaded, Some(&keys), reply);
            }
            ips.detach(old.ip());
            ips.attach(from.ip(), now);
        }
        binding.addr = from;
        binding.last_seq = req.seq;
        binding.last_seen = now;
        self.counters.rebinds_accepted += 1;
        self.ack(&req, reply)
    }

    fn on_keepalive(
        &mut self,
        now: Instant,
        from: SocketAddr,
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
            Ok(len) => Outcome::Reply { to: from, len },
            Err(_) => Outcome::Consumed,
        }
    }

    fn on_close(&mut self, close: &wire::Close<'_>, reply: &mut [u8]) -> Outcome {
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
        self.event(SessionEvent::Closed(sid));
        {
            let mut ips = lock(&self.ips);
            for b in session.slots.iter().flatten() {
                ips.detach(b.addr.ip());
            }
        }
        let Some(other) = session.slots[1 - i].as_ref() else {
            return Outcome::Consumed;
        };
        let fields = wire::CloseFields {
            slot: close.slot().other(),
            seq: other.last_seq,
        };
        match wire::encode_close(reply, sid, &fields, |m| other.keys.relay.mac(m)) {
            Ok(len) => Outcome::Reply {
                to: other.addr,
                len,
            },
            Err(_) => Outcome::Consumed,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use ferry_core::keys::{GatewaySigningKey, RelayPublicKey, RelayStaticKey};
    use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter, VerifierConfig};
    use ferry_core::wire::{BindFields, CloseFields, MAX_DATAGRAM, RebindFields};
    use ring::rand::SystemRandom;

    use super::*;
    use crate::limits::IpLimits;

    const RELAY_ID: u64 = 77;
    const SID: u64 = 0xfeed_f00d;
    const T0: UnixTime = UnixTime(1_900_000_000);

    fn v4(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)), port)
    }

    /// A relay with one trusted gateway, and the means to mint tokens for it.
    struct Fixture {
        table: SessionTable,
        minter: TokenMinter,
        relay_public: RelayPublicKey,
        now: Instant,
        reply: Vec<u8>,
        rng: SystemRandom,
    }

    impl Fixture {
        fn new(limits: SessionLimits) -> Self {
            let rng = SystemRandom::new();
            let relay = RelayStaticKey::generate(&rng).unwrap();
            let relay_public = relay.public();
            let minter = TokenMinter::new(3, GatewaySigningKey::generate(&rng).unwrap());
            let mut verifier = TokenVerifier::new(VerifierConfig::new(RELAY_ID), relay).unwrap();
            verifier.add_trusted_key(3, minter.public());
            let cookies = CookieJar::generate(&rng).unwrap();
            let ips = Arc::new(Mutex::new(IpTable::new(IpLimits::default())));
            Self {
                table: SessionTable::new(limits, verifier, cookies, ips),
                minter,
                relay_public,
                now: Instant::now(),
                reply: vec![0; MAX_DATAGRAM],
                rng,
            }
        }

        fn mint(&self, sid: u64, slot: Slot) -> MintedToken {
            let input = ClaimsInput {
                slot,
                relay_id: RELAY_ID,
                session_id: sid,
                not_before: T0,
                expires: T0.saturating_add(600),
                rate_bytes_per_sec: 0,
            };
            self.minter
                .mint(&self.rng, &input, &self.relay_public)
                .unwrap()
        }

        fn send(&mut self, from: SocketAddr, datagram: &[u8]) -> Outcome {
            self.table
                .handle(self.now, T0, from, datagram, &mut self.reply)
        }

        fn reply_packet(&self, outcome: Outcome) -> Packet<'_> {
            let Outcome::Reply { len, .. } = outcome else {
                panic!("expected a reply, got {outcome:?}");
            };
            wire::parse(&self.reply[..len]).unwrap()
        }

        /// A BIND for `token` with `cookie`, proved with the token's slot secret.
        fn bind_packet(
            &self,
            token: &MintedToken,
            slot: Slot,
            seq: u64,
            cookie: [u8; 16],
        ) -> Vec<u8> {
            let keys = SlotKeys::derive(&token.slot_secret);
            let fields = BindFields {
                slot,
                bind_seq: seq,
                cookie,
                token: &token.bytes,
            };
            let mut buf = vec![0; MAX_DATAGRAM];
            let n = wire::encode_bind(&mut buf, token.claims.session_id, &fields, |m| {
                keys.peer.mac(m)
            })
            .unwrap();
            buf.truncate(n);
            buf
        }

        /// The cookie the relay hands `from` in a CHALLENGE.
        fn cookie_for(&mut self, from: SocketAddr, token: &MintedToken, slot: Slot) -> [u8; 16] {
            let probe = self.bind_packet(token, slot, 1, [0; 16]);
            let outcome = self.send(from, &probe);
            match self.reply_packet(outcome) {
                Packet::Challenge(c) => *c.cookie(),
                other => panic!("expected CHALLENGE, got {other:?}"),
            }
        }

        /// Runs the whole BIND exchange and returns the relay's final answer.
        fn bind(&mut self, from: SocketAddr, token: &MintedToken, slot: Slot, seq: u64) -> Outcome {
            let cookie = self.cookie_for(from, token, slot);
            let bind = self.bind_packet(token, slot, seq, cookie);
            self.send(from, &bind)
        }

        fn expect_ack(&mut self, outcome: Outcome) -> bool {
            match self.reply_packet(outcome) {
                Packet::BindAck(ack) => ack.peer_present(),
                other => panic!("expected BIND-ACK, got {other:?}"),
            }
        }

        fn expect_reject(&mut self, outcome: Outcome) -> (RejectReason, bool) {
            match self.reply_packet(outcome) {
                Packet::Reject(r) => (r.reason(), r.authenticated()),
                other => panic!("expected REJECT, got {other:?}"),
            }
        }

        fn data(&self, sid: u64) -> Vec<u8> {
            let mut buf = vec![0; MAX_DATAGRAM];
            let n = wire::encode_data(&mut buf, sid, b"ciphertext the relay cannot read").unwrap();
            buf.truncate(n);
            buf
        }

        /// Both slots of session `SID` bound, at `a` and `b`.
        fn bound_pair(&mut self, a: SocketAddr, b: SocketAddr) -> (MintedToken, MintedToken) {
            let ta = self.mint(SID, Slot::A);
            let tb = self.mint(SID, Slot::B);
            let outcome = self.bind(a, &ta, Slot::A, 10);
            assert!(!self.expect_ack(outcome), "B is not bound yet");
            let outcome = self.bind(b, &tb, Slot::B, 10);
            assert!(self.expect_ack(outcome), "A is bound");
            (ta, tb)
        }
    }

    #[test]
    fn two_peers_bind_and_data_is_forwarded_both_ways() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        f.bound_pair(a, b);
        let data = f.data(SID);
        assert_eq!(f.send(a, &data), Outcome::Forward { to: b });
        assert_eq!(f.send(b, &data), Outcome::Forward { to: a });
        assert_eq!(f.table.counters().forwarded, 2);
        assert_eq!(f.table.counters().binds_accepted, 2);
        assert_eq!(f.table.counters().challenges, 2);
    }

    #[test]
    fn ipv6_peers_bind_and_forward() {
        let mut f = Fixture::new(SessionLimits::default());
        let a = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            1000,
        );
        let b = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
            2000,
        );
        f.bound_pair(a, b);
        assert_eq!(f.send(a, &f.data(SID)), Outcome::Forward { to: b });
    }

    #[test]
    fn a_challenge_is_smaller_than_the_bind_that_caused_it() {
        let mut f = Fixture::new(SessionLimits::default());
        let token = f.mint(SID, Slot::A);
        let bind = f.bind_packet(&token, Slot::A, 1, [0; 16]);
        let Outcome::Reply { len, .. } = f.send(v4(1, 1), &bind) else {
            panic!("expected a CHALLENGE");
        };
        assert!(len < bind.len(), "{len} >= {}", bind.len());
        assert_eq!(f.table.session_count(), 0, "no state before a valid cookie");
    }

    #[test]
    fn data_from_strangers_and_half_bound_sessions_is_dropped() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, mallory) = (v4(1, 1000), v4(66, 6666));
        let data = f.data(SID);
        assert_eq!(f.send(a, &data), Outcome::Drop(DropReason::DataUnbound));
        let ta = f.mint(SID, Slot::A);
        let outcome = f.bind(a, &ta, Slot::A, 1);
        f.expect_ack(outcome);
        assert_eq!(
            f.send(a, &data),
            Outcome::Drop(DropReason::DataUnbound),
            "B not bound"
        );
        let outcome = f.bind(v4(2, 2000), &f.mint(SID, Slot::B), Slot::B, 1);
        f.expect_ack(outcome);
        assert_eq!(
            f.send(mallory, &data),
            Outcome::Drop(DropReason::DataUnbound)
        );
        assert_eq!(f.table.counters().data_unbound, 3);
        assert_eq!(f.table.counters().forwarded, 0);
    }

    #[test]
    fn a_stolen_token_without_the_slot_secret_is_rejected() {
        let mut f = Fixture::new(SessionLimits::default());
        let mallory = v4(66, 6666);
        let token = f.mint(SID, Slot::A);
        let cookie = f.cookie_for(mallory, &token, Slot::A);
        let fields = BindFields {
            slot: Slot::A,
            bind_seq: 5,
            cookie,
            token: &token.bytes,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_bind(&mut buf, SID, &fields, |_| [0xab; 16]).unwrap();
        let outcome = f.send(mallory, &buf[..n]);
        assert_eq!(f.expect_reject(outcome), (RejectReason::BadProof, false));
        assert_eq!(f.table.session_count(), 0);
    }

    #[test]
    fn a_replayed_bind_from_another_address_gets_only_a_challenge() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, mallory) = (v4(1, 1000), v4(66, 6666));
        let token = f.mint(SID, Slot::A);
        let cookie = f.cookie_for(a, &token, Slot::A);
        let bind = f.bind_packet(&token, Slot::A, 7, cookie);
        let outcome = f.send(a, &bind);
        f.expect_ack(outcome);
        // The captured BIND, replayed verbatim from elsewhere: its cookie is a's.
        let outcome = f.send(mallory, &bind);
        assert!(matches!(f.reply_packet(outcome), Packet::Challenge(_)));
        // Replayed from a's own address it changes nothing: the same binding is re-acknowledged.
        let outcome = f.send(a, &bind);
        f.expect_ack(outcome);
        assert_eq!(f.table.session_count(), 1);
    }

    #[test]
    fn the_same_token_from_another_place_is_a_replay() {
        let mut f = Fixture::new(SessionLimits::default());
        let token = f.mint(SID, Slot::A);
        let outcome = f.bind(v4(1, 1000), &token, Slot::A, 7);
        f.expect_ack(outcome);
        // Whoever holds the secret must use REBIND to move; a second BIND is refused.
        let outcome = f.bind(v4(9, 9000), &token, Slot::A, 8);
        assert_eq!(f.expect_reject(outcome), (RejectReason::Replayed, true));
        // And an older sequence number from the bound address is refused too.
        let outcome = f.bind(v4(1, 1000), &token, Slot::A, 6);
        assert_eq!(f.expect_reject(outcome), (RejectReason::Replayed, true));
    }

    #[test]
    fn a_slot_held_by_another_token_is_full() {
        let mut f = Fixture::new(SessionLimits::default());
        let first = f.mint(SID, Slot::A);
        let second = f.mint(SID, Slot::A);
        let outcome = f.bind(v4(1, 1000), &first, Slot::A, 1);
        f.expect_ack(outcome);
        let outcome = f.bind(v4(2, 2000), &second, Slot::A, 1);
        assert_eq!(f.expect_reject(outcome), (RejectReason::SessionFull, true));
        // From the holder's own address a fresh token renews the binding.
        let outcome = f.bind(v4(1, 1000), &second, Slot::A, 2);
        f.expect_ack(outcome);
    }

    #[test]
    fn bad_tokens_are_rejected_with_their_reason() {
        let mut f = Fixture::new(SessionLimits::default());
        let a = v4(1, 1000);
        // A token for slot B presented in a BIND for slot A.
        let token_b = f.mint(SID, Slot::B);
        let outcome = f.bind(a, &token_b, Slot::A, 1);
        assert_eq!(
            f.expect_reject(outcome),
            (RejectReason::WrongSession, false)
        );
        // A token for another session presented under SID: rebuild the BIND under SID.
        let other = f.mint(SID + 1, Slot::A);
        let cookie = f.cookie_for(a, &f.mint(SID, Slot::A), Slot::A);
        let keys = SlotKeys::derive(&other.slot_secret);
        let fields = BindFields {
            slot: Slot::A,
            bind_seq: 2,
            cookie,
            token: &other.bytes,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_bind(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
        let outcome = f.send(a, &buf[..n]);
        assert_eq!(
            f.expect_reject(outcome),
            (RejectReason::WrongSession, false)
        );
        // An expired token.
        let token = f.mint(SID, Slot::A);
        let cookie = f.cookie_for(a, &token, Slot::A);
        let bind = f.bind_packet(&token, Slot::A, 3, cookie);
        let late = T0.saturating_add(600 + 31);
        let outcome = f.table.handle(f.now, late, a, &bind, &mut f.reply);
        // The cookie window has moved on by then, so the relay first asks for a new cookie.
        assert!(matches!(f.reply_packet(outcome), Packet::Challenge(_)));
        let Packet::Challenge(c) = f.reply_packet(outcome) else {
            unreachable!()
        };
        let cookie = *c.cookie();
        let bind = f.bind_packet(&token, Slot::A, 4, cookie);
        let outcome = f.table.handle(f.now, late, a, &bind, &mut f.reply);
        assert_eq!(
            f.expect_reject(outcome),
            (RejectReason::TokenExpired, false)
        );
        let expired = RejectReason::TokenExpired.as_u8() as usize;
        assert_eq!(f.table.counters().binds_rejected[expired], 1);
    }

    #[test]
    fn rebind_moves_the_slot_only_with_proof() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, b, a2) = (v4(1, 1000), v4(2, 2000), v4(3, 3000));
        let (ta, _) = f.bound_pair(a, b);
        let keys = SlotKeys::derive(&ta.slot_secret);
        let rebind = |cookie, seq, good: bool| {
            let fields = RebindFields {
                slot: Slot::A,
                bind_seq: seq,
                cookie,
            };
            let mut buf = vec![0; MAX_DATAGRAM];
            let n = wire::encode_rebind(&mut buf, SID, &fields, |m| {
                if good { keys.peer.mac(m) } else { [0; 16] }
            })
            .unwrap();
            buf.truncate(n);
            buf
        };
        let outcome = f.send(a2, &rebind([0; 16], 11, true));
        let Packet::Challenge(c) = f.reply_packet(outcome) else {
            panic!("expected CHALLENGE");
        };
        let cookie = *c.cookie();
        let outcome = f.send(a2, &rebind(cookie, 11, false));
        assert_eq!(f.expect_reject(outcome), (RejectReason::BadProof, false));
        let outcome = f.send(a2, &rebind(cookie, 11, true));
        f.expect_ack(outcome);
        let outcome = f.send(a2, &rebind(cookie, 11, true));
        assert_eq!(f.expect_reject(outcome), (RejectReason::Replayed, true));
        let data = f.data(SID);
        assert_eq!(f.send(a2, &data), Outcome::Forward { to: b });
        assert_eq!(f.send(b, &data), Outcome::Forward { to: a2 });
        assert_eq!(f.send(a, &data), Outcome::Drop(DropReason::DataUnbound));
        assert_eq!(f.table.counters().rebinds_accepted, 1);
    }

    #[test]
    fn rebind_of_an_unknown_session_is_rejected() {
        let mut f = Fixture::new(SessionLimits::default());
        let from = v4(3, 3000);
        let token = f.mint(SID, Slot::A);
        let cookie = f.cookie_for(from, &token, Slot::A);
        let fields = RebindFields {
            slot: Slot::A,
            bind_seq: 1,
            cookie,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_rebind(&mut buf, SID, &fields, |_| [0; 16]).unwrap();
        let outcome = f.send(from, &buf[..n]);
        assert_eq!(
            f.expect_reject(outcome),
            (RejectReason::UnknownSession, false)
        );
    }

    #[test]
    fn keepalives_are_echoed_only_to_bound_sources() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        f.bound_pair(a, b);
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = wire::encode_keepalive(&mut buf, SID).unwrap();
        let outcome = f.send(a, &buf[..n]);
        assert_eq!(outcome, Outcome::Reply { to: a, len: n });
        assert_eq!(
            f.send(v4(66, 1), &buf[..n]),
            Outcome::Drop(DropReason::KeepaliveUnbound)
        );
    }

    #[test]
    fn a_verified_close_ends_the_session_and_tells_the_other_peer() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        let (ta, tb) = f.bound_pair(a, b);
        let close = |keys: &SlotKeys, seq| {
            let mut buf = vec![0; MAX_DATAGRAM];
            let fields = CloseFields { slot: Slot::A, seq };
            let n = wire::encode_close(&mut buf, SID, &fields, |m| keys.peer.mac(m)).unwrap();
            buf.truncate(n);
            buf
        };
        let wrong = SlotKeys::derive(&tb.slot_secret);
        assert_eq!(
            f.send(a, &close(&wrong, 99)),
            Outcome::Drop(DropReason::BadClose)
        );
        let keys = SlotKeys::derive(&ta.slot_secret);
        assert_eq!(
            f.send(a, &close(&keys, 10)),
            Outcome::Drop(DropReason::BadClose),
            "stale seq"
        );
        let outcome = f.send(a, &close(&keys, 11));
        let Outcome::Reply { to, len } = outcome else {
            panic!("expected a CLOSE for b, got {outcome:?}");
        };
        assert_eq!(to, b);
        let Ok(Packet::Close(c)) = wire::parse(&f.reply[..len]) else {
            panic!("expected CLOSE");
        };
        let b_keys = SlotKeys::derive(&tb.slot_secret);
        assert!(
            b_keys.relay.verify(c.mac_input(), c.mac()),
            "relay CLOSE is authenticated"
        );
        assert_eq!(f.table.session_count(), 0);
        assert_eq!(
            f.send(a, &f.data(SID)),
            Outcome::Drop(DropReason::DataUnbound)
        );
    }

    #[test]
    fn idle_and_expired_bindings_are_reaped() {
        let limits = SessionLimits {
            idle_timeout: Duration::from_secs(60),
            ..SessionLimits::default()
        };
        let mut f = Fixture::new(limits);
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        f.bound_pair(a, b);
        assert_eq!(f.table.reap(f.now + Duration::from_secs(59), T0), 0);
        // A keeps talking, B falls silent.
        f.now += Duration::from_secs(59);
        assert_eq!(f.send(a, &f.data(SID)), Outcome::Forward { to: b });
        assert_eq!(f.table.reap(f.now + Duration::from_secs(1), T0), 1);
        assert_eq!(
            f.send(a, &f.data(SID)),
            Outcome::Drop(DropReason::DataUnbound)
        );
        assert_eq!(f.table.session_count(), 1);
        // The token expires (600 s lifetime + 30 s skew) although A is active.
        assert_eq!(f.table.reap(f.now, T0.saturating_add(630)), 1);
        assert_eq!(f.table.session_count(), 0);
        assert_eq!(f.table.counters().reaped, 2);
    }

    #[test]
    fn the_session_cap_sheds_new_sessions() {
        let limits = SessionLimits {
            max_sessions: 1,
            ..SessionLimits::default()
        };
        let mut f = Fixture::new(limits);
        let outcome = f.bind(v4(1, 1), &f.mint(SID, Slot::A), Slot::A, 1);
        f.expect_ack(outcome);
        let outcome = f.bind(v4(2, 2), &f.mint(SID + 1, Slot::A), Slot::A, 1);
        assert_eq!(f.expect_reject(outcome), (RejectReason::Overloaded, true));
        // The other slot of an existing session is not a new session.
        let outcome = f.bind(v4(3, 3), &f.mint(SID, Slot::B), Slot::B, 1);
        f.expect_ack(outcome);
    }

    #[test]
    fn garbage_and_relay_only_types_are_dropped_and_counted() {
        let mut f = Fixture::new(SessionLimits::default());
        assert_eq!(
            f.send(v4(1, 1), b"\x00\x01garbage"),
            Outcome::Drop(DropReason::Malformed)
        );
        let mut buf = vec![0; MAX_DATAGRAM];
        let fields = wire::ChallengeFields {
            bind_seq: 1,
            cookie: [7; 16],
        };
        let n = wire::encode_challenge(&mut buf, SID, &fields).unwrap();
        assert_eq!(
            f.send(v4(1, 1), &buf[..n]),
            Outcome::Drop(DropReason::UnexpectedType)
        );
        assert_eq!(f.table.counters().malformed, 1);
        assert_eq!(f.table.counters().unexpected_type, 1);
        // Counted by the rule broken: b"\x00\x01garbage" is 9 bytes, too short for a header.
        let too_short = HeaderError::TooShort.as_index();
        assert_eq!(f.table.counters().malformed_by_rule[too_short], 1);
        let mut bad_magic = buf[..n].to_vec();
        bad_magic[0] ^= 0xff;
        f.send(v4(1, 1), &bad_magic);
        let by_rule = f.table.counters().malformed_by_rule;
        assert_eq!(by_rule[HeaderError::BadMagic.as_index()], 1);
        assert_eq!(by_rule.iter().sum::<u64>(), f.table.counters().malformed);
    }

    #[test]
    fn data_over_the_slot_budget_is_dropped_and_the_other_direction_is_not() {
        let limits = SessionLimits {
            default_session_rate: 10_000,
            ..SessionLimits::default()
        };
        let mut f = Fixture::new(limits);
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        f.bound_pair(a, b);
        let mut big = vec![0; MAX_DATAGRAM];
        let n = wire::encode_data(&mut big, SID, &[9; 1000]).unwrap();
        big.truncate(n);
        // A burst of 10,000 bytes: nine 1016-byte datagrams fit, the tenth does not.
        let forwarded = (0..10)
            .filter(|_| f.send(a, &big) == Outcome::Forward { to: b })
            .count();
        assert_eq!(forwarded, 9);
        assert_eq!(f.table.counters().rate_limited, 1);
        // B's budget is its own.
        assert_eq!(f.send(b, &big), Outcome::Forward { to: a });
        // A second later A may send again.
        f.now += Duration::from_secs(1);
        assert_eq!(f.send(a, &big), Outcome::Forward { to: b });
    }

    #[test]
    fn a_token_rate_claim_is_capped_by_the_relay_and_reload_recaps_it() {
        let limits = SessionLimits {
            default_session_rate: 1_000_000,
            max_session_rate: 2_000_000,
            ..SessionLimits::default()
        };
        assert_eq!(limits.slot_rate(0), 1_000_000);
        assert_eq!(limits.slot_rate(500), 500);
        assert_eq!(limits.slot_rate(9_000_000), 2_000_000);
        let mut f = Fixture::new(limits.clone());
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        f.bound_pair(a, b);
        let data = f.data(SID);
        let fits = |f: &mut Fixture| {
            (0..100_000)
                .take_while(|_| f.send(a, &data) == Outcome::Forward { to: b })
                .count()
        };
        let before = fits(&mut f);
        assert_eq!(before as u64, 1_000_000 / data.len() as u64);
        // Cap every slot at 3000 bytes/s: after a refill only a few datagrams fit.
        let tight = SessionLimits {
            default_session_rate: 3000,
            max_session_rate: 3000,
            ..limits
        };
        f.table.set_limits(tight, f.now);
        f.now += Duration::from_secs(10);
        assert_eq!(fits(&mut f) as u64, 3000 / data.len() as u64);
    }

    #[test]
    fn binds_over_the_per_ip_rate_are_dropped_after_the_cookie() {
        let mut f = Fixture::new(SessionLimits::default());
        let ips = IpLimits {
            bind_rate: 1.0,
            bind_burst: 2,
            ..IpLimits::default()
        };
        *lock(&f.table.ips) = IpTable::new(ips);
        let a = v4(1, 1000);
        let token = f.mint(SID, Slot::A);
        // Cookie-less BINDs are answered with CHALLENGEs and not charged to the IP.
        for _ in 0..5 {
            f.cookie_for(a, &token, Slot::A);
        }
        let cookie = f.cookie_for(a, &token, Slot::A);
        let bind = f.bind_packet(&token, Slot::A, 1, cookie);
        let outcome = f.send(a, &bind);
        f.expect_ack(outcome);
        let outcome = f.send(a, &bind);
        f.expect_ack(outcome);
        assert_eq!(f.send(a, &bind), Outcome::Drop(DropReason::BindRateLimited));
        assert_eq!(f.table.counters().bind_rate_limited, 1);
    }

    #[test]
    fn an_ip_may_hold_only_so_many_slots() {
        let mut f = Fixture::new(SessionLimits::default());
        let ips = IpLimits {
            max_bindings: 2,
            ..IpLimits::default()
        };
        *lock(&f.table.ips) = IpTable::new(ips);
        for (k, port) in [1000u16, 1001].into_iter().enumerate() {
            let token = f.mint(SID + k as u64, Slot::A);
            let outcome = f.bind(v4(1, port), &token, Slot::A, 1);
            f.expect_ack(outcome);
        }
        let third = f.mint(SID + 2, Slot::A);
        let outcome = f.bind(v4(1, 1002), &third, Slot::A, 1);
        assert_eq!(f.expect_reject(outcome), (RejectReason::Overloaded, true));
        // Another IP is not affected, and reaping gives the slots back.
        let outcome = f.bind(v4(2, 1000), &third, Slot::A, 1);
        f.expect_ack(outcome);
        f.table.reap(f.now + Duration::from_secs(3600), T0);
        assert_eq!(lock(&f.table.ips).bindings(v4(1, 0).ip()), 0);
        assert_eq!(f.table.counters().sessions_opened, 3);
        assert_eq!(f.table.counters().sessions_closed, 3);
    }

    #[test]
    fn removing_a_gateway_key_refuses_its_new_tokens_but_keeps_bound_sessions() {
        let mut f = Fixture::new(SessionLimits::default());
        let (a, b) = (v4(1, 1000), v4(2, 2000));
        f.bound_pair(a, b);
        f.table.verifier_mut().remove_trusted_key(3);
        let token = f.mint(SID + 1, Slot::A);
        let outcome = f.bind(v4(3, 3000), &token, Slot::A, 1);
        assert_eq!(
            f.expect_reject(outcome),
            (RejectReason::TokenInvalid, false)
        );
        assert_eq!(f.send(a, &f.data(SID)), Outcome::Forward { to: b });
    }
}
