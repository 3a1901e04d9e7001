//! The Redis backend of [`State`], for several gateway replicas side by side.
//!
//! Keys (all under `state.key_prefix`, `P` below):
//!
//! | key | type | holds | expires |
//! |-----|------|-------|---------|
//! | `P code:<sha256 of join code>` | string | the session id | when the code does |
//! | `P session:<id>` | string | the [`SessionRecord`] as JSON | with the session |
//! | `P joined:<id>` | string | the key id that joined | with the session |
//! | `P until:<id>` | string | the expiry of the latest renewed token, Unix seconds | with the session |
//! | `P sessions` | sorted set | session ids by creation time, for listing | members pruned when their record is gone |
//! | `P revoked` | set | revoked key ids | never |
//! | `P relay:<id>` | string | the [`RelayReport`] as JSON | `heartbeat_ttl` after the report |
//! | `P relays` | set | relay ids that reported | members pruned when their report is gone |
//!
//! A join code is used up with one `GETDEL` (Redis 6.2 or newer): whichever replica's command
//! Redis runs first gets the session id, every other gets nothing. Expiry is checked against
//! the `now` the caller passes (as in the memory backend); Redis TTLs, set relative to that
//! `now`, only collect the garbage.
//!
//! A renewal keeps a session longer without rewriting its record: `until:<id>` holds the
//! latest expiry a renewal granted, a record's `expires_at` is the later of its own and that
//! one, and one Lua script (`EXTEND_SCRIPT`) raises `until:<id>` and the keys' TTLs, never
//! lowering either, so that two replicas renewing both slots at once cannot shorten it.

/// Keeps a session until `ARGV[1]` (Unix seconds), `ARGV[2]` seconds from now: raises
/// `until` (`KEYS[3]`) and the TTLs of the record (`KEYS[1]`) and of `joined` (`KEYS[2]`), never
/// lowering them. Returns 0 if the record is gone.
const EXTEND_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local keep = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
if keep > current then redis.call('SET', KEYS[3], ARGV[1], 'EX', ttl) end
for i = 1, 2 do
  local left = redis.call('TTL', KEYS[i])
  if left >= 0 and left < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
";

use std::time::Duration;

use ferry_core::time::UnixTime;
use redis::AsyncCommands as _;
use redis::IntoConnectionInfo as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::state::{BoxFuture, JoinCodeHash, RelayReport, SessionRecord, State, StateError};

/// How long one Redis command may take before the request fails with 503.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to reach Redis: [`RedisState::connect_with`].
#[derive(Clone, Copy)]
pub struct RedisOptions<'a> {
    /// `redis://host:port/db`, `rediss://` for TLS.
    pub url: &'a str,
    /// CA certificates (PEM) a `rediss://` server's certificate must chain to.
    pub ca_pem: Option<&'a [u8]>,
    /// The ACL user, with `password`.
    pub username: Option<&'a str>,
    /// The password for `AUTH`.
    pub password: Option<&'a str>,
}

impl std::fmt::Debug for RedisOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &self.url)
            .field("ca_pem", &self.ca_pem.map(|_| "<pem>"))
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .finish()
    }
}

/// The Redis backend.
#[derive(Clone)]
pub struct RedisState {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn ttl_secs(until: u64, now: UnixTime) -> u64 {
    until.saturating_sub(now.as_secs()).max(1)
}

impl RedisState {
    /// Connects to `url` (and reconnects by itself later); every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        let options = RedisOptions {
            url,
            ca_pem: None,
            username: None,
            password: None,
        };
        Self::connect_with(&options, prefix).await
    }

    /// [`connect`](Self::connect) with TLS trust and credentials: with `rediss://` the
    /// server's certificate must chain to `ca_pem` (the system's roots without it), and with a
    /// password the connection authenticates (`AUTH [username] password`) before anything else.
    pub async fn connect_with(
        options: &RedisOptions<'_>,
        prefix: &str,
    ) -> Result<Self, StateError> {
        let mut info = options.url.into_connection_info().map_err(unavailable)?;
        if let Some(password) = options.password {
            let mut settings = info.redis_settings().clone().set_password(password);
            if let Some(username) = options.username {
                settings = settings.set_username(username);
            }
            info = info.set_redis_settings(settings);
        }
        let client = match options.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            ),
            None => redis::Client::open(info),
        }
        .map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        let state = Self {
            conn,
            prefix: prefix.to_owned(),
        };
        // Fail at start, not at the first request, if the server is too old for GETDEL.
        let mut conn = state.conn.clone();
        let probe = state.key("getdel-probe");
        let _: Option<String> = redis::cmd("GETDEL")
            .arg(&probe)
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                match e
                    .to_string()
                    .to_ascii_lowercase()
                    .contains("unknown command")
                {
                    true => StateError::Unavailable(format!("{e} (Redis 6.2 or newer is needed)")),
                    false => unavailable(e),
                }
            })?;
        Ok(state)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn session_key(&self, id: u64) -> String {
        self.key(&format!("session:{id:016x}"))
    }

    fn joined_key(&self, id: u64) -> String {
        self.key(&format!("joined:{id:016x}"))
    }

    fn until_key(&self, id: u64) -> String {
        self.key(&format!("until:{id:016x}"))
    }

    fn code_key(&self, code: JoinCodeHash) -> String {
        self.key(&format!("code:{}", code.to_hex()))
    }

    async fn record(&self, id: u64, now: UnixTime) -> Result<Option<SessionRecord>, StateError> {
        let mut conn = self.conn.clone();
        let (record, joined, until): (Option<String>, Option<String>, Option<u64>) = redis::pipe()
            .get(self.session_key(id))
            .get(self.joined_key(id))
            .get(self.until_key(id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(text) = record else {
            return Ok(None);
        };
        let mut record: SessionRecord =
            serde_json::from_str(&text).map_err(|e| StateError::Corrupt(e.to_string()))?;
        record.expires_at = record.expires_at.max(until.unwrap_or(0));
        if record.expires_at <= now.as_secs() {
            return Ok(None);
        }
        record.joined_by = joined;
        Ok(Some(record))
    }

    async fn waiting(
        &self,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> Result<Option<SessionRecord>, StateError> {
        let mut conn = self.conn.clone();
        let id: Option<String> = conn.get(self.code_key(code)).await.map_err(unavailable)?;
        let Some(id) = id.and_then(|s| u64::from_str_radix(&s, 16).ok()) else {
            return Ok(None);
        };
        Ok(self
            .record(id, now)
            .await?
            .filter(|r| r.join_expires_at > now.as_secs() && r.joined_by.is_none()))
    }
}

impl State for RedisState {
    fn create_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            let json =
                serde_json::to_string(record).map_err(|e| StateError::Corrupt(e.to_string()))?;
            let id = format!("{:016x}", record.session_id);
            let mut conn = self.conn.clone();
            let _: () = redis::pipe()
                .atomic()
                .set_ex(
                    self.session_key(record.session_id),
                    json,
                    ttl_secs(record.expires_at, now),
                )
                .ignore()
                .set_ex(
                    self.code_key(code),
                    &id,
                    ttl_secs(record.join_expires_at, now),
                )
                .ignore()
                .zadd(self.key("sessions"), &id, record.created_at)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn peek_join_code(
        &self,
        code: JoinCodeHash,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StateError>> {
        Box::pin(self.waiting(code, now))
    }

    fn consume_join_code<'a>(
        &'a self,
        code: JoinCodeHash,
        joined_by: &'a str,
        now: UnixTime,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, StateError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // The single atomic step: exactly one GETDEL sees the id.
            let id: Option<String> = redis::cmd("GETDEL")
                .arg(self.code_key(code))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let Some(id) = id.and_then(|s| u64::from_str_radix(&s, 16).ok()) else {
                return Ok(None);
            };
            let Some(mut record) = self.record(id, now).await? else {
                return Ok(None);
            };
            if record.join_expires_at <= now.as_secs() {
                return Ok(None);
            }
            let _: () = conn
                .set_ex(
                    self.joined_key(id),
                    joined_by,
                    ttl_secs(record.expires_at, now),
                )
                .await
                .map_err(unavailable)?;
            record.joined_by = Some(joined_by.to_owned());
            Ok(Some(record))
        })
    }

    fn session(
        &self,
        session_id: u64,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StateError>> {
        Box::pin(self.record(session_id, now))
    }

    fn extend_session(
        &self,
        session_id: u64,
        until: u64,
        now: UnixTime,
    ) -> BoxFuture<'_, Result<bool, StateError>> {
        Box::pin(async move {
            if self.record(session_id, now).await?.is_none() {
                return Ok(false);
            }
            let mut conn = self.conn.clone();
            let kept: i64 = redis::Script::new(EXTEND_SCRIPT)
                .key(self.session_key(session_id))
                .key(self.joined_key(session_id))
                .key(self.until_key(session_id))
                .arg(until)
                .arg(ttl_secs(until, now))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(kept == 1)
        })
    }

    fn sessions(
        &self,
        now: UnixTime,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionRecord>, StateError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let index = self.key("sessions");
            let mut out = Vec::new();
            let mut gone = Vec::new();
            let mut start = 0isize;
            let page = limit.clamp(1, 1000) as isize;
            while out.len() < limit {
                let ids: Vec<String> = conn
                    .zrevrange(&index, start, start + page - 1)
                    .await
                    .map_err(unavailable)?;
                if ids.is_empty() {
                    break;
                }
                start += page;
                for text in ids {
                    let Ok(id) = u64::from_str_radix(&text, 16) else {
                        gone.push(text);
                        continue;
                    };
                    match self.record(id, now).await? {
                        Some(record) if out.len() < limit => out.push(record),
                        Some(_) => {}
                        None => gone.push(text),
                    }
                }
            }
            if !gone.is_empty() {
                let _: () = conn.zrem(&index, gone).await.map_err(unavailable)?;
            }
            Ok(out)
        })
    }

    fn revoke_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, StateError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let added: i64 = conn
                .sadd(self.key("revoked"), key_id)
                .await
                .map_err(unavailable)?;
            Ok(added == 1)
        })
    }

    fn is_revoked<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, StateError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            conn.sismember(self.key("revoked"), key_id)
                .await
                .map_err(unavailable)
        })
    }

    fn revoked_keys(&self) -> BoxFuture<'_, Result<Vec<String>, StateError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut keys: Vec<String> = conn
                .smembers(self.key("revoked"))
                .await
                .map_err(unavailable)?;
            keys.sort();
            Ok(keys)
        })
    }

    fn report_relay<'a>(
        &'a self,
        report: &'a RelayReport,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            let json =
                serde_json::to_string(report).map_err(|e| StateError::Corrupt(e.to_string()))?;
            let now = UnixTime(report.reported_at);
            let mut conn = self.conn.clone();
            let _: () = redis::pipe()
                .atomic()
                .set_ex(
                    self.key(&format!("relay:{}", report.relay_id)),
                    json,
                    ttl_secs(report.expires_at, now),
                )
                .ignore()
                .sadd(self.key("relays"), report.relay_id)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn relay_reports(&self, now: UnixTime) -> BoxFuture<'_, Result<Vec<RelayReport>, StateError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let ids: Vec<u64> = conn
                .smembers(self.key("relays"))
                .await
                .map_err(unavailable)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = ids
                .iter()
                .map(|id| self.key(&format!("relay:{id}")))
                .collect();
            let values: Vec<Option<String>> = conn.mget(&keys).await.map_err(unavailable)?;
            let mut out = Vec::new();
            let mut gone = Vec::new();
            for (id, value) in ids.iter().zip(values) {
                let Some(text) = value else {
                    gone.push(*id);
                    continue;
                };
                let report: RelayReport =
                    serde_json::from_str(&text).map_err(|e| StateError::Corrupt(e.to_string()))?;
                if report.expires_at > now.as_secs() {
                    out.push(report);
                }
            }
            if !gone.is_empty() {
                let _: () = conn
                    .srem(self.key("relays"), gone)
                    .await
                    .map_err(unavailable)?;
            }
            out.sort_by_key(|r| r.relay_id);
            Ok(out)
        })
    }
}
