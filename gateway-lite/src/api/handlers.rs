//! The route handlers: sessions (create, join, renew), relay heartbeats, health, metrics and the
//! admin views, with the join codes and session ids they draw.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::SystemTime;

use axum::extract::State as AxState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ferry_core::keys::{PUBLIC_HEADER, PeerPublicKey, RelayPublicKey};
use ferry_core::time::UnixTime;
use ferry_core::token::{ClaimsInput, MintedToken};
use ferry_core::wire::Slot;
use ring::rand::SecureRandom;
use serde::Serialize;

use super::app::{App, Live, Shared};
use super::extract::{Admin, Client, ClientAddrExtractor, JsonBody};
use super::types::{
    CreateSession, Grant, Heartbeat, JoinSession, RelayBody, RenewSession, Revoke, SecretText,
};
use super::{AUDIT, ApiError, DEFAULT_REALM};
use crate::apikey;
use crate::metrics::AuthFailure;
use crate::registry::RelayInfo;
use crate::state::{JoinCodeHash, RelayReport, SessionRecord};

pub(super) fn now() -> UnixTime {
    UnixTime::from(SystemTime::now())
}

/// Length of a 32-byte key in padded standard base64.
const KEY_B64_LEN: usize = 44;

/// A public key of `kind` as the API takes it: exactly the standard base64 of its 32 bytes
/// (44 characters, `=` padded, unused bits zero), or exactly the line
/// `ferry-public-v1 <kind> <base64>` with single spaces. No surrounding blanks, no comments:
/// docs/gateway-openapi.yaml gives this as a pattern, and the server takes nothing else.
fn parse_public_key<K: FromStr>(text: &str, kind: &str) -> Result<K, ApiError> {
    let b64 = text
        .strip_prefix(PUBLIC_HEADER)
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|rest| rest.strip_prefix(kind))
        .and_then(|rest| rest.strip_prefix(' '))
        .unwrap_or(text);
    let shaped = b64.len() == KEY_B64_LEN
        && b64.ends_with('=')
        && b64[..KEY_B64_LEN - 1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if !shaped {
        return Err(ApiError::BadRequest);
    }
    // Decoding also refuses a last symbol whose unused bits are not zero.
    K::from_str(b64).map_err(|_| ApiError::BadRequest)
}

fn parse_peer_key(text: Option<&str>) -> Result<Option<PeerPublicKey>, ApiError> {
    text.map(|t| parse_public_key(t, "peer-x25519")).transpose()
}

/// A relay's public UDP address as a heartbeat gives it: `ip:port` (`[ipv6]:port`), port not
/// 0, the address not unspecified, and no IPv6 scope id (`%n`), which means nothing beyond
/// the relay's own link.
fn parse_relay_address(text: &str) -> Result<SocketAddr, ApiError> {
    if text.contains('%') {
        return Err(ApiError::BadRequest);
    }
    SocketAddr::from_str(text)
        .ok()
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
        .ok_or(ApiError::BadRequest)
}

/// The `limit` of `GET /admin/v1/sessions`: 1 to 10000 in decimal digits only (no sign, no
/// blanks), 100 without a query; any other parameter is refused.
fn sessions_limit(query: Option<&str>) -> Result<usize, ApiError> {
    let mut limit = 100;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                limit = n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or(ApiError::BadRequest)?;
            }
            _ => return Err(ApiError::BadRequest),
        }
    }
    Ok(limit)
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
        self.metrics.tokens_minted.inc();
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
            token: SecretText(zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD.encode(minted.bytes),
            )),
            slot_secret: SecretText(minted.slot_secret.to_base64()),
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

pub(super) async fn create_session(
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
        .await?;
    app.metrics.sessions_created.inc();
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

pub(super) async fn join_session(
    AxState(app): AxState<Shared>,
    client: Client,
    JsonBody(body): JsonBody<JoinSession>,
) -> Result<axum::Json<Grant>, ApiError> {
    let joiner_key = parse_peer_key(body.peer_public_key.as_deref())?;
    let refuse = |reason: &str| {
        app.metrics.join_codes_refused.inc();
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
        tracing::warn!(target: AUDIT, event = "join_refused", reason = "relay_gone", key_id = %client.key_id, client = %client.addr.ip, via = %client.addr.via_display(), session_id = %format_args!("{:016x}", waiting.session_id), relay_id = waiting.relay_id);
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
    app.metrics.sessions_joined.inc();
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

/// A session id as the API writes it: exactly 16 lower-case hex digits. (No session has id 0,
/// so that one is simply not found.)
fn parse_session_id(text: &str) -> Option<u64> {
    let shaped = text.len() == 16 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    shaped.then(|| u64::from_str_radix(text, 16).ok()).flatten()
}

pub(super) async fn renew_session(
    AxState(app): AxState<Shared>,
    client: Client,
    JsonBody(body): JsonBody<RenewSession>,
) -> Result<axum::Json<Grant>, ApiError> {
    let slot = match body.slot.as_str() {
        "A" => Slot::A,
        "B" => Slot::B,
        _ => return Err(ApiError::BadRequest),
    };
    let session_id = parse_session_id(&body.session_id).ok_or(ApiError::BadRequest)?;
    let sid = format!("{session_id:016x}");
    let refuse = |reason: &str, error: ApiError| {
        app.metrics.renewals_refused.inc();
        tracing::info!(target: AUDIT, event = "renew_refused", reason, key_id = %client.key_id, client = %client.addr.ip, via = %client.addr.via_display(), session_id = %sid, slot = %body.slot);
        error
    };
    let now = now();
    let Some(record) = app.state.session(session_id, now).await? else {
        return Err(refuse("unknown_or_expired", ApiError::NotFound));
    };
    // Only the key that took the slot renews it; to any other key the session does not exist.
    let holder = match slot {
        Slot::A => Some(&record.created_by),
        Slot::B => record.joined_by.as_ref(),
    };
    if holder != Some(&client.key_id) {
        return Err(refuse("slot_not_held", ApiError::NotFound));
    }
    let allowed = match slot {
        Slot::A => client.scopes.may_create(&record.realm),
        Slot::B => client.scopes.may_join(&record.realm),
    };
    if !allowed {
        return Err(app.auth_failed(
            AuthFailure::Scope,
            Some(&client.key_id),
            client.addr,
            "/v1/sessions/renew",
        ));
    }
    let live = &client.live;
    let age = now.as_secs().saturating_sub(record.created_at);
    if age >= live.sessions.max_session_age_secs {
        return Err(refuse("too_old", ApiError::SessionTooOld));
    }
    let Some(relay) = app
        .registry
        .find(app.state.as_ref(), record.relay_id, now)
        .await?
    else {
        tracing::warn!(target: AUDIT, event = "renew_refused", reason = "relay_gone", key_id = %client.key_id, client = %client.addr.ip, via = %client.addr.via_display(), session_id = %sid, slot = %body.slot, relay_id = record.relay_id);
        return Err(ApiError::NoRelay);
    };
    let minted = app.mint(live, slot, session_id, &relay, now)?;
    // The record must outlive the token it now grants, so that the token can be renewed in turn.
    if !app
        .state
        .extend_session(session_id, minted.claims.expires.as_secs(), now)
        .await?
    {
        return Err(refuse("unknown_or_expired", ApiError::NotFound));
    }
    app.metrics.sessions_renewed.inc();
    tracing::info!(
        target: AUDIT,
        event = "session_renewed",
        key_id = %client.key_id,
        client = %client.addr.ip, via = %client.addr.via_display(),
        realm = %record.realm,
        session_id = %sid,
        relay_id = relay.id,
        slot = %body.slot,
        kid = minted.claims.kid,
        token_expires_at = minted.claims.expires.as_secs(),
    );
    let expected = match slot {
        Slot::A => record.expected_joiner_public_key,
        Slot::B => record.creator_public_key,
    };
    Ok(axum::Json(app.grant(slot, &minted, &relay, expected)))
}

pub(super) async fn relay_heartbeat(
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
    let address = parse_relay_address(&body.address)?;
    let public_key: RelayPublicKey = parse_public_key(&body.public_key, "relay-x25519")?;
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
    app.metrics.relay_heartbeats.inc();
    tracing::debug!(target: AUDIT, event = "relay_heartbeat", key_id = %client.key_id, client = %client.addr.ip, via = %client.addr.via_display(), relay_id = body.relay_id, sessions = body.sessions, capacity = body.capacity);
    Ok(axum::Json(
        serde_json::json!({ "relay_id": body.relay_id, "expires_at": expires_at }),
    ))
}

pub(super) async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

pub(super) async fn metrics_page(AxState(app): AxState<Shared>) -> Response {
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

pub(super) async fn admin_relays(
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

pub(super) async fn admin_sessions(
    AxState(app): AxState<Shared>,
    _: Admin,
    uri: axum::http::Uri,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let limit = sessions_limit(uri.query())?;
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

pub(super) async fn admin_revoke(
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
    tracing::info!(target: AUDIT, event = "key_revoked", key_id = %body.key_id, newly, configured, client = %addr.ip, via = %addr.via_display());
    Ok(axum::Json(serde_json::json!({
        "key_id": body.key_id,
        "revoked": true,
        "already_revoked": !newly,
        "configured": configured,
    })))
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;

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
    fn public_keys_are_taken_only_in_the_two_documented_forms() {
        let key = PeerPublicKey::from_bytes([7; 32]);
        let b64 = key.to_string();
        assert_eq!(b64.len(), KEY_B64_LEN);
        let ok = |t: &str| parse_public_key::<PeerPublicKey>(t, "peer-x25519");
        assert_eq!(ok(&b64), Ok(key));
        assert_eq!(ok(&format!("ferry-public-v1 peer-x25519 {b64}")), Ok(key));
        for bad in [
            format!(" {b64}"),
            format!("{b64}\n"),
            format!("ferry-public-v1  peer-x25519 {b64}"),
            format!("ferry-public-v1 relay-x25519 {b64}"),
            format!("ferry-public-v1 peer-x25519 {b64} # me"),
            b64.trim_end_matches('=').to_string(),
            // The last symbol before `=` carries 4 bits and 2 unused ones, which must be 0.
            format!("{}B=", &b64[..42]),
            "A".repeat(44),
            "A".repeat(42) + "==",
            "-".repeat(43) + "=",
        ] {
            assert_eq!(ok(&bad), Err(ApiError::BadRequest), "{bad:?}");
        }
        assert_eq!(
            ok(&format!("{}A=", "A".repeat(42))),
            Ok(PeerPublicKey::from_bytes([0; 32]))
        );
        let relay = parse_public_key::<RelayPublicKey>(
            &format!("ferry-public-v1 relay-x25519 {b64}"),
            "relay-x25519",
        );
        assert_eq!(relay, Ok(RelayPublicKey::from_bytes([7; 32])));
    }

    #[test]
    fn relay_addresses_need_a_port_an_address_and_no_scope() {
        for good in ["198.51.100.7:7000", "[2001:db8::7]:7000", "127.0.0.1:00080"] {
            assert!(parse_relay_address(good).is_ok(), "{good}");
        }
        for bad in [
            "198.51.100.7:0",
            "0.0.0.0:7000",
            "[::]:7000",
            "[::0.0.0.0]:7000",
            "[fe80::1%2]:7000",
            "198.51.100.7",
            "relay.example.net:7000",
            "198.51.100.07:7000",
        ] {
            assert_eq!(parse_relay_address(bad), Err(ApiError::BadRequest), "{bad}");
        }
    }

    #[test]
    fn session_ids_are_sixteen_lower_case_hex_digits() {
        assert_eq!(parse_session_id("00000000000000ff"), Some(255));
        assert_eq!(parse_session_id("ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_session_id("0000000000000000"), Some(0));
        for bad in [
            "00000000000000FF",
            "ff",
            "+00000000000000f",
            "000000000000000g",
            "00000000000000ff0",
            "",
        ] {
            assert_eq!(parse_session_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_sessions_limit_is_plain_digits_in_range() {
        assert_eq!(sessions_limit(None), Ok(100));
        assert_eq!(sessions_limit(Some("")), Ok(100));
        assert_eq!(sessions_limit(Some("limit=1")), Ok(1));
        assert_eq!(sessions_limit(Some("limit=10000")), Ok(10_000));
        assert_eq!(sessions_limit(Some("limit=007&")), Ok(7));
        for bad in [
            "limit=+1",
            "limit=-1",
            "limit=0",
            "limit=10001",
            "limit=",
            "limit= 5",
            "limit",
            "limit=1&x=2",
            "other=1",
        ] {
            assert_eq!(
                sessions_limit(Some(bad)),
                Err(ApiError::BadRequest),
                "{bad}"
            );
        }
    }
}
