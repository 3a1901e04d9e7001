//! The JSON bodies of the API: what clients send and what they get back.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// Reads a request body of type `T`: a JSON object with `T`'s fields, as the API takes it.
/// serde's derived structs would also take a JSON array (the fields by position, so `[]` is an
/// empty create), which docs/gateway-openapi.yaml does not allow: anything but an object is
/// refused. Public so that the fuzz target `gateway_json` reads bodies the same way.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    match first {
        Some(b'{') => serde_json::from_slice(bytes).ok(),
        _ => None,
    }
}

/// An optional string field: absent is `None`, a string is `Some`, and `null` (or anything
/// else) is refused, so that the body is exactly what docs/gateway-openapi.yaml allows.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// A non-negative integer field as JSON Schema's `integer` has it: any JSON number without a
/// fractional part, so `7`, `7.0` and `7e0` alike. A number written with a fraction or an
/// exponent is read as a 64-bit float first, so above 2^53 it is taken as the nearest float.
fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Integer;

    impl serde::de::Visitor<'_> for Integer {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
            // 2^64, exactly representable: every float below it and >= 0 fits a u64.
            const LIMIT: f64 = 18_446_744_073_709_551_616.0;
            if v.fract() == 0.0 && (0.0..LIMIT).contains(&v) {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }

    d.deserialize_any(Integer)
}

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The realm; `default` if absent. The key needs `create:<realm>`.
    #[serde(default, deserialize_with = "present")]
    pub realm: Option<String>,
    /// The creator's Noise static key, base64: handed to the joiner to pin.
    #[serde(default, deserialize_with = "present")]
    pub peer_public_key: Option<String>,
    /// The joiner's Noise static key, base64, if the creator knows it: the join is refused
    /// to anyone who claims another.
    #[serde(default, deserialize_with = "present")]
    pub expected_peer_public_key: Option<String>,
}

/// `POST /v1/sessions/join`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSession {
    /// The code the creator got.
    pub join_code: String,
    /// The joiner's Noise static key, base64 (required if the creator expects one).
    #[serde(default, deserialize_with = "present")]
    pub peer_public_key: Option<String>,
}

/// `POST /v1/sessions/renew`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewSession {
    /// The session id as create or join returned it: 16 lower-case hex digits.
    pub session_id: String,
    /// The slot to renew: `A` (the key created the session) or `B` (it joined it).
    pub slot: String,
}

/// `POST /v1/relays/heartbeat`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The relay id; the key needs `relay:<id>`.
    #[serde(deserialize_with = "integer")]
    pub relay_id: u64,
    /// Its public UDP address.
    pub address: String,
    /// Its X25519 public key, base64.
    pub public_key: String,
    /// Sessions it holds.
    #[serde(deserialize_with = "integer")]
    pub sessions: u64,
    /// Sessions it can hold (at least 1).
    #[serde(deserialize_with = "integer")]
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

/// A granted slot: what `create`, `join` and `renew` answer.
#[derive(Debug, Serialize)]
pub struct Grant {
    /// Session id, 16 hex digits.
    pub session_id: String,
    /// `A` (creator) or `B` (joiner).
    pub slot: &'static str,
    /// The relay token, base64 (208 bytes).
    pub token: SecretText,
    /// The slot secret, base64 (32 bytes): proves the slot to the relay. Keep it secret.
    pub slot_secret: SecretText,
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

/// Text that is a secret (a token, a slot secret in base64): serialized as a plain JSON
/// string, never shown by `Debug`, and zeroed when dropped.
pub struct SecretText(pub zeroize::Zeroizing<String>);

impl Serialize for SecretText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_may_be_absent_but_not_null() {
        let c: CreateSession = serde_json::from_str("{}").unwrap();
        assert!(c.realm.is_none() && c.peer_public_key.is_none());
        let c: CreateSession = serde_json::from_str(r#"{"realm": "a"}"#).unwrap();
        assert_eq!(c.realm.as_deref(), Some("a"));
        for field in ["realm", "peer_public_key", "expected_peer_public_key"] {
            let body = format!("{{\"{field}\": null}}");
            assert!(
                serde_json::from_str::<CreateSession>(&body).is_err(),
                "{body}"
            );
        }
        let j: JoinSession = serde_json::from_str(r#"{"join_code": "x"}"#).unwrap();
        assert!(j.peer_public_key.is_none());
        assert!(
            serde_json::from_str::<JoinSession>(r#"{"join_code": "x", "peer_public_key": null}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<JoinSession>(r#"{"join_code": null}"#).is_err());
    }

    #[test]
    fn bodies_are_objects_never_arrays() {
        assert!(parse_body::<CreateSession>(b" \r\n\t{}").is_some());
        assert!(parse_body::<CreateSession>(b"[]").is_none());
        assert!(parse_body::<CreateSession>(br#"["realm"]"#).is_none());
        assert!(parse_body::<JoinSession>(br#"["code"]"#).is_none());
        assert!(parse_body::<RenewSession>(br#" ["0123456789abcdef", "A"]"#).is_none());
        assert!(parse_body::<Revoke>(br#"["ops"]"#).is_none());
        assert!(parse_body::<Heartbeat>(br#"[1, "198.51.100.7:7000", "k", 0, 1]"#).is_none());
        assert!(parse_body::<Revoke>(br#"{"key_id": "ops"}"#).is_some());
        assert!(parse_body::<Revoke>(b"").is_none());
    }

    #[test]
    fn heartbeat_integers_are_json_schema_integers() {
        let parse = |n: &str| {
            let body = format!(
                r#"{{"relay_id": 1, "address": "a", "public_key": "k", "sessions": {n}, "capacity": 1}}"#
            );
            serde_json::from_str::<Heartbeat>(&body).map(|h| h.sessions)
        };
        assert_eq!(parse("7").unwrap(), 7);
        assert_eq!(parse("7.0").unwrap(), 7);
        assert_eq!(parse("7e0").unwrap(), 7);
        assert_eq!(parse("0.0").unwrap(), 0);
        assert_eq!(parse("-0.0").unwrap(), 0);
        assert_eq!(parse("18446744073709551615").unwrap(), u64::MAX);
        for bad in [
            "7.5",
            "-1",
            "-1.0",
            "1e20",
            "18446744073709551616",
            "\"7\"",
            "null",
            "true",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
