//! The state that gateway replicas share, behind one small trait, [`State`]:
//!
//! - **sessions and their join codes**: a created session waits for its second peer under the
//!   hash of its join code; [`State::consume_join_code`] hands it out exactly once, atomically,
//!   on whichever replica the join lands; a renewal finds the session by id
//!   ([`State::session`]) and keeps it for as long as the token it grants
//!   ([`State::extend_session`]);
//! - **revoked API keys**: a revocation on one replica holds on all;
//! - **relay reports**: relays that register themselves with heartbeats, and the load every
//!   relay reports.
//!
//! Two backends: [`MemoryState`] (the default, for a single gateway) and, with several
//! replicas side by side, Redis (`state::redis`). Time is always a parameter: the backends
//! never read the clock, so expiry is tested without sleeping.
//!
//! Join codes are stored only as their SHA-256 ([`JoinCodeHash`]): whoever reads the store (a
//! Redis dump, `KEYS`) cannot join a session with what they find.

use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use ferry_core::time::UnixTime;
use serde::{Deserialize, Serialize};

/// A boxed future, so that [`State`] can be used as `dyn State`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the shared state could not do what was asked. Callers answer 503 and log it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The backend is unreachable or answered with an error (Redis down, timeout).
    #[error("state backend unavailable: {0}")]
    Unavailable(String),
    /// The memory backend holds its maximum of live sessions.
    #[error("session table full ({0} live sessions)")]
    Full(usize),
    /// A stored record could not be decoded (written by an incompatible version).
    #[error("state backend holds an unreadable record: {0}")]
    Corrupt(String),
}

/// SHA-256 of a join code: the only form in which the state holds it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JoinCodeHash(pub [u8; 32]);

impl JoinCodeHash {
    /// The hash of `code`.
    pub fn of(code: &str) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"ferry join code v1\0");
        ctx.update(code.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }

    /// Lower-case hex, for store keys.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for JoinCodeHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash is not the code, but there is no reason to print it whole either.
        write!(f, "JoinCodeHash({}…)", &self.to_hex()[..8])
    }
}

/// A session the gateway created, as replicas share it. Holds no secret: no token, no slot
/// secret, no join code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session id (never 0).
    pub session_id: u64,
    /// The realm it was created in.
    pub realm: String,
    /// The relay both peers use.
    pub relay_id: u64,
    /// The API key id that created it.
    pub created_by: String,
    /// When, Unix seconds.
    pub created_at: u64,
    /// Until when its join code works, Unix seconds.
    pub join_expires_at: u64,
    /// When the record is forgotten (after every token of it has expired), Unix seconds: at
    /// first the join code's expiry plus a token lifetime, then the expiry of the latest token
    /// a renewal granted, if later.
    pub expires_at: u64,
    /// The creator's own Noise static key (base64), handed to the joiner to pin.
    pub creator_public_key: Option<String>,
    /// The key the joiner must have (base64), if the creator named one.
    pub expected_joiner_public_key: Option<String>,
    /// The API key id that joined it, once joined.
    pub joined_by: Option<String>,
}

/// What a relay reports about itself, by heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReport {
    /// The relay id.
    pub relay_id: u64,
    /// Its public UDP address.
    pub address: String,
    /// Its X25519 public key, base64.
    pub public_key: String,
    /// Sessions it holds now.
    pub sessions: u64,
    /// Sessions it can hold.
    pub capacity: u64,
    /// When it reported, Unix seconds.
    pub reported_at: u64,
    /// When the report is forgotten without a newer one, Unix seconds.
    pub expires_at: u64,
}

/// The state shared by gateway replicas. Every method is one atomic step on the backend.
pub trait State: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new session whose join code hashes to `code`; both are forgotten at
    /// `record.expires_at`, and the code stops working at `record.join_expires_at`.
    fn create_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> BoxFuture<'a, Result<(), StateError>>;

    /// The session waiting under `code`, without using the code up (to check scopes before
    /// [`State::consume_join_code`]). `None` if unknown, used or expired.
    fn peek_join_code(
        &self,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StateError>>;

    /// Uses the join code up: returns its session, marked as joined by `joined_by`, to
    /// exactly one caller across every replica; `None` to everyone else and once expired.
    fn consume_join_code<'a>(
        &'a self,
        code: JoinCodeHash,
        joined_by: &'a str,
        now: UnixTime,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, StateError>>;

    /// The live session `session_id`, joined or not; `None` if unknown or forgotten.
    fn session(
        &self,
        session_id: u64,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StateError>>;

    /// Keeps the live session `session_id` at least until `until` (Unix seconds, the expiry of
    /// a token just granted for it): its `expires_at` becomes the later of the two, never
    /// earlier. `false` if the session is unknown or already forgotten.
    fn extend_session(
        &self,
        session_id: u64,
        until: u64,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<bool, StateError>>;

    /// Live sessions, newest first, at most `limit`.
    fn sessions(
        &self,
        now: UnixTime,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StateError>>;

    /// Revokes an API key by id; `true` if it was not revoked before.
    fn revoke_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, StateError>>;

    /// Whether the API key `key_id` is revoked.
    fn is_revoked<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, StateError>>;

    /// Every revoked key id, sorted.
    fn revoked_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StateError>>;

    /// Stores a relay's heartbeat, replacing its previous one.
    fn report_relay<'a>(&'a self, report: &'a RelayReport)
    -> BoxFuture<'a, Result<(), StateError>>;

    /// Every live relay report, by relay id.
    fn relay_reports(&self, now: UnixTime) -> BoxFuture<'_, Result<Vec<RelayReport>, StateError>>;
}

/// The embedded backend: everything in this process, for a single gateway. Bounded: at most
/// `max_sessions` live sessions; expired ones are dropped as new ones arrive.
///
/// Sessions live in [`MEMORY_SHARDS`] shards, chosen by the join code's hash (a session and
/// its code share a shard), each behind its own lock. One table would stall every request
/// for as long as it takes to grow: a hash map of a few hundred thousand sessions moves tens
/// of megabytes when it doubles, which showed as a p99 of tens of milliseconds under load
/// (docs/bench.md, "Gateway"). With shards, a table grows 1/64th at a time and only the
/// requests of that shard wait.
#[derive(Debug)]
pub struct MemoryState {
    shards: Box<[Mutex<Shard>]>,
    /// Live (not yet forgotten) sessions across all shards.
    live: AtomicUsize,
    max_sessions: usize,
    revoked: RwLock<HashSet<String>>,
    relays: Mutex<HashMap<u64, RelayReport>>,
}

/// Shards of [`MemoryState`].
pub const MEMORY_SHARDS: usize = 64;

#[derive(Debug, Default)]
struct Shard {
    sessions: HashMap<u64, SessionRecord>,
    /// Join code → session id, while the code is unused.
    codes: HashMap<JoinCodeHash, u64>,
    /// `(expires_at, session_id)`, to drop expired sessions oldest first.
    by_expiry: BTreeSet<(u64, u64)>,
    /// `(created_at, session_id)`, to list the newest sessions without visiting the rest.
    by_created: BTreeSet<(u64, u64)>,
    /// Join code of each session still holding one, to drop it with the session.
    code_of: HashMap<u64, JoinCodeHash>,
}

impl Shard {
    /// Drops the expired sessions; returns how many.
    fn forget_expired(&mut self, now: UnixTime) -> usize {
        let mut forgotten = 0;
        while let Some(&(expires_at, id)) = self.by_expiry.first() {
            if expires_at > now.as_secs() {
                break;
            }
            self.by_expiry.pop_first();
            if let Some(record) = self.sessions.remove(&id) {
                self.by_created.remove(&(record.created_at, id));
                forgotten += 1;
            }
            if let Some(code) = self.code_of.remove(&id) {
                self.codes.remove(&code);
            }
        }
        forgotten
    }

    fn waiting(&self, code: JoinCodeHash, now: UnixTime) -> Option<&SessionRecord> {
        let id = self.codes.get(&code)?;
        self.sessions
            .get(id)
            .filter(|r| r.join_expires_at > now.as_secs() && r.expires_at > now.as_secs())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave the maps inconsistent in a way that matters
    // more than refusing service would, so a poisoned lock is used as is.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryState {
    /// An empty state holding at most `max_sessions` live sessions.
    pub fn new(max_sessions: usize) -> Self {
        Self {
            shards: (0..MEMORY_SHARDS)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            live: AtomicUsize::new(0),
            max_sessions,
            revoked: RwLock::new(HashSet::new()),
            relays: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, code: &JoinCodeHash) -> std::sync::MutexGuard<'_, Shard> {
        // The code's hash is SHA-256 of 128 random bits: its first byte is uniform.
        lock(&self.shards[usize::from(code.0[0]) % self.shards.len()])
    }

    /// Runs `f` on the shard that holds the live session `id`, if one does. Sessions are
    /// sharded by join code, so this looks in each shard in turn: it serves renewals, which
    /// come once per peer per two thirds of a token lifetime, not the hot path.
    fn with_session<T>(
        &self,
        id: u64,
        now: UnixTime,
        f: impl FnOnce(&mut Shard) -> T,
    ) -> Option<T> {
        for shard in self.shards.iter() {
            let mut m = lock(shard);
            if m.sessions
                .get(&id)
                .is_some_and(|r| r.expires_at > now.as_secs())
            {
                return Some(f(&mut m));
            }
        }
        None
    }

    /// Forgets expired sessions in every shard (when the table looks full).
    fn forget_all_expired(&self, now: UnixTime) {
        for shard in self.shards.iter() {
            let n = lock(shard).forget_expired(now);
            self.live.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl State for MemoryState {
    fn create_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        let forgotten = self.shard(&code).forget_expired(now);
        self.live.fetch_sub(forgotten, Ordering::Relaxed);
        if self.live.load(Ordering::Relaxed) >= self.max_sessions {
            self.forget_all_expired(now);
            if self.live.load(Ordering::Relaxed) >= self.max_sessions {
                return ready(Err(StateError::Full(self.max_sessions)));
            }
        }
        let mut m = self.shard(&code);
        let id = record.session_id;
        match m.sessions.insert(id, record.clone()) {
            Some(old) => {
                // A 64-bit random id collided with a live one: astronomically unlikely; keep
                // the index consistent anyway.
                m.by_expiry.remove(&(old.expires_at, id));
                m.by_created.remove(&(old.created_at, id));
                if let Some(code) = m.code_of.remove(&id) {
                    m.codes.remove(&code);
                }
            }
            None => {
                self.live.fetch_add(1, Ordering::Relaxed);
            }
        }
        m.by_expiry.insert((record.expires_at, id));
        m.by_created.insert((record.created_at, id));
        m.codes.insert(code, id);
        m.code_of.insert(id, code);
        ready(Ok(()))
    }

    fn peek_join_code(
        &self,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StateError>> {
        let m = self.shard(&code);
        ready(Ok(m.waiting(code, now).cloned()))
    }

    fn consume_join_code<'a>(
        &'a self,
        code: JoinCodeHash,
        joined_by: &'a str,
        now: UnixTime,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, StateError>> {
        let mut m = self.shard(&code);
        if m.waiting(code, now).is_none() {
            return ready(Ok(None));
        }
        let Some(id) = m.codes.remove(&code) else {
            return ready(Ok(None));
        };
        m.code_of.remove(&id);
        let record = m.sessions.get_mut(&id).map(|record| {
            record.joined_by = Some(joined_by.to_owned());
            record.clone()
        });
        ready(Ok(record))
    }

    fn session(
        &self,
        session_id: u64,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StateError>> {
        ready(Ok(self
            .with_session(session_id, now, |m| m.sessions.get(&session_id).cloned())
            .flatten()))
    }

    fn extend_session(
        &self,
        session_id: u64,
        until: u64,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<bool, StateError>> {
        let extended = self.with_session(session_id, now, |m| {
            let Some(record) = m.sessions.get_mut(&session_id) else {
                return;
            };
            let old = record.expires_at;
            if until > old {
                record.expires_at = until;
                m.by_expiry.remove(&(old, session_id));
                m.by_expiry.insert((until, session_id));
            }
        });
        ready(Ok(extended.is_some()))
    }

    fn sessions(
        &self,
        now: UnixTime,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StateError>> {
        // The newest `limit` (created_at, id, shard) keys of all shards, in a min-heap: each
        // shard is walked newest first only while its keys still beat the heap's oldest, so the
        // work is about `limit` keys per shard at most (far fewer when sessions are spread
        // evenly), however many sessions live, and each shard's lock is held for its own short
        // walk only: public requests on the other shards never wait for it.
        let mut newest: BinaryHeap<std::cmp::Reverse<(u64, u64, usize)>> =
            BinaryHeap::with_capacity(limit + 1);
        for (index, shard) in self.shards.iter().enumerate() {
            let mut m = lock(shard);
            let n = m.forget_expired(now);
            self.live.fetch_sub(n, Ordering::Relaxed);
            for &(created_at, id) in m.by_created.iter().rev() {
                let key = (created_at, id, index);
                if newest.len() < limit {
                    newest.push(std::cmp::Reverse(key));
                } else if newest.peek().is_some_and(|oldest| key > oldest.0) {
                    newest.pop();
                    newest.push(std::cmp::Reverse(key));
                } else {
                    break;
                }
            }
        }
        let mut keys: Vec<(u64, u64, usize)> = newest.into_iter().map(|k| k.0).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        // A session that expired since the walk is left out.
        let out = keys
            .into_iter()
            .filter_map(|(_, id, index)| lock(&self.shards[index]).sessions.get(&id).cloned())
            .collect();
        ready(Ok(out))
    }

    fn revoke_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, StateError>> {
        let mut revoked = self
            .revoked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ready(Ok(revoked.insert(key_id.to_owned())))
    }

    fn is_revoked<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, StateError>> {
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ready(Ok(revoked.contains(key_id)))
    }

    fn revoked_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StateError>> {
        let mut out: Vec<String> = self
            .revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        out.sort();
        ready(Ok(out))
    }

    fn report_relay<'a>(
        &'a self,
        report: &'a RelayReport,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        lock(&self.relays).insert(report.relay_id, report.clone());
        ready(Ok(()))
    }

    fn relay_reports(&self, now: UnixTime) -> BoxFuture<'_, Result<Vec<RelayReport>, StateError>> {
        let mut relays = lock(&self.relays);
        relays.retain(|_, r| r.expires_at > now.as_secs());
        let mut out: Vec<RelayReport> = relays.values().cloned().collect();
        out.sort_by_key(|r| r.relay_id);
        ready(Ok(out))
    }
}

/// Behaviour every backend must show; the tests of each backend run these (the Redis backend's
/// from an integration test, hence public).
#[doc(hidden)]
pub mod conformance {
    use super::*;

    fn record(id: u64, created_at: u64) -> SessionRecord {
        SessionRecord {
            session_id: id,
            realm: "acme".into(),
            relay_id: 7,
            created_by: "creator".into(),
            created_at,
            join_expires_at: created_at + 60,
            expires_at: created_at + 400,
            creator_public_key: Some("AAAA".into()),
            expected_joiner_public_key: None,
            joined_by: None,
        }
    }

    /// Join codes work once, only while fresh, and sessions are listed until they expire.
    pub async fn join_codes_work_once(state: &dyn State) {
        let t0 = 1_000_000;
        let (a, b) = (JoinCodeHash::of("code-a"), JoinCodeHash::of("code-b"));
        state
            .create_session(&record(1, t0), a, UnixTime(t0))
            .await
            .expect("create");
        state
            .create_session(&record(2, t0 + 1), b, UnixTime(t0 + 1))
            .await
            .expect("create");
        let now = UnixTime(t0 + 10);
        let peeked = state.peek_join_code(a, now).await.expect("peek");
        assert_eq!(peeked.map(|r| r.session_id), Some(1));
        let joined = state
            .consume_join_code(a, "joiner", now)
            .await
            .expect("consume");
        let joined = joined.expect("first use of the code");
        assert_eq!(joined.session_id, 1);
        assert_eq!(joined.joined_by.as_deref(), Some("joiner"));
        assert_eq!(
            state
                .consume_join_code(a, "joiner", now)
                .await
                .expect("again"),
            None
        );
        assert_eq!(state.peek_join_code(a, now).await.expect("peek"), None);
        assert_eq!(
            state
                .consume_join_code(JoinCodeHash::of("never"), "x", now)
                .await
                .expect("unknown"),
            None
        );
        // Listed newest first, joined or not.
        let listed = state.sessions(now, 10).await.expect("list");
        assert_eq!(
            listed.iter().map(|r| r.session_id).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(listed[1].joined_by.as_deref(), Some("joiner"));
        assert_eq!(state.sessions(now, 1).await.expect("list").len(), 1);
        // Code b expires unused at t0 + 61; the sessions are forgotten at t0 + 400 / 401.
        let late = UnixTime(t0 + 61);
        assert_eq!(state.peek_join_code(b, late).await.expect("peek"), None);
        assert_eq!(
            state
                .consume_join_code(b, "x", late)
                .await
                .expect("consume"),
            None
        );
        let gone = UnixTime(t0 + 401);
        assert!(state.sessions(gone, 10).await.expect("list").is_empty());
    }

    /// Listing many sessions gives exactly the newest `limit`, newest first (ties in creation
    /// time by id), whatever shard or page they live in, and leaves the expired out.
    pub async fn many_sessions_are_listed_newest_first(state: &dyn State) {
        let t0 = 3_000_000;
        // 300 sessions over 30 seconds, ten a second, ids scattered.
        let ids: Vec<(u64, u64)> = (0..300u64)
            .map(|i| (t0 + i / 10, i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1))
            .collect();
        for (i, &(created_at, id)) in ids.iter().enumerate() {
            let mut r = record(id, created_at);
            // The first hundred expire early.
            if i < 100 {
                r.expires_at = t0 + 50;
            }
            state
                .create_session(
                    &r,
                    JoinCodeHash::of(&format!("code-{i}")),
                    UnixTime(created_at),
                )
                .await
                .expect("create");
        }
        let mut expected: Vec<(u64, u64)> = ids.clone();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        for limit in [1, 7, 64, 300, 1000] {
            let listed = state
                .sessions(UnixTime(t0 + 40), limit)
                .await
                .expect("list");
            let want: Vec<u64> = expected.iter().take(limit).map(|&(_, id)| id).collect();
            assert_eq!(
                listed.iter().map(|r| r.session_id).collect::<Vec<_>>(),
                want,
                "limit {limit}"
            );
        }
        let later = state.sessions(UnixTime(t0 + 60), 1000).await.expect("list");
        let want: Vec<u64> = expected.iter().take(200).map(|&(_, id)| id).collect();
        assert_eq!(later.iter().map(|r| r.session_id).collect::<Vec<_>>(), want);
    }

    /// A session is found by id until it is forgotten, and a renewal keeps it longer.
    pub async fn sessions_are_found_and_extended(state: &dyn State) {
        let t0 = 3_000_000;
        let code = JoinCodeHash::of("code-renew");
        state
            .create_session(&record(5, t0), code, UnixTime(t0))
            .await
            .expect("create");
        let now = UnixTime(t0 + 10);
        let found = state.session(5, now).await.expect("find");
        assert_eq!(
            found.as_ref().map(|r| r.created_by.as_str()),
            Some("creator")
        );
        assert_eq!(found.and_then(|r| r.joined_by), None);
        assert_eq!(state.session(6, now).await.expect("find"), None);
        assert!(
            !state
                .extend_session(6, t0 + 900, now)
                .await
                .expect("extend")
        );
        state
            .consume_join_code(code, "joiner", now)
            .await
            .expect("consume")
            .expect("fresh code");
        let found = state.session(5, now).await.expect("find").expect("live");
        assert_eq!(found.joined_by.as_deref(), Some("joiner"));
        // An earlier expiry changes nothing; a later one keeps the session, joiner included.
        assert!(
            state
                .extend_session(5, t0 + 100, now)
                .await
                .expect("extend")
        );
        let found = state.session(5, now).await.expect("find").expect("live");
        assert_eq!(found.expires_at, t0 + 400);
        assert!(
            state
                .extend_session(5, t0 + 900, now)
                .await
                .expect("extend")
        );
        let later = UnixTime(t0 + 800);
        let found = state.session(5, later).await.expect("find").expect("kept");
        assert_eq!(found.expires_at, t0 + 900);
        assert_eq!(found.joined_by.as_deref(), Some("joiner"));
        assert_eq!(
            state
                .sessions(later, 10)
                .await
                .expect("list")
                .iter()
                .map(|r| r.session_id)
                .collect::<Vec<_>>(),
            [5]
        );
        let gone = UnixTime(t0 + 900);
        assert_eq!(state.session(5, gone).await.expect("find"), None);
        assert!(
            !state
                .extend_session(5, t0 + 2000, gone)
                .await
                .expect("extend")
        );
        assert!(state.sessions(gone, 10).await.expect("list").is_empty());
    }

    /// Revocations are kept and listed.
    pub async fn revocations_are_kept(state: &dyn State) {
        assert!(!state.is_revoked("k1").await.expect("check"));
        assert!(state.revoke_key("k1").await.expect("revoke"));
        assert!(!state.revoke_key("k1").await.expect("revoke again"));
        assert!(state.revoke_key("k0").await.expect("revoke"));
        assert!(state.is_revoked("k1").await.expect("check"));
        assert!(!state.is_revoked("k2").await.expect("check"));
        assert_eq!(state.revoked_keys().await.expect("list"), ["k0", "k1"]);
    }

    /// Relay reports replace each other and expire.
    pub async fn relay_reports_expire(state: &dyn State) {
        let report = |id, sessions, at: u64| RelayReport {
            relay_id: id,
            address: "198.51.100.1:7000".into(),
            public_key: "AAAA".into(),
            sessions,
            capacity: 100,
            reported_at: at,
            expires_at: at + 30,
        };
        let t0 = 2_000_000;
        state.report_relay(&report(9, 5, t0)).await.expect("report");
        state.report_relay(&report(3, 1, t0)).await.expect("report");
        state
            .report_relay(&report(9, 6, t0 + 10))
            .await
            .expect("report");
        let live = state.relay_reports(UnixTime(t0 + 20)).await.expect("list");
        assert_eq!(
            live.iter()
                .map(|r| (r.relay_id, r.sessions))
                .collect::<Vec<_>>(),
            [(3, 1), (9, 6)]
        );
        let later = state.relay_reports(UnixTime(t0 + 35)).await.expect("list");
        assert_eq!(later.iter().map(|r| r.relay_id).collect::<Vec<_>>(), [9]);
        assert!(
            state
                .relay_reports(UnixTime(t0 + 40))
                .await
                .expect("list")
                .is_empty()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn memory_backend_conforms() {
        block_on(conformance::join_codes_work_once(&MemoryState::new(10)));
        block_on(conformance::sessions_are_found_and_extended(
            &MemoryState::new(10),
        ));
        block_on(conformance::revocations_are_kept(&MemoryState::new(10)));
        block_on(conformance::relay_reports_expire(&MemoryState::new(10)));
        block_on(conformance::many_sessions_are_listed_newest_first(
            &MemoryState::new(1000),
        ));
    }

    #[test]
    fn memory_backend_is_bounded_but_makes_room_as_sessions_expire() {
        block_on(async {
            let state = MemoryState::new(2);
            let record = |id: u64, at: u64| SessionRecord {
                session_id: id,
                realm: "r".into(),
                relay_id: 1,
                created_by: "k".into(),
                created_at: at,
                join_expires_at: at + 10,
                expires_at: at + 100,
                creator_public_key: None,
                expected_joiner_public_key: None,
                joined_by: None,
            };
            for id in 1..=2 {
                let code = JoinCodeHash::of(&id.to_string());
                state
                    .create_session(&record(id, 0), code, UnixTime(0))
                    .await
                    .expect("room");
            }
            let code = JoinCodeHash::of("3");
            assert_eq!(
                state
                    .create_session(&record(3, 50), code, UnixTime(50))
                    .await,
                Err(StateError::Full(2))
            );
            state
                .create_session(&record(3, 100), code, UnixTime(100))
                .await
                .expect("room again");
            let (codes, code_of): (usize, usize) = state
                .shards
                .iter()
                .map(|s| {
                    let s = lock(s);
                    (s.codes.len(), s.code_of.len())
                })
                .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
            assert_eq!((codes, code_of), (1, 1));
            assert_eq!(state.live.load(Ordering::Relaxed), 1);
        });
    }

    #[test]
    fn the_hash_of_a_join_code_does_not_show_it() {
        let hash = JoinCodeHash::of("secret-code");
        assert_ne!(hash, JoinCodeHash::of("secret-code2"));
        assert!(!format!("{hash:?}").contains("secret"));
        assert_eq!(hash.to_hex().len(), 64);
    }
}
