//! The session tables every worker shares, sharded by session id, and the workers' handler
//! that drives them ([`SessionsHandler`]).
//!
//! `SO_REUSEPORT` hashes each source 4-tuple to one worker, so the two directions of a session
//! usually arrive on different workers. Both must reach the same session state, so the state is
//! shared: [`Sessions`] holds a power-of-two number of [`SessionTable`] shards, each behind its
//! own mutex, and a datagram locks only the shard of its session id. A DATA datagram holds the
//! lock for one hash lookup, an address compare and a token-bucket update; two workers contend
//! only when they touch the same shard at the same instant. Session ids are random (the gateway
//! draws them), so shards fill evenly. docs/architecture.md records why this was chosen over
//! steering with a reuseport eBPF program.
//!
//! What needs no session state runs before any shard is locked ([`session::check`]): parsing,
//! address cookies, and a BIND's token and proof verification, the expensive part of a BIND.
//! Limits that span sessions live outside the shards: per-source accounting in one shared
//! [`IpTable`] (touched only by BIND/REBIND, close and reap), and the session cap, which each
//! shard enforces for its share (`max_sessions / shards`, rounded up).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ferry_core::proof::CookieJar;
use ferry_core::time::UnixTime;
use ferry_core::token::TokenVerifier;

use crate::limits::{IpLimits, IpRefusal, IpTable, SlotAccounts};
use crate::security_log::{Event, FLUSH_INTERVAL, SecurityLog};
use crate::session::{
    self, Checked, Counters, Notice, Outcome, SessionEvent, SessionLimits, SessionTable,
};
use crate::worker::PacketHandler;

/// Told when a session opens, moves or is forgotten: the XDP guard's session filter
/// (`crate::xdp::SessionFilter`) follows the tables this way.
pub trait SessionObserver: Send + Sync + std::fmt::Debug {
    /// Called with no shard locked, in order per session; a `Bound` arrives before the
    /// BIND-ACK of the BIND or REBIND that made it is handed to the worker (see [`Sessions`]).
    fn session_event(&self, event: SessionEvent);

    /// When each slot of `session` last sent DATA that did not reach the tables (forwarded by
    /// the XDP fast path), if it has: the reaper asks before it unbinds a slot as idle. Called
    /// with the session's shard locked.
    fn last_seen(&self, session: u64) -> [Option<Instant>; 2] {
        let _ = session;
        [None, None]
    }
}

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it: every update
/// under these locks leaves the tables consistent between statements that can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Shards per relay. A power of two well above the worker count keeps contention rare.
pub const SHARDS: usize = 64;

/// One shard: its table, and what goes with it.
struct Shard {
    table: Mutex<SessionTable>,
    /// What [`session::check`] answered by itself for this shard's sessions, counted apart so
    /// that those answers never wait for the table.
    early: Mutex<Counters>,
    /// Held while this shard's events reach the observer (see [`Sessions`]).
    publish: Mutex<()>,
}

/// All sessions of the relay, shared by every worker.
///
/// Session events reach the observer outside the shard lock, like commands a sans-IO core
/// hands its IO layer, yet in order per session and, for `Bound`, before the BIND-ACK leaves.
/// The table queues them; [`Sessions`] takes the shard's publish lock *before* it releases the
/// shard lock, releases the shard lock, hands the events over, and releases the publish lock.
/// Why that keeps both rules:
///
/// - Order. Events of one session are only made under its shard's lock. Say worker 1 makes
///   events E1, then worker 2 makes E2 for the same session. Worker 2 got the shard lock after
///   worker 1 released it, and worker 1 held the publish lock by then; worker 2 asks for the
///   publish lock only while it holds the shard lock, so it gets it after worker 1 has handed
///   over E1 and let go. The publish lock is thus taken in the order the shard lock was, and
///   E1 reaches the observer before E2.
/// - The map learns a binding first. [`Sessions::handle`] returns the BIND-ACK only after it
///   has handed over the `Bound` the BIND or REBIND made, so the worker sends it afterwards
///   (and the peer's first DATA from that address finds it in the map).
/// - No deadlock. The locks are taken in one order (shard, then publish, then whatever the
///   observer takes, which is never a shard lock), and a thread waiting for a publish lock
///   holds at most one shard lock, the one the publish lock belongs to.
///
/// DATA, KEEPALIVE and every CHALLENGE or REJECT make no event and never touch a publish lock.
pub struct Sessions {
    shards: Vec<Shard>,
    ips: Mutex<IpTable>,
    /// Replaced as a whole on SIGHUP; a BIND verifies with the one it finds.
    verifier: RwLock<Arc<TokenVerifier>>,
    cookies: CookieJar,
    observer: Option<Arc<dyn SessionObserver>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The per-source table shared by the shards, locked for each change (never while a BIND is
/// verified).
struct SharedIps<'a>(&'a Mutex<IpTable>);

impl SlotAccounts for SharedIps<'_> {
    fn may_attach(&self, ip: IpAddr) -> Result<(), IpRefusal> {
        lock(self.0).may_attach(ip)
    }

    fn attach(&mut self, ip: IpAddr, now: Instant) {
        lock(self.0).attach(ip, now);
    }

    fn detach(&mut self, ip: IpAddr) {
        lock(self.0).detach(ip);
    }

    fn move_slot(&mut self, from: IpAddr, to: IpAddr, now: Instant) -> Result<(), IpRefusal> {
        lock(self.0).move_slot(from, to, now)
    }
}

/// The cap each shard enforces so that the shards together hold at most about `total`.
fn per_shard_cap(total: usize) -> usize {
    total.div_ceil(SHARDS).max(1)
}

/// One shard's share of the relay-wide limits.
fn shard_limits(limits: SessionLimits) -> SessionLimits {
    SessionLimits {
        max_sessions: per_shard_cap(limits.max_sessions),
        replay_cache_capacity: per_shard_cap(limits.replay_cache_capacity),
        ..limits
    }
}

impl Sessions {
    /// Empty tables. BINDs are verified with `verifier` (its trusted keys change on
    /// [`Sessions::reload`]) and cookies checked with one secret, so a cookie is valid for
    /// every shard.
    pub fn new(
        limits: SessionLimits,
        ip_limits: IpLimits,
        verifier: TokenVerifier,
        cookies: CookieJar,
    ) -> Self {
        let shard_limits = shard_limits(limits);
        let skew = verifier.config().max_skew_secs;
        let shards = (0..SHARDS)
            .map(|_| Shard {
                table: Mutex::new(SessionTable::new(shard_limits.clone(), skew)),
                early: Mutex::new(Counters::default()),
                publish: Mutex::new(()),
            })
            .collect();
        Self {
            shards,
            ips: Mutex::new(IpTable::new(ip_limits)),
            verifier: RwLock::new(Arc::new(verifier)),
            cookies,
            observer: None,
        }
    }

    /// Reports every session opened or forgotten from now on to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The shard that owns `session_id`.
    fn shard(&self, session_id: u64) -> &Shard {
        // SHARDS is a power of two; the mask keeps the index in range.
        let index = (session_id as usize) & (SHARDS - 1);
        &self.shards[index]
    }

    /// The token verifier in force now.
    fn verifier(&self) -> Arc<TokenVerifier> {
        Arc::clone(&self.verifier.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Handles one datagram from `from`, sent to relay address `local` if the socket said:
    /// [`session::check`] with no lock held (but the per-source table's, for a moment, to
    /// charge a bind attempt), then the session's shard under its lock.
    pub fn handle(
        &self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        let checked = self.check(now, wall, from, local, datagram, reply);
        self.apply(now, wall, checked, reply)
    }

    /// The first half of [`Sessions::handle`]: everything that needs no shard.
    #[allow(clippy::result_large_err)] // as `session::check`
    fn check<'a>(
        &self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &'a [u8],
        reply: &mut [u8],
    ) -> Checked<'a> {
        session::check(
            &self.cookies,
            || self.verifier(),
            |ip| lock(&self.ips).try_bind_attempt(ip, now).is_ok(),
            wall,
            from,
            local,
            datagram,
            reply,
        )
    }

    /// The second half of [`Sessions::handle`]: count what [`session::check`] answered, or let
    /// the session's shard decide, then hand on the events it made.
    fn apply(
        &self,
        now: Instant,
        wall: UnixTime,
        checked: Checked<'_>,
        reply: &mut [u8],
    ) -> Outcome {
        let input = match checked {
            Ok(input) => input,
            Err(answered) => {
                lock(&self.shard(answered.session_id).early).tally(answered.tally);
                return answered.outcome;
            }
        };
        let shard = self.shard(input.session_id());
        let mut table = lock(&shard.table);
        let outcome = table.handle(now, wall, input, &mut SharedIps(&self.ips), reply);
        self.publish(shard, table);
        outcome
    }

    /// Hands the events `table` queued to the observer after releasing the shard lock, under
    /// the shard's publish lock (see [`Sessions`] for why that keeps them in order).
    fn publish(&self, shard: &Shard, mut table: MutexGuard<'_, SessionTable>) {
        if !table.has_events() {
            return;
        }
        let events = table.take_events();
        let Some(observer) = &self.observer else {
            return;
        };
        let _in_order = lock(&shard.publish);
        drop(table);
        for event in events {
            observer.session_event(event);
        }
    }

    /// Reaps idle and expired bindings in every shard; returns how many went, and appends to
    /// `notices` the CLOSE that tells each of their peers why.
    pub fn reap(&self, now: Instant, wall: UnixTime, notices: &mut Vec<Notice>) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut table = lock(&shard.table);
                let observer = self.observer.as_deref();
                let reaped =
                    table.reap_seen(now, wall, &mut SharedIps(&self.ips), notices, |sid| {
                        observer.map_or([None, None], |o| o.last_seen(sid))
                    });
                self.publish(shard, table);
                reaped
            })
            .sum()
    }

    /// Whether the session is held (by whichever shard holds it).
    pub fn holds(&self, session_id: u64) -> bool {
        lock(&self.shard(session_id).table).holds(session_id)
    }

    /// The counters of all shards, summed.
    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        for shard in &self.shards {
            total.add(lock(&shard.table).counters());
            total.add(&lock(&shard.early));
        }
        total
    }

    /// Sessions held now, and slots bound now.
    pub fn occupancy(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(s, b), shard| {
            let table = lock(&shard.table);
            (s + table.session_count(), b + table.binding_count())
        })
    }

    /// Sources tracked by the per-source limits (IPv4 addresses and IPv6 prefixes).
    pub fn tracked_ips(&self) -> usize {
        lock(&self.ips).len()
    }

    /// Applies reloaded limits and trusted gateway keys without dropping a session (SIGHUP).
    /// `keys` replaces the trusted set entirely; BINDs verified from now on use it.
    pub fn reload(
        &self,
        now: Instant,
        limits: SessionLimits,
        ip_limits: IpLimits,
        keys: &[(u32, ferry_core::keys::GatewayPublicKey)],
    ) {
        let shard_limits = shard_limits(limits);
        for shard in &self.shards {
            let mut table = lock(&shard.table);
            table.set_limits(shard_limits.clone(), now);
            self.publish(shard, table);
        }
        let mut verifier = TokenVerifier::clone(&self.verifier());
        let old: Vec<u32> = verifier.trusted_kids().collect();
        for kid in old {
            verifier.remove_trusted_key(kid);
        }
        for (kid, key) in keys {
            verifier.add_trusted_key(*kid, *key);
        }
        *self
            .verifier
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(verifier);
        lock(&self.ips).set_limits(ip_limits);
    }
}

/// Time between two reaping passes of one worker.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// One worker's view of the shared sessions ([`PacketHandler`]): a datagram in, an outcome
/// out, and reaping on ticks, whose notices the worker sends.
#[derive(Debug)]
pub struct SessionsHandler {
    sessions: Arc<Sessions>,
    next_reap: Instant,
    security: SecurityLog,
    next_flush: Instant,
}

impl SessionsHandler {
    /// The handler of worker number `index`. Workers start reaping a quarter second apart,
    /// so that their passes spread over the second.
    pub fn new(sessions: Arc<Sessions>, index: usize, now: Instant) -> Self {
        Self {
            sessions,
            next_reap: now + Duration::from_millis(index as u64 * 250),
            security: SecurityLog::new(now),
            next_flush: now + FLUSH_INTERVAL,
        }
    }
}

impl PacketHandler for SessionsHandler {
    fn handle(
        &mut self,
        now: Instant,
        wall: UnixTime,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        let outcome = self
            .sessions
            .handle(now, wall, from, local, datagram, reply);
        // Only replies and drops can be security events: forwards, the bulk of the traffic,
        // skip the check.
        if !matches!(outcome, Outcome::Forward { .. })
            && let Some(event) = Event::of(from, datagram, &outcome, reply)
            // A CLOSE for a session that is gone is what a peer's resent CLOSE looks like
            // (protocol.md §3.8): counted as bad_close, but no attempt on a live session.
            && (event.kind != "close_refused" || self.sessions.holds(event.session))
        {
            self.security.record(now, &event);
        }
        outcome
    }

    fn tick(&mut self, now: Instant, wall: UnixTime, notices: &mut Vec<Notice>) {
        // Every worker reaps every shard once a second (its ticks come every 100 ms by
        // default), so with N workers the tables are reaped N times a second in all. A pass
        // unbinds slots idle for `limits.idle_timeout_secs` (5 s at least) and slots whose
        // token expired more than `limits.max_clock_skew_secs` ago, so a slot outlives its
        // deadline by at most about a second. Each unbound slot's peer gets a CLOSE saying
        // why, which the worker sends.
        if now >= self.next_reap {
            self.sessions.reap(now, wall, notices);
            self.next_reap = now + REAP_INTERVAL;
        }
        if now >= self.next_flush {
            self.security.flush(now);
            self.next_flush = now + FLUSH_INTERVAL;
        }
    }
}

#[cfg(test)]
mod tests;
