//! The HTTP API: the public `/v1` routes and the admin routes, their handlers, the error
//! bodies, authentication and the audit log. docs/gateway-api.md describes it for clients, and
//! docs/gateway-openapi.yaml lists exactly the routes of [`public_routes`] and
//! [`admin_routes`] (a test keeps them in step).
//!
//! Every error answer is `{"error": "<code>"}` with a fixed code per case: nothing from the
//! request, the config or an internal error is echoed. The audit log (tracing target
//! `ferry_gateway::audit`) records who asked for what and what was granted — key ids, realms,
//! session and relay ids, kids, expiry times, client addresses — and never an API key, a token,
//! a slot secret or a join code.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State as AxState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use base64::Engine as _;
use ferry_core::keys::PeerPublicKey;
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken, TokenMinter};
use ferry_core::wire::Slot;
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::apikey::{self, KeyHash, PresentedKey, Scopes};
use crate::config::{ApiKeyConfig, GatewayConfig, SessionSettings};
use crate::metrics::{AuthFailure, Limiter, Metrics};
use crate::net::{self as client_net, ClientIp, TrustedProxies};
use crate::ratelimit::RateLimiter;
use crate::registry::{Registry, RelayInfo};
use crate::state::{JoinCodeHash, RelayReport, SessionRecord, State, StateError};

/// The audit log's tracing target.
pub const AUDIT: &str = "ferry_gateway::audit";

/// The realm of a session whose creator named none.
pub const DEFAULT_REALM: &str = "default";

/// The peer address of the connection a request came on; the server puts it in every
/// request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// What a config reload replaces. It is swapped whole, so a request sees the old settings or
/// the new ones, never a mix.
#[derive(Debug)]
struct Live {
    minter: TokenMinter,
    sessions: SessionSettings,
    api_keys: HashMap<String, ApiKeyConfig>,
    revoked: HashSet<String>,
    admin_token: Option<KeyHash>,
    trusted_proxies: TrustedProxies,
    ipv6_prefix_len: u8,
}

impl Live {
    fn of(config: GatewayConfig) -> Self {
        Self {
            minter: config.signing.active,
            sessions: config.sessions,
            api_keys: config
                .api_keys
                .into_iter()
                .map(|k| (k.id.clone(), k))
                .collect(),
            revoked: config.revoked_keys.into_iter().collect(),
            admin_token: config.admin.token_hash,
            trusted_proxies: config.server.trusted_proxies,
            ipv6_prefix_len: config.limits.ipv6_prefix_len,
        }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    live: RwLock<Arc<Live>>,
    heartbeat_ttl: Duration,
    max_body_bytes: usize,
    request_timeout: Duration,
    state: Arc<dyn State>,
    registry: Arc<Registry>,
    ip_limiter: RateLimiter<IpAddr>,
    key_limiter: RateLimiter<String>,
    /// The gateway's counters.
    pub metrics: Arc<Metrics>,
    rng: SystemRandom,
    /// Hash compared against when a key id is unknown, so that both failures take as long.
    dummy_hash: KeyHash,
}

impl App {
    /// The application for `config`, sharing `state`, `registry` and `metrics`. Takes the
    /// signing key out of the config.
    pub fn new(
        config: GatewayConfig,
        state: Arc<dyn State>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, apikey::ApiKeyError> {
        let rng = SystemRandom::new();
        let dummy_hash = apikey::generate(&rng, "unknown")?.hash;
        let limits = config.limits.clone();
        Ok(Self {
            heartbeat_ttl: config.relay_health.heartbeat_ttl,
            max_body_bytes: config.server.max_body_bytes,
            request_timeout: config.server.request_timeout,
            live: RwLock::new(Arc::new(Live::of(config))),
            state,
            registry,
            ip_limiter: RateLimiter::new(
                limits.per_ip_rate,
                limits.per_ip_burst,
                limits.tracked_clients,
            ),
            key_limiter: RateLimiter::new(
                limits.per_key_rate,
                limits.per_key_burst,
                limits.tracked_clients,
            ),
            metrics,
            rng,
            dummy_hash,
        })
    }

    /// The settings in force now.
    fn live(&self) -> Arc<Live> {
        Arc::clone(
            &self
                .live
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Applies a reloaded config: API keys and revocations, the admin token, signing keys,
    /// session settings, trusted proxies, rate limits and the listed relays. `config` must
    /// have passed [`crate::config::RestartSettings::check_reload`]: what only a restart
    /// changes is not looked at here.
    pub fn reload(&self, config: GatewayConfig) {
        let limits = &config.limits;
        self.ip_limiter.set_limits(
            limits.per_ip_rate,
            limits.per_ip_burst,
            limits.tracked_clients,
        );
        self.key_limiter.set_limits(
            limits.per_key_rate,
            limits.per_key_burst,
            limits.tracked_clients,
        );
        self.registry.set_listed(&config.relays);
        let live = Arc::new(Live::of(config));
        *self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = live;
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<dyn State> {
        &self.state
    }
}

type Shared = Arc<App>;

// ---- Errors ----

/// Every error answer of the API. The body is `{"error": code}` and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 `bad_request`: malformed JSON, a missing or invalid field.
    BadRequest,
    /// 401 `unauthorized`: no valid, unrevoked API key (or admin token).
    Unauthorized,
    /// 403 `forbidden`: the key's scopes do not allow this.
    Forbidden,
    /// 403 `peer_identity_mismatch`: the joiner is not the peer the creator expects.
    PeerIdentityMismatch,
    /// 404 `not_found`: no such route.
    NotFound,
    /// 404 `invalid_join_code`: unknown, already used or expired join code.
    InvalidJoinCode,
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 408 `request_timeout`: the request took longer than `server.request_timeout_ms`.
    Timeout,
    /// 413 `payload_too_large`: the body exceeds `server.max_body_bytes`.
    PayloadTooLarge,
    /// 415 `unsupported_media_type`: the body is not `application/json`.
    UnsupportedMediaType,
    /// 429 `rate_limited`, with `Retry-After` in seconds.
    RateLimited(u64),
    /// 503 `no_relay_available`: no healthy relay to hand out (or the session's relay is gone).
    NoRelay,
    /// 503 `unavailable`: the shared state is unreachable or full.
    Unavailable,
    /// 500 `internal`: something failed that the client cannot fix.
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::PeerIdentityMismatch => StatusCode::FORBIDDEN,
            Self::NotFound | Self::InvalidJoinCode => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NoRelay | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code in the body.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::PeerIdentityMismatch => "peer_identity_mismatch",
            Self::NotFound => "not_found",
            Self::InvalidJoinCode => "invalid_join_code",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Timeout => "request_timeout",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited(_) => "rate_limited",
            Self::NoRelay => "no_relay_available",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code() }).to_string();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Self::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body is not read: say the connection ends here, so that a
            // client does not send its next request on it and lose it.
            Self::PayloadTooLarge => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        tracing::error!(error = %e, "shared state");
        Self::Unavailable
    }
}

// ---- Extractors ----

/// A JSON body: `application/json`, at most `server.max_body_bytes`, fields as documented and
/// no others.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Shared) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let too_long = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len > app.max_body_bytes as u64);
        if too_long {
            return Err(ApiError::PayloadTooLarge);
        }
        let bytes =
            Bytes::from_request(req, app)
                .await
                .map_err(|rejection| match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
                    _ => ApiError::BadRequest,
                })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|_| ApiError::BadRequest)
    }
}

/// An authenticated client: a valid, unrevoked API key within its rate limit.
#[derive(Debug, Clone)]
pub struct Client {
    /// The key id.
    pub key_id: String,
    /// What the key may do.
    pub scopes: Scopes,
    /// Where the request came from.
    pub addr: ClientIp,
    /// The settings in force when the request was authenticated.
    live: Arc<Live>,
}

/// Where a request came from: what [`guard`] resolved (behind trusted proxies), or the TCP
/// peer.
fn client_addr(parts: &Parts) -> ClientIp {
    if let Some(ip) = parts.extensions.get::<ClientIp>() {
        return *ip;
    }
    ClientIp::direct(
        parts
            .extensions
            .get::<ClientAddr>()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0),
    )
}

fn bearer(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthFailure::Missing)?;
    let value = value.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed);
    }
    Ok(token.trim())
}

impl App {
    fn auth_failed(
        &self,
        reason: AuthFailure,
        key_id: Option<&str>,
        addr: ClientIp,
        route: &str,
    ) -> ApiError {
        self.metrics.auth_failure(reason);
        tracing::warn!(
            target: AUDIT,
            event = "auth_failure",
            reason = reason.name(),
            key_id = key_id.unwrap_or("-"),
            client = %addr.ip,
            via = %addr.via_display(),
            route,
        );
        match reason {
            AuthFailure::Scope => ApiError::Forbidden,
            _ => ApiError::Unauthorized,
        }
    }

    async fn authenticate(&self, parts: &Parts) -> Result<Client, ApiError> {
        let addr = client_addr(parts);
        let route = parts.uri.path();
        let token = bearer(&parts.headers).map_err(|r| self.auth_failed(r, None, addr, route))?;
        let presented = PresentedKey::parse(token)
            .map_err(|_| self.auth_failed(AuthFailure::Malformed, None, addr, route))?;
        let id = presented.id();
        let live = self.live();
        let Some(entry) = live.api_keys.get(id) else {
            // Same work as a known key, so timing does not tell which ids exist.
            let _ = self.dummy_hash.matches(&presented);
            return Err(self.auth_failed(AuthFailure::UnknownKey, Some(id), addr, route));
        };
        if !entry.hash.matches(&presented) {
            return Err(self.auth_failed(AuthFailure::WrongSecret, Some(id), addr, route));
        }
        if live.revoked.contains(id) || self.state.is_revoked(id).await? {
            return Err(self.auth_failed(AuthFailure::Revoked, Some(id), addr, route));
        }
        if let Err(refused) = self.key_limiter.check(&entry.id, Instant::now()) {
            self.metrics.rate_limited(Limiter::Key);
            tracing::info!(target: AUDIT, event = "rate_limited", limiter = "key", key_id = id, client = %addr.ip, via = %addr.via_display());
            return Err(ApiError::RateLimited(refused.retry_after_secs()));
        }
        Ok(Client {
            key_id: entry.id.clone(),
            scopes: entry.scopes.clone(),
            addr,
            live: Arc::clone(&live),
        })
    }

    fn check_admin(&self, parts: &Parts) -> Result<(), ApiError> {
        let addr = client_addr(parts);
        let fail = || self.auth_failed(AuthFailure::AdminToken, None, addr, parts.uri.path());
        let token = bearer(&parts.headers).map_err(|_| fail())?;
        let presented = PresentedKey::parse(token).map_err(|_| fail())?;
        match &self.live().admin_token {
            Some(hash) if presented.id() == "admin" && hash.matches(&presented) => Ok(()),
            _ => Err(fail()),
        }
    }
}

impl FromRequestParts<Shared> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, ApiError> {
        app.authenticate(parts).await
    }
}

/// A request that carried the admin bearer token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Shared> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, ApiError> {
        app.check_admin(parts).map(|()| Admin)
    }
}

// ---- Bodies ----

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The realm; `default` if absent. The key needs `create:<realm>`.
    pub realm: Option<String>,
    /// The creator's Noise static key, base64: handed to the joiner to pin.
    pub peer_public_key: Option<String>,
    /// The joiner's Noise static key, base64, if the creator knows it: the join is refused
    /// to anyone who claims another.
    pub expected_peer_public_key: Option<String>,
}

/// `POST /v1/sessions/join`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSession {
    /// The code the creator got.
    pub join_code: String,
    /// The joiner's Noise static key, base64 (required if the creator expects one).
    pub peer_public_key: Option<String>,
}

/// `POST /v1/relays/heartbeat`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The relay id; the key needs `relay:<id>`.
    pub relay_id: u64,
    /// Its public UDP address.
    pub address: String,
    /// Its X25519 public key, base64.
    pub public_key: String,
    /// Sessions it holds.
    pub sessions: u64,
    /// Sessions it can hold (at least 1).
    pub capacity: u64,
}

/// `POST /admin/v1/keys/revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// The key id.
    pub key_id: String,
}

/// The relay a session runs on.
#[derive(Debug, Serialize)]
pub struct RelayBody {
    /// Relay id.
    pub id: u64,
    /// UDP address.
    pub address: String,
    /// X25519 public key, base64.
    pub public_key: String,
}

/// A granted slot: what `create` and `join` answer.
#[derive(Debug, Serialize)]
pub struct Grant {
    /// Session id, 16 hex digits.
    pub session_id: String,
    /// `A` (creator) or `B` (joiner).
    pub slot: &'static str,
    /// The relay token, base64 (208 bytes).
    pub token: String,
    /// The slot secret, base64 (32 bytes): proves the slot to the relay. Keep it secret.
    pub slot_secret: String,
    /// The kid that signed the token.
    pub kid: u32,
    /// Token validity, Unix seconds.
    pub not_before: u64,
    /// Token expiry, Unix seconds.
    pub expires_at: u64,
    /// The relay to bind to.
    pub relay: RelayBody,
    /// The other peer's Noise static key to pin, base64, if known.
    pub expected_peer_public_key: Option<String>,
    /// Create only: the code for the other peer (single use).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_code: Option<String>,
    /// Create only: until when the join code works, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_code_expires_at: Option<u64>,
}

// ---- Handlers ----

fn now() -> UnixTime {
    UnixTime::from(SystemTime::now())
}

fn parse_peer_key(text: Option<&str>) -> Result<Option<PeerPublicKey>, ApiError> {
    text.map(|t| PeerPublicKey::from_str(t).map_err(|_| ApiError::BadRequest))
        .transpose()
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Length of a join code: 128 random bits in base32.
pub const JOIN_CODE_LEN: usize = 26;

fn random_join_code(rng: &dyn SecureRandom) -> Result<String, ApiError> {
    let mut raw = zeroize::Zeroizing::new([0u8; 17]);
    rng.fill(&mut raw[..16]).map_err(|_| ApiError::Internal)?;
    // 26 symbols of 5 bits = 130 bits: the 16 random bytes and two zero bits.
    let mut out = String::with_capacity(JOIN_CODE_LEN);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in raw.iter() {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < JOIN_CODE_LEN {
            bits -= 5;
            out.push(char::from(BASE32[((acc >> bits) & 31) as usize]));
        }
    }
    Ok(out)
}

fn well_formed_join_code(code: &str) -> bool {
    code.len() == JOIN_CODE_LEN && code.bytes().all(|b| BASE32.contains(&b))
}

fn random_session_id(rng: &dyn SecureRandom) -> Result<u64, ApiError> {
    loop {
        let mut raw = [0u8; 8];
        rng.fill(&mut raw).map_err(|_| ApiError::Internal)?;
        let id = u64::from_be_bytes(raw);
        if id != 0 {
            return Ok(id);
        }
    }
}

impl App {
    fn mint(
        &self,
        live: &Live,
        slot: Slot,
        session_id: u64,
        relay: &RelayInfo,
        now: UnixTime,
    ) -> Result<MintedToken, ApiError> {
        let input = ClaimsInput {
            slot,
            relay_id: relay.id,
            session_id,
            not_before: now,
            expires: now.saturating_add(live.sessions.token_lifetime_secs),
            rate_bytes_per_sec: live.sessions.rate_bytes_per_sec,
        };
        let minted = live
            .minter
            .mint(&self.rng, &input, &relay.public_key)
            .map_err(|e| {
                tracing::error!(error = %e, "minting a token");
                ApiError::Internal
            })?;
        self.metrics.tokens_minted.fetch_add(1, Ordering::Relaxed);
        Ok(minted)
    }

    fn grant(
        &self,
        slot: Slot,
        minted: &MintedToken,
        relay: &RelayInfo,
        expected: Option<String>,
    ) -> Grant {
        Grant {
            session_id: format!("{:016x}", minted.claims.session_id),
            slot: match slot {
                Slot::A => "A",
                Slot::B => "B",
            },
            token: base64::engine::general_purpose::STANDARD.encode(minted.bytes),
            slot_secret: minted.slot_secret.to_base64().to_string(),
            kid: minted.claims.kid,
            not_before: minted.claims.not_before.as_secs(),
            expires_at: minted.claims.expires.as_secs(),
            relay: RelayBody {
                id: relay.id,
                address: relay.address.to_string(),
                public_key: relay.public_key.to_string(),
            },
            expected_peer_public_key: expected,
            join_code: None,
            join_code_expires_at: None,
        }
    }
}

async fn create_session(
    AxState(app): AxState<Shared>,
    client: Client,
    JsonBody(body): JsonBody<CreateSession>,
) -> Result<(StatusCode, axum::Json<Grant>), ApiError> {
    let realm = body.realm.unwrap_or_else(|| DEFAULT_REALM.to_string());
    if !apikey::valid_id(&realm) {
        return Err(ApiError::BadRequest);
    }
    let creator_key = parse_peer_key(body.peer_public_key.as_deref())?;
    let expected = parse_peer_key(body.expected_peer_public_key.as_deref())?;
    if !client.scopes.may_create(&realm) {
        return Err(app.auth_failed(
            AuthFailure::Scope,
            Some(&client.key_id),
            client.addr,
            "/v1/sessions",
        ));
    }
    let now = now();
    let Some(relay) = app.registry.pick(app.state.as_ref(), now).await? else {
        app.metrics.no_relay.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: AUDIT, event = "session_refused", reason = "no_relay", key_id = %client.key_id, realm, client = %client.addr.ip, via = %client.addr.via_display());
        return Err(ApiError::NoRelay);
    };
    let session_id = random_session_id(&app.rng)?;
    let code = random_join_code(&app.rng)?;
    let live = &client.live;
    let join_expires_at = now
        .as_secs()
        .saturating_add(live.sessions.join_code_ttl_secs);
    let record = SessionRecord {
        session_id,
        realm: realm.clone(),
        relay_id: relay.id,
        created_by: client.key_id.clone(),
        created_at: now.as_secs(),
        join_expires_at,
        // The joiner's token may be minted just before the code expires.
        expires_at: join_expires_at.saturating_add(live.sessions.token_lifetime_secs),
        creator_public_key: creator_key.map(|k| k.to_string()),
        expected_joiner_public_key: expected.map(|k| k.to_string()),
        joined_by: None,
    };
    let minted = app.mint(live, Slot::A, session_id, &relay, now)?;
    app.state
        .create_session(&record, JoinCodeHash::of(&code), now)
        .await
        .inspect_err(|_| {
            app.metrics.state_errors.fetch_add(1, Ordering::Relaxed);
        })?;
    app.metrics.sessions_created.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        target: AUDIT,
        event = "session_created",
        key_id = %client.key_id,
        client = %client.addr.ip, via = %client.addr.via_display(),
        realm,
        session_id = %format_args!("{session_id:016x}"),
        relay_id = relay.id,
        slot = "A",
        kid = minted.claims.kid,
        token_expires_at = minted.claims.expires.as_secs(),
        join_code_expires_at = join_expires_at,
        expects_peer = record.expected_joiner_public_key.is_some(),
    );
    let mut grant = app.grant(Slot::A, &minted, &relay, record.expected_joiner_public_key);
    grant.join_code = Some(code);
    grant.join_code_expires_at = Some(join_expires_at);
    Ok((StatusCode::CREATED, axum::Json(grant)))
}

async fn join_session(
    AxState(app): AxState<Shared>,
    client: Client,
    JsonBody(body): JsonBody<JoinSession>,
) -> Result<axum::Json<Grant>, ApiError> {
    let joiner_key = parse_peer_key(body.peer_public_key.as_deref())?;
    let refuse = |reason: &str| {
        app.metrics
            .join_codes_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: AUDIT, event = "join_refused", reason, key_id = %client.key_id, client = %client.addr.ip, via = %client.addr.via_display());
        ApiError::InvalidJoinCode
    };
    if !well_formed_join_code(&body.join_code) {
        return Err(refuse("malformed_code"));
    }
    let code = JoinCodeHash::of(&body.join_code);
    let now = now();
    let Some(waiting) = app.state.peek_join_code(code, now).await? else {
        return Err(refuse("unknown_used_or_expired"));
    };
    // Checked before the code is used up, so a refused join does not burn it.
    if !client.scopes.may_join(&waiting.realm) {
        return Err(app.auth_failed(
            AuthFailure::Scope,
            Some(&client.key_id),
            client.addr,
            "/v1/sessions/join",
        ));
    }
    if let Some(expected) = &waiting.expected_joiner_public_key
        && joiner_key.map(|k| k.to_string()).as_ref() != Some(expected)
    {
        tracing::info!(target: AUDIT, event = "join_refused", reason = "peer_identity_mismatch", key_id = %client.key_id, client = %client.addr.ip, via = %client.addr.via_display(), session_id = %format_args!("{:016x}", waiting.session_id));
        return Err(ApiError::PeerIdentityMismatch);
    }
    // The relay too: if it is gone (no longer listed, no heartbeat), the code stays usable
    // for when it is back.
    let Some(relay) = app
        .registry
        .find(app.state.as_ref(), waiting.relay_id, now)
        .await?
    else {
        tracing::warn!(target: AUDIT, event = "join_refused", reason = "relay_gone", relay_id = waiting.relay_id, key_id = %client.key_id);
        return Err(ApiError::NoRelay);
    };
    let Some(record) = app
        .state
        .consume_join_code(code, &client.key_id, now)
        .await?
    else {
        return Err(refuse("used_concurrently"));
    };
    let minted = app.mint(&client.live, Slot::B, record.session_id, &relay, now)?;
    app.metrics.sessions_joined.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        target: AUDIT,
        event = "session_joined",
        key_id = %client.key_id,
        client = %client.addr.ip, via = %client.addr.via_display(),
        realm = %record.realm,
        created_by = %record.created_by,
        session_id = %format_args!("{:016x}", record.session_id),
        relay_id = relay.id,
        slot = "B",
        kid = minted.claims.kid,
        token_expires_at = minted.claims.expires.as_secs(),
    );
    Ok(axum::Json(app.grant(
        Slot::B,
        &minted,
        &relay,
        record.creator_public_key,
    )))
}

async fn relay_heartbeat(
    AxState(app): AxState<Shared>,
    client: Client,
    JsonBody(body): JsonBody<Heartbeat>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !client.scopes.may_report_relay(body.relay_id) {
        return Err(app.auth_failed(
            AuthFailure::Scope,
            Some(&client.key_id),
            client.addr,
            "/v1/relays/heartbeat",
        ));
    }
    let address = SocketAddr::from_str(&body.address)
        .ok()
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
        .ok_or(ApiError::BadRequest)?;
    let public_key = ferry_core::keys::RelayPublicKey::from_str(&body.public_key)
        .map_err(|_| ApiError::BadRequest)?;
    if body.capacity == 0 {
        return Err(ApiError::BadRequest);
    }
    // A relay credential may report load for a listed relay, not move it or change its key.
    if let Some(listed) = app.registry.listed(body.relay_id)
        && (listed.address != address || listed.public_key != public_key)
    {
        return Err(app.auth_failed(
            AuthFailure::Scope,
            Some(&client.key_id),
            client.addr,
            "/v1/relays/heartbeat",
        ));
    }
    let now = now();
    let expires_at = now.as_secs().saturating_add(app.heartbeat_ttl.as_secs());
    let report = RelayReport {
        relay_id: body.relay_id,
        address: address.to_string(),
        public_key: public_key.to_string(),
        sessions: body.sessions,
        capacity: body.capacity,
        reported_at: now.as_secs(),
        expires_at,
    };
    app.state.report_relay(&report).await?;
    app.registry.invalidate();
    app.metrics.relay_heartbeats.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(target: AUDIT, event = "relay_heartbeat", key_id = %client.key_id, relay_id = body.relay_id, sessions = body.sessions, capacity = body.capacity);
    Ok(axum::Json(
        serde_json::json!({ "relay_id": body.relay_id, "expires_at": expires_at }),
    ))
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics_page(AxState(app): AxState<Shared>) -> Response {
    let (mut healthy, mut unhealthy) = app.registry.listed_health();
    if let Ok(status) = app.registry.status(app.state.as_ref(), now()).await {
        let registered = status.iter().filter(|s| s.source == "heartbeat");
        for s in registered {
            if s.healthy {
                healthy += 1;
            } else {
                unhealthy += 1;
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render((healthy, unhealthy)),
    )
        .into_response()
}

async fn admin_relays(
    AxState(app): AxState<Shared>,
    _: Admin,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let relays = app.registry.status(app.state.as_ref(), now()).await?;
    Ok(axum::Json(serde_json::json!({ "relays": relays })))
}

/// A session as the admin API lists it.
#[derive(Debug, Serialize)]
struct SessionView {
    session_id: String,
    realm: String,
    relay_id: u64,
    created_by: String,
    created_at: u64,
    join_code_expires_at: u64,
    expires_at: u64,
    joined: bool,
    joined_by: Option<String>,
}

async fn admin_sessions(
    AxState(app): AxState<Shared>,
    _: Admin,
    uri: axum::http::Uri,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let mut limit = 100;
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("limit", n)) => {
                limit = n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or(ApiError::BadRequest)?;
            }
            _ => return Err(ApiError::BadRequest),
        }
    }
    let sessions: Vec<SessionView> = app
        .state
        .sessions(now(), limit)
        .await?
        .into_iter()
        .map(|r| SessionView {
            session_id: format!("{:016x}", r.session_id),
            realm: r.realm,
            relay_id: r.relay_id,
            created_by: r.created_by,
            created_at: r.created_at,
            join_code_expires_at: r.join_expires_at,
            expires_at: r.expires_at,
            joined: r.joined_by.is_some(),
            joined_by: r.joined_by,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "sessions": sessions })))
}

async fn admin_revoke(
    AxState(app): AxState<Shared>,
    _: Admin,
    ClientAddrExtractor(addr): ClientAddrExtractor,
    JsonBody(body): JsonBody<Revoke>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !apikey::valid_id(&body.key_id) {
        return Err(ApiError::BadRequest);
    }
    let newly = app.state.revoke_key(&body.key_id).await?;
    let configured = app.live().api_keys.contains_key(&body.key_id);
    tracing::info!(target: AUDIT, event = "key_revoked", key_id = %body.key_id, newly, configured, client = %addr.ip);
    Ok(axum::Json(serde_json::json!({
        "key_id": body.key_id,
        "revoked": true,
        "already_revoked": !newly,
        "configured": configured,
    })))
}

/// Where the request came from, as an extractor.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddrExtractor(pub ClientIp);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddrExtractor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(client_addr(parts)))
    }
}

// ---- Routers ----

/// One route: method, path, handler.
pub type Route = (&'static str, &'static str, MethodRouter<Shared>);

/// The routes of the public listener.
pub fn public_routes() -> Vec<Route> {
    vec![
        ("GET", "/healthz", get(healthz)),
        ("POST", "/v1/sessions", post(create_session)),
        ("POST", "/v1/sessions/join", post(join_session)),
        ("POST", "/v1/relays/heartbeat", post(relay_heartbeat)),
    ]
}

/// The routes of the admin listener.
pub fn admin_routes() -> Vec<Route> {
    vec![
        ("GET", "/healthz", get(healthz)),
        ("GET", "/metrics", get(metrics_page)),
        ("GET", "/admin/v1/relays", get(admin_relays)),
        ("GET", "/admin/v1/sessions", get(admin_sessions)),
        ("POST", "/admin/v1/keys/revoke", post(admin_revoke)),
    ]
}

/// Which listener a router serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The public listener: per-IP rate limit on `/v1`.
    Public,
    /// The admin listener.
    Admin,
}

fn build(app: Shared, routes: Vec<Route>, listener: Listener) -> Router {
    let paths: Vec<&'static str> = routes.iter().map(|(_, p, _)| *p).collect();
    let mut router: Router<Shared> = Router::new();
    for (_, path, handler) in routes {
        router = router.route(
            path,
            handler.fallback(|| async { ApiError::MethodNotAllowed }),
        );
    }
    let limit = app.max_body_bytes;
    router
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            (Arc::clone(&app), listener, Arc::new(paths)),
            guard,
        ))
        .with_state(app)
}

/// The public listener's router.
pub fn public_router(app: Shared) -> Router {
    build(app, public_routes(), Listener::Public)
}

/// The admin listener's router.
pub fn admin_router(app: Shared) -> Router {
    build(app, admin_routes(), Listener::Admin)
}

/// Around every request: the per-IP limit (public `/v1` routes), the request timeout, and the
/// request counter.
async fn guard(
    AxState((app, listener, paths)): AxState<(Shared, Listener, Arc<Vec<&'static str>>)>,
    mut req: Request,
    next: Next,
) -> Response {
    // Every route is a fixed path, so the label is the path when it is one of them.
    let route: &'static str = paths
        .iter()
        .copied()
        .find(|p| *p == req.uri().path())
        .unwrap_or("other");
    let response = async {
        let peer = req.extensions().get::<ClientAddr>().map(|c| c.0);
        if listener == Listener::Public
            && let Some(peer) = peer
        {
            let live = app.live();
            let client = live.trusted_proxies.client_ip(peer, req.headers());
            req.extensions_mut().insert(client);
            if req.uri().path().starts_with("/v1/") {
                let key = client_net::limit_key(client.ip, live.ipv6_prefix_len);
                if let Err(refused) = app.ip_limiter.check(&key, Instant::now()) {
                    app.metrics.rate_limited(Limiter::Ip);
                    tracing::info!(target: AUDIT, event = "rate_limited", limiter = "ip", client = %client.ip, via = %client.via_display());
                    return ApiError::RateLimited(refused.retry_after_secs()).into_response();
                }
            }
        }
        match tokio::time::timeout(app.request_timeout, next.run(req)).await {
            Ok(response) => response,
            Err(_) => {
                app.metrics.request_timeouts.fetch_add(1, Ordering::Relaxed);
                let mut response = ApiError::Timeout.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        }
    }
    .await;
    app.metrics.request(route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_codes_are_128_random_bits_in_base32() {
        let rng = SystemRandom::new();
        let a = random_join_code(&rng).unwrap();
        let b = random_join_code(&rng).unwrap();
        assert_ne!(a, b);
        assert!(well_formed_join_code(&a), "{a}");
        assert!(!well_formed_join_code(&a[1..]));
        assert!(!well_formed_join_code(&a.to_uppercase()));
        // The last symbol carries the padding bits only in its low part: 26 symbols, 130 bits.
        assert_eq!(a.len() * 5, 130);
    }

    #[test]
    fn error_bodies_are_fixed_codes() {
        for e in [
            ApiError::BadRequest,
            ApiError::Unauthorized,
            ApiError::RateLimited(3),
            ApiError::Internal,
        ] {
            let r = e.into_response();
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            if let ApiError::RateLimited(_) = e {
                assert_eq!(r.headers()[header::RETRY_AFTER], "3");
            }
        }
    }

    #[test]
    fn bearer_tokens_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthFailure::Missing));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Err(AuthFailure::Malformed));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  fgk1.a.b "),
        );
        assert_eq!(bearer(&h), Ok("fgk1.a.b"));
    }
}
