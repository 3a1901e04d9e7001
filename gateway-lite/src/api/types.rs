//! The JSON bodies of the API: what clients send and what they get back.

use serde::{Deserialize, Serialize};

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
