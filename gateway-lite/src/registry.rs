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
//! A heartbeat also reports load (sessions / capacity). [`Registry::pick`] hands out the
//! healthy relay with the lowest load, ties going round-robin. Reports are read from the state
//! at most once a second and cached, so a session creation does not wait for the backend.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_core::keys::RelayPublicKey;
use ferry_core::time::UnixTime;
use ferry_core::token::TOKEN_LEN;
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
}

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
                    healthy: info_of_report(r).is_some(),
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

    /// Probes every listed relay once (blocking; run it on a blocking thread) and records the
    /// result. Returns how many answered.
    pub fn probe_all(&self, rng: &dyn SecureRandom, timeout: Duration) -> usize {
        let mut ok = 0;
        for l in self.snapshot().iter() {
            let healthy = probe(rng, l.relay.address, timeout).is_ok();
            let was = l.healthy.swap(healthy, Ordering::Relaxed);
            if was != healthy {
                tracing::warn!(
                    relay_id = l.relay.id,
                    address = %l.relay.address,
                    healthy,
                    "relay health changed"
                );
            }
            ok += usize::from(healthy);
        }
        ok
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Socket error or timeout.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The answers received were not the expected CHALLENGE.
    #[error("no matching CHALLENGE")]
    NoChallenge,
    /// The random number generator failed.
    #[error("the random number generator failed")]
    Rng,
}

/// Sends a BIND without cookie for a random session to `relay` and waits for the CHALLENGE
/// the relay must answer (protocol.md §5 and §7). The token in it is never looked at: the
/// cookie check comes first and the relay keeps no state.
pub fn probe(
    rng: &dyn SecureRandom,
    relay: SocketAddr,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let mut ids = [0u8; 16];
    rng.fill(&mut ids).map_err(|_| ProbeError::Rng)?;
    let session_id = u64::from_be_bytes([
        ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], ids[6], ids[7],
    ]) | 1;
    let bind_seq = u64::from_be_bytes([
        ids[8], ids[9], ids[10], ids[11], ids[12], ids[13], ids[14], ids[15],
    ]);
    let token = [0u8; TOKEN_LEN];
    let fields = BindFields {
        slot: Slot::A,
        bind_seq,
        cookie: [0; wire::COOKIE_LEN],
        token: &token,
    };
    let mut buf = [0u8; 512];
    let len = wire::encode_bind(&mut buf, session_id, &fields, |_| [0; wire::MAC_LEN])
        .map_err(|_| ProbeError::NoChallenge)?;
    let local: SocketAddr = match relay {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(relay)?;
    socket.send(&buf[..len])?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProbeError::NoChallenge);
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.recv(&mut buf)?;
        if let Ok(Packet::Challenge(c)) = wire::parse(&buf[..n])
            && c.session_id() == session_id
            && c.bind_seq() == bind_seq
        {
            return Ok(());
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
        // Relay 1 reports load; relay 3 registers itself with less.
        state.report_relay(&report(1, 50)).await.unwrap();
        state.report_relay(&report(3, 10)).await.unwrap();
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

    #[test]
    fn a_probe_of_a_silent_port_fails_in_time() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rng = ring::rand::SystemRandom::new();
        let start = Instant::now();
        assert!(
            probe(
                &rng,
                silent.local_addr().unwrap(),
                Duration::from_millis(100)
            )
            .is_err()
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_probe_accepts_only_the_matching_challenge() {
        let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = relay.local_addr().unwrap();
        let answer = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, from) = relay.recv_from(&mut buf).unwrap();
            let Ok(Packet::Bind(bind)) = wire::parse(&buf[..n]) else {
                panic!("expected a BIND");
            };
            let (session, seq) = (bind.session_id(), bind.bind_seq());
            let mut out = [0u8; 64];
            // A stale challenge first, then the right one.
            let stale = wire::ChallengeFields {
                bind_seq: seq ^ 1,
                cookie: [1; 16],
            };
            let n = wire::encode_challenge(&mut out, session, &stale).unwrap();
            relay.send_to(&out[..n], from).unwrap();
            let good = wire::ChallengeFields {
                bind_seq: seq,
                cookie: [1; 16],
            };
            let n = wire::encode_challenge(&mut out, session, &good).unwrap();
            relay.send_to(&out[..n], from).unwrap();
        });
        let rng = ring::rand::SystemRandom::new();
        probe(&rng, addr, Duration::from_secs(5)).unwrap();
        answer.join().unwrap();
    }
}
