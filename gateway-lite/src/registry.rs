//! The relay registry: which relays exist, which are healthy, and which to hand out.
//!
//! Relays come from two places:
//!
//! - **listed** in the config (`[[relays]]`): each replica probes them itself over UDP (a
//!   BIND without a cookie must be answered by a CHALLENGE for the same session and sequence
//!   number, protocol.md §5 — the relay keeps no state for it and the probe proves its data
//!   port answers); a relay that misses a probe is not handed out until it answers again;
//! - **registered** by heartbeats (`POST /v1/relays/heartbeat` with a `relay:<id>` key), kept in
//!   the shared [`State`] so every replica sees them until `heartbeat_ttl` after the last one.
//!
//! Every replica probes every relay, listed or registered, over UDP with a BIND carrying a
//! probe token sealed to the relay's configured or registered public key ([`ProbeLine`]): only
//! a relay holding the private key answers with a BIND-ACK whose MAC checks. A listed relay that
//! fails a probe is not handed out until it passes again; a registered relay is handed out only
//! once a probe of the address and key it reported has passed, so a `relay:<id>` credential
//! alone cannot steer sessions to an address or key of its choice.
//!
//! A heartbeat also reports load (sessions / capacity). [`Registry::pick`] hands out the
//! healthy relay with the lowest load, ties going round-robin. Reports are read from the state
//! at most once a second and cached, so a session creation does not wait for the backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_core::keys::RelayPublicKey;
use ferry_core::proof::SlotKeys;
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, TokenMinter};
use ferry_core::wire::{self, BindFields, Packet, Slot};
use ring::rand::SecureRandom;
use serde::Serialize;

use crate::config::StaticRelay;
use crate::state::{RelayReport, State, StateError};

/// A relay as handed out to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayInfo {
    /// The relay id tokens name.
    pub id: u64,
    /// Its public UDP address.
    pub address: SocketAddr,
    /// Its static X25519 key.
    pub public_key: RelayPublicKey,
}

/// What the admin API lists about a relay.
#[derive(Clone, Debug, Serialize)]
pub struct RelayStatus {
    /// Relay id.
    pub id: u64,
    /// UDP address.
    pub address: String,
    /// X25519 public key, base64.
    pub public_key: String,
    /// `config` or `heartbeat`.
    pub source: &'static str,
    /// Handed out now?
    pub healthy: bool,
    /// Reported sessions, if it reported.
    pub sessions: Option<u64>,
    /// Reported capacity, if it reported.
    pub capacity: Option<u64>,
    /// Last report, Unix seconds.
    pub reported_at: Option<u64>,
}

#[derive(Debug)]
struct Listed {
    relay: StaticRelay,
    healthy: AtomicBool,
}

#[derive(Debug, Default)]
struct Cache {
    reports: Vec<RelayReport>,
    fetched: Option<Instant>,
}

/// The registry shared by the request handlers and the prober.
#[derive(Debug)]
pub struct Registry {
    /// Replaced whole by a config reload.
    listed: RwLock<Arc<[Arc<Listed>]>>,
    cache: Mutex<Cache>,
    next: AtomicUsize,
    /// Registered relays whose reported address and key passed this replica's last probe.
    verified: Mutex<HashMap<u64, RelayInfo>>,
}

/// Each relay's [`ProbeLine`], by relay id and address, kept from round to round.
pub type ProbeLines = HashMap<(u64, SocketAddr), ProbeLine>;

fn info_of_report(r: &RelayReport) -> Option<RelayInfo> {
    Some(RelayInfo {
        id: r.relay_id,
        address: SocketAddr::from_str(&r.address).ok()?,
        public_key: RelayPublicKey::from_str(&r.public_key).ok()?,
    })
}

impl Registry {
    /// A registry of the listed relays; they count as healthy until a probe fails, or as
    /// healthy for good if probing is off.
    pub fn new(relays: &[StaticRelay]) -> Self {
        Self {
            listed: RwLock::new(
                relays
                    .iter()
                    .map(|r| {
                        Arc::new(Listed {
                            relay: r.clone(),
                            healthy: AtomicBool::new(true),
                        })
                    })
                    .collect(),
            ),
            cache: Mutex::new(Cache::default()),
            next: AtomicUsize::new(0),
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn snapshot(&self) -> Arc<[Arc<Listed>]> {
        Arc::clone(
            &self
                .listed
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the listed relays (a config reload). A relay listed before with the same id,
    /// address and key keeps its health; a new or changed one counts as healthy until its
    /// first probe, as at start. Sessions already created on a relay no longer listed can
    /// still be joined while it heartbeats.
    pub fn set_listed(&self, relays: &[StaticRelay]) {
        let old = self.snapshot();
        let new: Arc<[Arc<Listed>]> = relays
            .iter()
            .map(|r| match old.iter().find(|l| l.relay == *r) {
                Some(same) => Arc::clone(same),
                None => Arc::new(Listed {
                    relay: r.clone(),
                    healthy: AtomicBool::new(true),
                }),
            })
            .collect();
        *self
            .listed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }

    /// The listed relay `id`, if any.
    pub fn listed(&self, id: u64) -> Option<StaticRelay> {
        self.snapshot()
            .iter()
            .find(|l| l.relay.id == id)
            .map(|l| l.relay.clone())
    }

    /// Live reports, from the cache if fetched less than a second ago.
    async fn reports(
        &self,
        state: &dyn State,
        now: UnixTime,
    ) -> Result<Vec<RelayReport>, StateError> {
        {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cache
                .fetched
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return Ok(cache
                    .reports
                    .iter()
                    .filter(|r| r.expires_at > now.as_secs())
                    .cloned()
                    .collect());
            }
        }
        let reports = state.relay_reports(now).await?;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.reports = reports.clone();
        cache.fetched = Some(Instant::now());
        Ok(reports)
    }

    /// Forgets the cached reports (after a heartbeat, so this replica sees it at once).
    pub fn invalidate(&self) {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fetched = None;
    }

    /// The healthy relay to hand out now: lowest reported load first (no report: load 0),
    /// ties round-robin. `None` if no relay is healthy.
    pub async fn pick(
        &self,
        state: &dyn State,
        now: UnixTime,
    ) -> Result<Option<RelayInfo>, StateError> {
        let reports = self.reports(state, now).await?;
        let by_id: HashMap<u64, &RelayReport> = reports.iter().map(|r| (r.relay_id, r)).collect();
        let load = |id: u64| {
            by_id
                .get(&id)
                .map_or(0.0, |r| r.sessions as f64 / r.capacity.max(1) as f64)
        };
        let listed = self.snapshot();
        let mut candidates: Vec<(f64, RelayInfo)> = Vec::new();
        for l in listed.iter() {
            if l.healthy.load(Ordering::Relaxed) {
                candidates.push((
                    load(l.relay.id),
                    RelayInfo {
                        id: l.relay.id,
                        address: l.relay.address,
                        public_key: l.relay.public_key,
                    },
                ));
            }
        }
        for r in &reports {
            if !listed.iter().any(|l| l.relay.id == r.relay_id)
                && let Some(info) = info_of_report(r)
                && self.is_verified(&info)
            {
                candidates.push((load(r.relay_id), info));
            }
        }
        let Some(min) = candidates.iter().map(|(l, _)| *l).reduce(f64::min) else {
            return Ok(None);
        };
        let mut least: Vec<RelayInfo> = candidates
            .into_iter()
            .filter(|(l, _)| *l <= min)
            .map(|(_, info)| info)
            .collect();
        least.sort_by_key(|r| r.id);
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % least.len();
        Ok(least.into_iter().nth(turn))
    }

    /// The relay `id` whatever its health (a session already created on it is joined there).
    pub async fn find(
        &self,
        state: &dyn State,
        id: u64,
        now: UnixTime,
    ) -> Result<Option<RelayInfo>, StateError> {
        if let Some(r) = self.listed(id) {
            return Ok(Some(RelayInfo {
                id: r.id,
                address: r.address,
                public_key: r.public_key,
            }));
        }
        let reports = self.reports(state, now).await?;
        Ok(reports
            .iter()
            .find(|r| r.relay_id == id)
            .and_then(info_of_report))
    }

    /// Every relay known, for the admin API and metrics.
    pub async fn status(
        &self,
        state: &dyn State,
        now: UnixTime,
    ) -> Result<Vec<RelayStatus>, StateError> {
        let reports = self.reports(state, now).await?;
        let report = |id: u64| reports.iter().find(|r| r.relay_id == id);
        let listed = self.snapshot();
        let mut out: Vec<RelayStatus> = listed
            .iter()
            .map(|l| {
                let r = report(l.relay.id);
                RelayStatus {
                    id: l.relay.id,
                    address: l.relay.address.to_string(),
                    public_key: l.relay.public_key.to_string(),
                    source: "config",
                    healthy: l.healthy.load(Ordering::Relaxed),
                    sessions: r.map(|r| r.sessions),
                    capacity: r.map(|r| r.capacity),
                    reported_at: r.map(|r| r.reported_at),
                }
            })
            .collect();
        for r in &reports {
            if !listed.iter().any(|l| l.relay.id == r.relay_id) {
                out.push(RelayStatus {
                    id: r.relay_id,
                    address: r.address.clone(),
                    public_key: r.public_key.clone(),
                    source: "heartbeat",
                    healthy: info_of_report(r).is_some_and(|info| self.is_verified(&info)),
                    sessions: Some(r.sessions),
                    capacity: Some(r.capacity),
                    reported_at: Some(r.reported_at),
                });
            }
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// `(healthy, unhealthy)` listed relays (registered relays are healthy while they report).
    pub fn listed_health(&self) -> (u64, u64) {
        let listed = self.snapshot();
        let healthy = listed
            .iter()
            .filter(|l| l.healthy.load(Ordering::Relaxed))
            .count() as u64;
        (healthy, listed.len() as u64 - healthy)
    }

    /// Whether the registered relay `info` (id, address and key as reported) passed this
    /// replica's last probe.
    fn is_verified(&self, info: &RelayInfo) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&info.id)
            == Some(info)
    }

    /// Probes every relay once, listed and registered, one after the other, with tokens from
    /// `minter`, and records the results; `lines` keeps each relay's socket and cookie from
    /// round to round. Returns how many passed.
    pub async fn probe_round(
        &self,
        state: &dyn State,
        rng: &(dyn SecureRandom + Sync),
        minter: &TokenMinter,
        lines: &mut ProbeLines,
        now: UnixTime,
        timeout: Duration,
    ) -> usize {
        let listed = self.snapshot();
        let mut targets: Vec<(RelayInfo, Option<&Listed>)> = listed
            .iter()
            .map(|l| {
                let info = RelayInfo {
                    id: l.relay.id,
                    address: l.relay.address,
                    public_key: l.relay.public_key,
                };
                (info, Some(&**l))
            })
            .collect();
        // A replica whose state backend is down probes the listed relays only.
        let reports = self.reports(state, now).await.unwrap_or_default();
        targets.extend(
            reports
                .iter()
                .filter(|r| !listed.iter().any(|l| l.relay.id == r.relay_id))
                .filter_map(info_of_report)
                .map(|info| (info, None)),
        );
        lines.retain(|key, _| targets.iter().any(|(t, _)| (t.id, t.address) == *key));
        let mut passed = 0;
        let mut verified = HashMap::new();
        for (info, listed) in &targets {
            let key = (info.id, info.address);
            let result = match lines.get_mut(&key) {
                Some(line) => line.probe(rng, minter, info, now, timeout).await,
                None => match ProbeLine::open(rng, info.address).await {
                    Ok(mut line) => {
                        let result = line.probe(rng, minter, info, now, timeout).await;
                        lines.insert(key, line);
                        result
                    }
                    Err(e) => Err(e),
                },
            };
            let healthy = result.is_ok();
            let was = match listed {
                Some(l) => l.healthy.swap(healthy, Ordering::Relaxed),
                None => self.is_verified(info),
            };
            if healthy && listed.is_none() {
                verified.insert(info.id, info.clone());
            }
            if was != healthy {
                match &result {
                    Ok(()) => tracing::warn!(
                        relay_id = info.id,
                        address = %info.address,
                        healthy,
                        "relay health changed"
                    ),
                    Err(e) => tracing::warn!(
                        relay_id = info.id,
                        address = %info.address,
                        healthy,
                        error = %e,
                        "relay health changed"
                    ),
                }
            }
            passed += usize::from(healthy);
        }
        *self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verified;
        passed
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No BIND-ACK for the probe, with a MAC under the probe's key, came in time.
    #[error("no authenticated BIND-ACK in time")]
    NoAnswer,
    /// No authenticated BIND-ACK came in time, but an unauthenticated REJECT (or one whose MAC
    /// did not verify) for the probe did: the relay cannot open the token (another key or
    /// id), or someone spoofing the relay's address sent it. Only a hint (protocol.md §3.4),
    /// so the probe kept waiting for the BIND-ACK until its timeout.
    #[error("no authenticated BIND-ACK in time (an unauthenticated REJECT came: {0})")]
    NoAnswerAfterReject(&'static str),
    /// The relay refused the probe's BIND with a REJECT whose MAC verifies under the slot's
    /// `K_relay` (it opened the token, so it holds the key, but refused the BIND).
    #[error("the relay refused the probe: {0}")]
    Refused(&'static str),
    /// The probe token could not be minted.
    #[error("minting the probe token: {0}")]
    Mint(#[from] ferry_core::token::TokenError),
}

/// How long a probe token is valid: long enough for any clock skew the relay allows.
const PROBE_TOKEN_SECS: u64 = 60;

/// CHALLENGEs with a new cookie a probe answers at most (each with a BIND): the relay's own
/// after a few forged ones, which anyone able to spoof the relay's address can send.
const MAX_PROBE_CHALLENGES: u32 = 8;

/// One replica's probing of one relay (address and key): a socket kept from probe to probe, a
/// session id of its own and the last cookie the relay gave it, so that a probe costs the relay
/// a CHALLENGE only when that cookie has aged out (about once a minute), not every time.
#[derive(Debug)]
pub struct ProbeLine {
    socket: tokio::net::UdpSocket,
    session_id: u64,
    cookie: [u8; wire::COOKIE_LEN],
    seq: u64,
}

impl ProbeLine {
    /// A line to `relay` from an ephemeral port.
    pub async fn open(
        rng: &(dyn SecureRandom + Sync),
        relay: SocketAddr,
    ) -> Result<Self, ProbeError> {
        let local: SocketAddr = match relay {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let socket = tokio::net::UdpSocket::bind(local).await?;
        socket.connect(relay).await?;
        let mut id = [0u8; 8];
        rng.fill(&mut id)
            .map_err(|_| ProbeError::Mint(ferry_core::token::TokenError::Rng))?;
        Ok(Self {
            socket,
            session_id: u64::from_be_bytes(id) | 1,
            cookie: [0; wire::COOKIE_LEN],
            seq: 0,
        })
    }

    /// Probes `relay` once: a BIND with a probe token (protocol.md §4, flags) minted by
    /// `minter` and sealed to the relay's configured or registered public key, which the relay
    /// answers with a BIND-ACK under the slot's `K_relay` and binds nothing (§7). Only a relay
    /// holding that key's private half, and calling itself `relay.id`, can open the token and
    /// compute the MAC, so a relay at the right address with the wrong key fails. A CHALLENGE
    /// (the first probe, or an aged cookie) is answered with its cookie, each new cookie once, up to
    /// [`MAX_PROBE_CHALLENGES`] a probe (a forged CHALLENGE costs the relay one BIND and no more). A
    /// REJECT fails the probe at once only if its MAC verifies under `K_relay`; an
    /// unauthenticated one is a hint anyone can forge (protocol.md §3.4), so the probe keeps
    /// waiting for the BIND-ACK and fails at `timeout` ([`ProbeError::NoAnswerAfterReject`]).
    pub async fn probe(
        &mut self,
        rng: &(dyn SecureRandom + Sync),
        minter: &TokenMinter,
        relay: &RelayInfo,
        now: UnixTime,
        timeout: Duration,
    ) -> Result<(), ProbeError> {
        let input = ClaimsInput {
            slot: Slot::A,
            relay_id: relay.id,
            session_id: self.session_id,
            not_before: now,
            expires: now.saturating_add(PROBE_TOKEN_SECS),
            rate_bytes_per_sec: 0,
        };
        let token = minter.mint_probe(rng, &input, &relay.public_key)?;
        let keys = SlotKeys::derive(&token.slot_secret);
        self.seq += 1;
        let bind = |cookie: [u8; wire::COOKIE_LEN]| -> Result<Vec<u8>, ProbeError> {
            let fields = BindFields {
                slot: Slot::A,
                bind_seq: self.seq,
                cookie,
                token: &token.bytes,
            };
            let mut buf = vec![0u8; wire::MAX_DATAGRAM];
            let n = wire::encode_bind(&mut buf, self.session_id, &fields, |m| keys.peer.mac(m))
                .map_err(|_| ProbeError::NoAnswer)?;
            buf.truncate(n);
            Ok(buf)
        };
        self.socket.send(&bind(self.cookie)?).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut challenges = 0;
        // The reason of an unauthenticated REJECT seen, for the error at the deadline.
        let mut hint: Option<&'static str> = None;
        let mut buf = [0u8; 512];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Err(_) => {
                    return Err(hint.map_or(ProbeError::NoAnswer, ProbeError::NoAnswerAfterReject));
                }
                Ok(received) => received?,
            };
            match wire::parse(&buf[..n]) {
                // A CHALLENGE is unauthenticated, so one with a forged cookie may come first:
                // each new cookie gets its BIND, up to a bound, and the relay's own CHALLENGE
                // (its answer to a BIND with a forged cookie, if not sooner) then leads to
                // the BIND-ACK. One repeating the cookie just sent is a duplicate.
                Ok(Packet::Challenge(c))
                    if c.session_id() == self.session_id
                        && c.bind_seq() == self.seq
                        && *c.cookie() != self.cookie
                        && challenges < MAX_PROBE_CHALLENGES =>
                {
                    challenges += 1;
                    self.cookie = *c.cookie();
                    self.socket.send(&bind(self.cookie)?).await?;
                }
                Ok(Packet::BindAck(ack))
                    if ack.session_id() == self.session_id
                        && ack.bind_seq() == self.seq
                        && keys.relay.verify(ack.mac_input(), ack.mac()) =>
                {
                    return Ok(());
                }
                // Only a REJECT under K_relay fails the probe at once. An unauthenticated one
                // is a hint anyone spoofing the relay's address can send (protocol.md §3.4):
                // the probe keeps waiting for the authenticated BIND-ACK.
                Ok(Packet::Reject(r))
                    if r.session_id() == self.session_id && r.bind_seq() == self.seq =>
                {
                    if r.authenticated() && keys.relay.verify(r.mac_input(), r.mac()) {
                        return Err(ProbeError::Refused(r.reason().name()));
                    }
                    hint = Some(r.reason().name());
                }
                // Anything else (a stale answer, a forged one) is ignored until the deadline.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryState;

    fn relay(id: u64) -> StaticRelay {
        StaticRelay {
            id,
            address: SocketAddr::from(([198, 51, 100, id as u8], 7000)),
            public_key: RelayPublicKey::from_bytes([id as u8; 32]),
        }
    }

    fn report(id: u64, sessions: u64) -> RelayReport {
        RelayReport {
            relay_id: id,
            address: format!("198.51.100.{id}:7000"),
            public_key: RelayPublicKey::from_bytes([id as u8; 32]).to_string(),
            sessions,
            capacity: 100,
            reported_at: 1000,
            expires_at: 2000,
        }
    }

    #[tokio::test]
    async fn least_loaded_healthy_relay_first_ties_round_robin() {
        let state = MemoryState::new(1000);
        let registry = Registry::new(&[relay(1), relay(2)]);
        let now = UnixTime(1500);
        // No reports: both at load 0, taken in turn.
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(registry.pick(&state, now).await.unwrap().unwrap().id);
        }
        seen.sort_unstable();
        assert_eq!(seen, [1, 1, 2, 2]);
        // Relay 1 reports load; relay 3 registers itself with less, and a probe of it passed.
        state.report_relay(&report(1, 50)).await.unwrap();
        state.report_relay(&report(3, 10)).await.unwrap();
        let info = info_of_report(&report(3, 10)).unwrap();
        registry.verified.lock().unwrap().insert(3, info);
        registry.invalidate();
        assert_eq!(registry.pick(&state, now).await.unwrap().unwrap().id, 2);
        registry.snapshot()[1]
            .healthy
            .store(false, Ordering::Relaxed);
        assert_eq!(registry.pick(&state, now).await.unwrap().unwrap().id, 3);
        // An unhealthy relay is still found for a join.
        assert_eq!(registry.find(&state, 2, now).await.unwrap().unwrap().id, 2);
        assert_eq!(registry.find(&state, 3, now).await.unwrap().unwrap().id, 3);
        assert!(registry.find(&state, 4, now).await.unwrap().is_none());
        // Reports expire: then relay 1 (load 0 again) is the only healthy one.
        let later = UnixTime(2500);
        registry.invalidate();
        assert_eq!(registry.pick(&state, later).await.unwrap().unwrap().id, 1);
        registry.snapshot()[0]
            .healthy
            .store(false, Ordering::Relaxed);
        assert_eq!(registry.pick(&state, later).await.unwrap(), None);
        let status = registry.status(&state, now).await.unwrap();
        assert_eq!(status.len(), 2);
        assert_eq!(registry.listed_health(), (0, 2));
    }

    #[tokio::test]
    async fn a_reload_keeps_the_health_of_unchanged_relays() {
        let state = MemoryState::new(1000);
        let registry = Registry::new(&[relay(1), relay(2)]);
        let now = UnixTime(1500);
        registry.snapshot()[0]
            .healthy
            .store(false, Ordering::Relaxed);
        let mut moved = relay(2);
        moved.address = SocketAddr::from(([198, 51, 100, 99], 7000));
        registry.set_listed(&[relay(1), moved.clone(), relay(3)]);
        // Relay 1 is still unhealthy; the moved relay 2 and the new relay 3 start healthy.
        assert_eq!(registry.listed_health(), (2, 1));
        assert_eq!(registry.listed(2), Some(moved));
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(registry.pick(&state, now).await.unwrap().unwrap().id);
        }
        seen.sort_unstable();
        assert_eq!(seen, [2, 2, 3, 3]);
        registry.set_listed(&[relay(3)]);
        assert_eq!(registry.listed(1), None);
        assert_eq!(registry.pick(&state, now).await.unwrap().unwrap().id, 3);
    }

    const TEST_KID: u32 = 5;

    fn test_minter() -> TokenMinter {
        let rng = ring::rand::SystemRandom::new();
        TokenMinter::new(
            TEST_KID,
            ferry_core::keys::GatewaySigningKey::generate(&rng).unwrap(),
        )
    }

    /// How [`tiny_relay`] answers a BIND whose token opens.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Answer {
        /// A BIND-ACK under `K_relay`, as a relay does.
        Ack,
        /// An unauthenticated REJECT first (as an attacker spoofing the relay's address would
        /// send), then the BIND-ACK.
        ForgedRejectThenAck,
        /// Only the unauthenticated REJECT (the BIND-ACK lost, a forged REJECT arriving).
        ForgedRejectOnly,
        /// Before the first CHALLENGE, [`FORGED_CHALLENGES`] CHALLENGEs with cookies of an
        /// attacker's making, then the rest as [`Answer::Ack`].
        ForgedChallengesFirst,
        /// A REJECT under `K_relay` (the relay opened the token and refuses the BIND).
        AuthenticatedReject,
    }

    /// A relay in miniature for probes: CHALLENGEs a BIND without its cookie, then verifies
    /// the token with `key` (trusting `gateway`) and answers as `answer` says, or with an
    /// unauthenticated REJECT when the token does not open. Serves `binds` BINDs, then stops.
    async fn tiny_relay(
        key: ferry_core::keys::RelayStaticKey,
        relay_id: u64,
        gateway: ferry_core::keys::GatewayPublicKey,
        binds: usize,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        tiny_relay_answering(key, relay_id, gateway, binds, Answer::Ack).await
    }

    async fn tiny_relay_answering(
        key: ferry_core::keys::RelayStaticKey,
        relay_id: u64,
        gateway: ferry_core::keys::GatewayPublicKey,
        binds: usize,
        answer: Answer,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use ferry_core::token::{TokenVerifier, VerifierConfig};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut verifier = TokenVerifier::new(VerifierConfig::new(relay_id), key).unwrap();
        verifier.add_trusted_key(TEST_KID, gateway);
        let task = tokio::spawn(async move {
            let cookie = [7u8; wire::COOKIE_LEN];
            let mut buf = [0u8; 512];
            for _ in 0..binds {
                let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                let Ok(Packet::Bind(bind)) = wire::parse(&buf[..n]) else {
                    panic!("expected a BIND");
                };
                let (session, seq) = (bind.session_id(), bind.bind_seq());
                let mut out = [0u8; 128];
                let n = if *bind.cookie() != cookie {
                    if answer == Answer::ForgedChallengesFirst && *bind.cookie() == [0; 16] {
                        for i in 0..FORGED_CHALLENGES {
                            let fields = wire::ChallengeFields {
                                bind_seq: seq,
                                cookie: [0xf0 + i; wire::COOKIE_LEN],
                            };
                            let mut forged = [0u8; 64];
                            let m = wire::encode_challenge(&mut forged, session, &fields).unwrap();
                            socket.send_to(&forged[..m], from).await.unwrap();
                        }
                    }
                    let fields = wire::ChallengeFields {
                        bind_seq: seq,
                        cookie,
                    };
                    wire::encode_challenge(&mut out, session, &fields).unwrap()
                } else {
                    match verifier.verify(
                        bind.token(),
                        UnixTime::from(std::time::SystemTime::now()),
                        session,
                        0,
                    ) {
                        Ok(verified) => {
                            assert!(verified.claims.probe, "a probe token");
                            let keys = SlotKeys::derive(&verified.slot_secret);
                            let reject = wire::RejectFields {
                                reason: wire::RejectReason::Overloaded,
                                slot: Slot::A,
                                bind_seq: seq,
                            };
                            if matches!(
                                answer,
                                Answer::ForgedRejectThenAck | Answer::ForgedRejectOnly
                            ) {
                                let mut forged = [0u8; 64];
                                let m = wire::encode_reject_unauthenticated(
                                    &mut forged,
                                    session,
                                    &reject,
                                )
                                .unwrap();
                                socket.send_to(&forged[..m], from).await.unwrap();
                            }
                            match answer {
                                Answer::ForgedRejectOnly => continue,
                                Answer::AuthenticatedReject => {
                                    wire::encode_reject(&mut out, session, &reject, |m| {
                                        keys.relay.mac(m)
                                    })
                                    .unwrap()
                                }
                                Answer::Ack
                                | Answer::ForgedRejectThenAck
                                | Answer::ForgedChallengesFirst => {
                                    let fields = wire::BindAckFields {
                                        slot: Slot::A,
                                        peer_present: false,
                                        idle_timeout_secs: 0,
                                        bind_seq: seq,
                                        expires_at: verified.claims.expires.as_secs(),
                                    };
                                    wire::encode_bind_ack(&mut out, session, &fields, |m| {
                                        keys.relay.mac(m)
                                    })
                                    .unwrap()
                                }
                            }
                        }
                        Err(_) => {
                            let fields = wire::RejectFields {
                                reason: wire::RejectReason::TokenInvalid,
                                slot: Slot::A,
                                bind_seq: seq,
                            };
                            wire::encode_reject_unauthenticated(&mut out, session, &fields).unwrap()
                        }
                    }
                };
                socket.send_to(&out[..n], from).await.unwrap();
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_probe_of_a_silent_port_fails_in_time() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rng = ring::rand::SystemRandom::new();
        let info = RelayInfo {
            id: 1,
            address: silent.local_addr().unwrap(),
            public_key: RelayPublicKey::from_bytes([1; 32]),
        };
        let mut line = ProbeLine::open(&rng, info.address).await.unwrap();
        let start = Instant::now();
        let result = line
            .probe(
                &rng,
                &test_minter(),
                &info,
                UnixTime(1_900_000_000),
                Duration::from_millis(100),
            )
            .await;
        assert!(matches!(result, Err(ProbeError::NoAnswer)), "{result:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// The relay holding the key passes, its cookie is kept (the second probe costs no
    /// CHALLENGE), and a relay at the address with another key is refused.
    #[tokio::test]
    async fn a_probe_passes_only_for_the_holder_of_the_relay_key() {
        let rng = ring::rand::SystemRandom::new();
        let minter = test_minter();
        let key = ferry_core::keys::RelayStaticKey::generate(&rng).unwrap();
        let public_key = key.public();
        // Three BINDs: the first probe's two (CHALLENGE, then BIND-ACK), the second probe's one.
        let (address, relay) = tiny_relay(key, 9, minter.public(), 3).await;
        let info = RelayInfo {
            id: 9,
            address,
            public_key,
        };
        let now = UnixTime::from(std::time::SystemTime::now());
        let mut line = ProbeLine::open(&rng, address).await.unwrap();
        let timeout = Duration::from_secs(5);
        line.probe(&rng, &minter, &info, now, timeout)
            .await
            .unwrap();
        line.probe(&rng, &minter, &info, now, timeout)
            .await
            .unwrap();
        relay.await.unwrap();

        // An impostor: the address and id claimed, but not the key sealed to. It can only
        // answer an unauthenticated REJECT, a hint: the probe fails, at its timeout.
        let impostor_key = ferry_core::keys::RelayStaticKey::generate(&rng).unwrap();
        let (address, impostor) = tiny_relay(impostor_key, 9, minter.public(), 2).await;
        let claimed = RelayInfo { address, ..info };
        let mut line = ProbeLine::open(&rng, address).await.unwrap();
        let short = Duration::from_millis(300);
        let result = line.probe(&rng, &minter, &claimed, now, short).await;
        assert!(
            matches!(
                result,
                Err(ProbeError::NoAnswerAfterReject("token_invalid"))
            ),
            "{result:?}"
        );
        impostor.await.unwrap();
    }

    /// Probes a [`tiny_relay_answering`] holding the key once (CHALLENGE, then the BIND with
    /// the cookie), with `timeout`; returns the result and how long the probe took.
    async fn probe_answered(
        answer: Answer,
        timeout: Duration,
    ) -> (Result<(), ProbeError>, Duration) {
        let rng = ring::rand::SystemRandom::new();
        let minter = test_minter();
        let key = ferry_core::keys::RelayStaticKey::generate(&rng).unwrap();
        let public_key = key.public();
        let (address, relay) = tiny_relay_answering(key, 9, minter.public(), 2, answer).await;
        let info = RelayInfo {
            id: 9,
            address,
            public_key,
        };
        let now = UnixTime::from(std::time::SystemTime::now());
        let mut line = ProbeLine::open(&rng, address).await.unwrap();
        let start = Instant::now();
        let result = line.probe(&rng, &minter, &info, now, timeout).await;
        let took = start.elapsed();
        relay.await.unwrap();
        (result, took)
    }

    /// An unauthenticated REJECT (anyone able to spoof the relay's address can send one) does
    /// not fail a probe: the BIND-ACK that follows it passes it.
    #[tokio::test]
    async fn a_forged_reject_does_not_fail_a_probe_the_relay_answers() {
        let (result, _) = probe_answered(Answer::ForgedRejectThenAck, Duration::from_secs(5)).await;
        assert!(result.is_ok(), "{result:?}");
    }

    /// With only an unauthenticated REJECT and no BIND-ACK, the probe waits its whole timeout
    /// and then fails, naming the REJECT seen.
    #[tokio::test]
    async fn only_a_forged_reject_fails_the_probe_at_its_timeout() {
        let timeout = Duration::from_millis(400);
        let (result, took) = probe_answered(Answer::ForgedRejectOnly, timeout).await;
        assert!(
            matches!(result, Err(ProbeError::NoAnswerAfterReject("overloaded"))),
            "{result:?}"
        );
        assert!(took >= timeout, "failed after {took:?}, before the timeout");
        let message = result.unwrap_err().to_string();
        assert!(message.contains("unauthenticated REJECT"), "{message}");
    }

    /// Forged CHALLENGEs before the relay's own (anyone able to spoof the relay's address can
    /// send them) cost the relay one BIND each, and the probe passes: the relay answers each
    /// forged cookie with its own CHALLENGE, whose cookie leads to the BIND-ACK.
    #[tokio::test]
    async fn forged_challenges_do_not_fail_a_probe_the_relay_answers() {
        let rng = ring::rand::SystemRandom::new();
        let minter = test_minter();
        let key = ferry_core::keys::RelayStaticKey::generate(&rng).unwrap();
        let public_key = key.public();
        // The first BIND, one per forged cookie, and the one with the relay's cookie.
        let binds = 2 + usize::from(FORGED_CHALLENGES);
        let (address, relay) = tiny_relay_answering(
            key,
            9,
            minter.public(),
            binds,
            Answer::ForgedChallengesFirst,
        )
        .await;
        let info = RelayInfo {
            id: 9,
            address,
            public_key,
        };
        let now = UnixTime::from(std::time::SystemTime::now());
        let mut line = ProbeLine::open(&rng, address).await.unwrap();
        let result = line
            .probe(&rng, &minter, &info, now, Duration::from_secs(5))
            .await;
        assert!(result.is_ok(), "{result:?}");
        relay.await.unwrap();
    }

    /// CHALLENGEs a forger sends [`tiny_relay_answering`]'s prober before the relay's own.
    const FORGED_CHALLENGES: u8 = 4;

    /// A REJECT whose MAC verifies under the slot's K_relay fails the probe at once.
    #[tokio::test]
    async fn an_authenticated_reject_fails_the_probe_at_once() {
        let timeout = Duration::from_secs(5);
        let (result, took) = probe_answered(Answer::AuthenticatedReject, timeout).await;
        assert!(
            matches!(result, Err(ProbeError::Refused("overloaded"))),
            "{result:?}"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    /// A registered relay is handed out only after a probe of the address and key it reported
    /// passed; one reporting a key it does not hold never is.
    #[tokio::test]
    async fn a_registered_relay_is_handed_out_only_once_probed() {
        let rng = ring::rand::SystemRandom::new();
        let minter = test_minter();
        let state = MemoryState::new(1000);
        let registry = Registry::new(&[]);
        let key = ferry_core::keys::RelayStaticKey::generate(&rng).unwrap();
        let good_public = key.public().to_string();
        let (good_addr, good) = tiny_relay(key, 21, minter.public(), 2).await;
        let impostor_key = ferry_core::keys::RelayStaticKey::generate(&rng).unwrap();
        let (bad_addr, bad) = tiny_relay(impostor_key, 22, minter.public(), 2).await;
        let now = UnixTime::from(std::time::SystemTime::now());
        let report = |id: u64, address: SocketAddr, public_key: String| RelayReport {
            relay_id: id,
            address: address.to_string(),
            public_key,
            sessions: 0,
            capacity: 100,
            reported_at: now.as_secs(),
            expires_at: now.as_secs() + 60,
        };
        state
            .report_relay(&report(21, good_addr, good_public))
            .await
            .unwrap();
        // Relay 22 claims relay 21's public key, which it cannot open tokens for.
        let stolen = ferry_core::keys::RelayStaticKey::generate(&rng)
            .unwrap()
            .public()
            .to_string();
        state
            .report_relay(&report(22, bad_addr, stolen))
            .await
            .unwrap();
        assert_eq!(
            registry.pick(&state, now).await.unwrap(),
            None,
            "nothing probed yet"
        );
        let mut lines = ProbeLines::new();
        let passed = registry
            .probe_round(
                &state,
                &rng,
                &minter,
                &mut lines,
                now,
                Duration::from_secs(1),
            )
            .await;
        assert_eq!(passed, 1);
        for _ in 0..4 {
            assert_eq!(registry.pick(&state, now).await.unwrap().unwrap().id, 21);
        }
        let status = registry.status(&state, now).await.unwrap();
        let healthy: Vec<(u64, bool)> = status.iter().map(|s| (s.id, s.healthy)).collect();
        assert_eq!(healthy, [(21, true), (22, false)]);
        good.await.unwrap();
        bad.abort();
    }
}
