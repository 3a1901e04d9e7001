//! An async client of the gateway's HTTPS API (docs/gateway-api.md): create a session, join
//! one with its join code, and renew a slot with a fresh token.
//!
//! The client speaks HTTPS only, with rustls (ring provider), and trusts exactly the CA
//! certificates of the PEM file it is given: the system's roots are not used and there is no
//! way to skip the verification of the gateway's certificate or name. The API key is sent as
//! `Authorization: Bearer …` and never appears in `Debug` output or in an error.
//!
//! # The grant
//!
//! Every successful call answers a [`Grant`]: what a peer needs to bind its slot on the relay
//! and to pin the other peer's Noise key. Its file form ([`Grant::to_json`],
//! [`Grant::from_json`], what `ferry-peer create`, `join` and `renew` write with `--out`) is the
//! gateway's own JSON answer, one object:
//!
//! ```json
//! {"session_id": "2146d4dc68d435dd", "slot": "A",
//!  "token": "<208 bytes, base64>", "slot_secret": "<32 bytes, base64>",
//!  "kid": 1, "not_before": 1795598326, "expires_at": 1795598626,
//!  "relay": {"id": 5, "address": "198.51.100.7:7000", "public_key": "<32 bytes, base64>"},
//!  "expected_peer_public_key": "<32 bytes, base64, or null>",
//!  "join_code": "wm7zt7unzry3sz6yjpj753w6ki", "join_code_expires_at": 1795598446}
//! ```
//!
//! `join_code` and `join_code_expires_at` are only in a create's answer (absent or `null`
//! otherwise). `token` and `slot_secret` are secrets of the peer: the CLI writes the file
//! with mode 0600.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ferry_core::keys::{PeerPublicKey, RelayPublicKey};
use ferry_core::proof::SlotSecret;
use ferry_core::token::TOKEN_LEN;
use ferry_core::wire::Slot;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// How long one request to the gateway may take, connection and TLS handshake included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A grant that cannot be read: the gateway's answer or a grant file is malformed.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// Not JSON, not an object, or a field is missing or of the wrong type.
    #[error("the grant is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    /// A field that must be standard base64 is not.
    #[error("the grant's {field} is not valid base64")]
    Base64 {
        /// The field's name.
        field: &'static str,
    },
    /// A field decodes to the wrong number of bytes.
    #[error("the grant's {field} is {len} bytes long, expected {expected}")]
    Length {
        /// The field's name.
        field: &'static str,
        /// Its decoded length.
        len: usize,
        /// The length it must have.
        expected: usize,
    },
    /// `session_id` is not 16 hex digits.
    #[error("the grant's session_id {0:?} is not 16 hex digits")]
    SessionId(String),
    /// `slot` is neither `A` nor `B`.
    #[error("the grant's slot {0:?} is neither \"A\" nor \"B\"")]
    Slot(String),
    /// `relay.address` is not `ip:port`.
    #[error("the grant's relay address {0:?} is not ip:port")]
    RelayAddress(String),
    /// `expires_at` is not after `not_before`.
    #[error("the grant expires ({expires_at}) before it starts ({not_before})")]
    Lifetime {
        /// `not_before`, Unix seconds.
        not_before: u64,
        /// `expires_at`, Unix seconds.
        expires_at: u64,
    },
}

/// A request to the gateway that failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The CA certificate file could not be read.
    #[error("cannot read the CA certificate file {path}: {source}")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA certificate file holds no usable PEM certificate.
    #[error("{path} holds no usable PEM certificate: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The gateway URL is not an `https://` URL.
    #[error("the gateway URL {0:?} is not an https:// URL")]
    Url(String),
    /// The API key is empty or not a valid HTTP header value (its text is not shown).
    #[error("the API key is empty or holds characters not allowed in an HTTP header")]
    ApiKey,
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTPS client: {0}")]
    Client(String),
    /// The gateway could not be reached, or its certificate was refused, or the answer broke off.
    #[error("cannot reach the gateway at {url}: {detail}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The cause, with its whole chain (e.g. the certificate verification failure).
        detail: String,
    },
    /// The gateway refused the request with `{"error": code}` (docs/gateway-api.md §Errors).
    #[error("the gateway refused the request: {status} {code}{}", retry_after.map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The gateway's error code (`unauthorized`, `invalid_join_code`, …), or `unknown`
        /// when the body was not the gateway's error JSON.
        code: String,
        /// `Retry-After` in seconds, when given (429).
        retry_after: Option<u64>,
    },
    /// The gateway answered success with a grant that cannot be read.
    #[error("the gateway's answer is not a valid grant: {0}")]
    Grant(#[from] GrantError),
}

/// The relay a grant names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// The relay's id (tokens are bound to it).
    pub id: u64,
    /// Where to send BIND and DATA.
    pub address: SocketAddr,
    /// The relay's static X25519 key.
    pub public_key: RelayPublicKey,
}

/// What the gateway grants a peer for one slot of a session (see the module doc).
/// `Debug` never shows the token or the slot secret.
#[derive(Clone)]
pub struct Grant {
    /// The session id.
    pub session_id: u64,
    /// The slot this grant binds.
    pub slot: Slot,
    /// The token for BIND (a secret of this peer).
    pub token: Zeroizing<[u8; TOKEN_LEN]>,
    /// The slot secret for the BIND proofs (a secret of this peer).
    pub slot_secret: SlotSecret,
    /// The id of the gateway key that signed the token.
    pub kid: u32,
    /// The token is valid from this Unix time.
    pub not_before: u64,
    /// The token's `exp`, Unix seconds: renew well before it.
    pub expires_at: u64,
    /// The relay to bind on.
    pub relay: RelayInfo,
    /// The other peer's Noise static key to pin, when known (always for slot B).
    pub expected_peer_public_key: Option<PeerPublicKey>,
    /// The join code for the other peer (create only).
    pub join_code: Option<String>,
    /// When the join code stops working, Unix seconds (create only).
    pub join_code_expires_at: Option<u64>,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("session_id", &format_args!("{:016x}", self.session_id))
            .field("slot", &self.slot)
            .field("token", &"<redacted>")
            .field("slot_secret", &self.slot_secret)
            .field("kid", &self.kid)
            .field("not_before", &self.not_before)
            .field("expires_at", &self.expires_at)
            .field("relay", &self.relay)
            .field("expected_peer_public_key", &self.expected_peer_public_key)
            .field("join_code", &self.join_code.as_ref().map(|_| "<redacted>"))
            .field("join_code_expires_at", &self.join_code_expires_at)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayJson {
    id: u64,
    address: String,
    public_key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantJson {
    session_id: String,
    slot: String,
    token: String,
    slot_secret: String,
    kid: u32,
    not_before: u64,
    expires_at: u64,
    relay: RelayJson,
    expected_peer_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join_code_expires_at: Option<u64>,
}

fn decode_fixed<const N: usize>(
    field: &'static str,
    text: &str,
) -> Result<Zeroizing<[u8; N]>, GrantError> {
    let bytes = Zeroizing::new(
        BASE64
            .decode(text)
            .map_err(|_| GrantError::Base64 { field })?,
    );
    let mut out = Zeroizing::new([0u8; N]);
    if bytes.len() != N {
        return Err(GrantError::Length {
            field,
            len: bytes.len(),
            expected: N,
        });
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

impl Grant {
    /// Parses a grant: the gateway's answer to create, join or renew, or a grant file.
    pub fn from_json(text: &str) -> Result<Self, GrantError> {
        let json: GrantJson = serde_json::from_str(text)?;
        let session_id = if json.session_id.len() == 16
            && json.session_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            u64::from_str_radix(&json.session_id, 16)
                .map_err(|_| GrantError::SessionId(json.session_id.clone()))?
        } else {
            return Err(GrantError::SessionId(json.session_id));
        };
        let slot = match json.slot.as_str() {
            "A" => Slot::A,
            "B" => Slot::B,
            _ => return Err(GrantError::Slot(json.slot)),
        };
        let token = decode_fixed::<TOKEN_LEN>("token", &json.token)?;
        let slot_secret =
            SlotSecret::from_bytes(*decode_fixed::<32>("slot_secret", &json.slot_secret)?);
        let address = json
            .relay
            .address
            .parse()
            .map_err(|_| GrantError::RelayAddress(json.relay.address.clone()))?;
        let relay_key = decode_fixed::<32>("relay.public_key", &json.relay.public_key)?;
        let expected_peer_public_key = json
            .expected_peer_public_key
            .as_deref()
            .map(|text| decode_fixed::<32>("expected_peer_public_key", text))
            .transpose()?
            .map(|bytes| PeerPublicKey::from_bytes(*bytes));
        if json.expires_at <= json.not_before {
            return Err(GrantError::Lifetime {
                not_before: json.not_before,
                expires_at: json.expires_at,
            });
        }
        Ok(Self {
            session_id,
            slot,
            token,
            slot_secret,
            kid: json.kid,
            not_before: json.not_before,
            expires_at: json.expires_at,
            relay: RelayInfo {
                id: json.relay.id,
                address,
                public_key: RelayPublicKey::from_bytes(*relay_key),
            },
            expected_peer_public_key,
            join_code: json.join_code,
            join_code_expires_at: json.join_code_expires_at,
        })
    }

    /// The grant in its file form (see the module doc), pretty-printed. It holds the token
    /// and the slot secret: store it where only this peer can read it.
    pub fn to_json(&self) -> Zeroizing<String> {
        let json = GrantJson {
            session_id: self.session_id_hex(),
            slot: match self.slot {
                Slot::A => "A",
                Slot::B => "B",
            }
            .to_string(),
            token: BASE64.encode(*self.token),
            slot_secret: self.slot_secret.to_base64().to_string(),
            kid: self.kid,
            not_before: self.not_before,
            expires_at: self.expires_at,
            relay: RelayJson {
                id: self.relay.id,
                address: self.relay.address.to_string(),
                public_key: BASE64.encode(self.relay.public_key.as_bytes()),
            },
            expected_peer_public_key: self
                .expected_peer_public_key
                .map(|key| BASE64.encode(key.as_bytes())),
            join_code: self.join_code.clone(),
            join_code_expires_at: self.join_code_expires_at,
        };
        // Serialising this struct of strings and integers cannot fail.
        Zeroizing::new(serde_json::to_string_pretty(&json).unwrap_or_default() + "\n")
    }

    /// The session id as the gateway writes it: 16 lower-case hex digits.
    pub fn session_id_hex(&self) -> String {
        format!("{:016x}", self.session_id)
    }
}

/// An API key (`fgk1.<id>.<secret>`); `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// Wraps a key, trimming surrounding whitespace (a trailing newline of a key file).
    pub fn new(key: &str) -> Self {
        Self(Zeroizing::new(key.trim().to_string()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A client of one gateway; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct GatewayClient {
    base_url: String,
    http: reqwest::Client,
    auth: reqwest::header::HeaderValue,
}

impl fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayClient")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize)]
struct CreateBody<'a> {
    realm: &'a str,
    peer_public_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_peer_public_key: Option<String>,
}

#[derive(Serialize)]
struct JoinBody<'a> {
    join_code: &'a str,
    peer_public_key: String,
}

#[derive(Serialize)]
struct RenewBody {
    session_id: String,
    slot: &'static str,
}

#[derive(Deserialize)]
struct ErrorJson {
    error: String,
}

impl GatewayClient {
    /// A client of the gateway at `base_url` (`https://host[:port]`, without a path), trusting
    /// only the CA certificates in the PEM file `ca_file`, authenticating with `api_key`.
    pub fn new(base_url: &str, ca_file: &Path, api_key: &ApiKey) -> Result<Self, GatewayError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        if !base_url.starts_with("https://") || base_url.len() == "https://".len() {
            return Err(GatewayError::Url(base_url));
        }
        if api_key.0.is_empty() {
            return Err(GatewayError::ApiKey);
        }
        let bearer = Zeroizing::new(format!("Bearer {}", *api_key.0));
        let mut auth =
            reqwest::header::HeaderValue::from_str(&bearer).map_err(|_| GatewayError::ApiKey)?;
        auth.set_sensitive(true);
        let pem = ferry_keyfile::read_text_file(ca_file, ferry_keyfile::MAX_PEM_FILE).map_err(
            |source| GatewayError::ReadCa {
                path: ca_file.to_owned(),
                source,
            },
        )?;
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
            GatewayError::BadCa {
                path: ca_file.to_owned(),
                reason: ferry_core::error_line::one_line(&e),
            }
        })?;
        if certs.is_empty() {
            return Err(GatewayError::BadCa {
                path: ca_file.to_owned(),
                reason: "no CERTIFICATE block".to_string(),
            });
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .tls_built_in_root_certs(false)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| GatewayError::Client(ferry_core::error_line::one_line(&e)))?;
        Ok(Self {
            base_url,
            http,
            auth,
        })
    }

    /// `POST /v1/sessions`: creates a session in `realm` for this peer (slot A); names the
    /// joiner's key if `expected_peer` is given. The grant carries the join code.
    pub async fn create(
        &self,
        realm: &str,
        peer_public_key: &PeerPublicKey,
        expected_peer: Option<&PeerPublicKey>,
    ) -> Result<Grant, GatewayError> {
        let body = CreateBody {
            realm,
            peer_public_key: BASE64.encode(peer_public_key.as_bytes()),
            expected_peer_public_key: expected_peer.map(|k| BASE64.encode(k.as_bytes())),
        };
        self.post("/v1/sessions", &body).await
    }

    /// `POST /v1/sessions/join`: joins the session of `join_code` as this peer (slot B). The
    /// grant's `expected_peer_public_key` is the creator's key, to pin.
    pub async fn join(
        &self,
        join_code: &str,
        peer_public_key: &PeerPublicKey,
    ) -> Result<Grant, GatewayError> {
        let body = JoinBody {
            join_code,
            peer_public_key: BASE64.encode(peer_public_key.as_bytes()),
        };
        self.post("/v1/sessions/join", &body).await
    }

    /// `POST /v1/sessions/renew`: a fresh token and slot secret for `slot` of `session_id`,
    /// which this client's API key created (A) or joined (B).
    pub async fn renew(&self, session_id: u64, slot: Slot) -> Result<Grant, GatewayError> {
        let body = RenewBody {
            session_id: format!("{session_id:016x}"),
            slot: match slot {
                Slot::A => "A",
                Slot::B => "B",
            },
        };
        self.post("/v1/sessions/renew", &body).await
    }

    async fn post(&self, path: &str, body: &impl Serialize) -> Result<Grant, GatewayError> {
        let url = format!("{}{path}", self.base_url);
        let unreachable = |e: reqwest::Error| GatewayError::Unreachable {
            url: url.clone(),
            detail: ferry_core::error_line::one_line(&e.without_url()),
        };
        let response = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, self.auth.clone())
            .json(body)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let text = response.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let code = serde_json::from_str::<ErrorJson>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| "unknown".to_string());
            return Err(GatewayError::Refused {
                status: status.as_u16(),
                code,
                retry_after,
            });
        }
        Ok(Grant::from_json(&text)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

    use super::*;

    fn b64(len: usize, byte: u8) -> String {
        BASE64.encode(vec![byte; len])
    }

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "session_id": "2146d4dc68d435dd", "slot": "A",
            "token": b64(TOKEN_LEN, 7), "slot_secret": b64(32, 9),
            "kid": 1, "not_before": 1795598326u64, "expires_at": 1795598626u64,
            "relay": {"id": 5, "address": "198.51.100.7:7000", "public_key": b64(32, 3)},
            "expected_peer_public_key": null,
            "join_code": "wm7zt7unzry3sz6yjpj753w6ki", "join_code_expires_at": 1795598446u64,
        })
    }

    fn parse(value: &serde_json::Value) -> Result<Grant, GrantError> {
        Grant::from_json(&value.to_string())
    }

    #[test]
    fn a_gateway_answer_parses_and_round_trips_through_the_file_form() {
        let grant = parse(&sample()).unwrap();
        assert_eq!(grant.session_id, 0x2146d4dc68d435dd);
        assert_eq!(grant.slot, Slot::A);
        assert_eq!(*grant.token, [7u8; TOKEN_LEN]);
        assert_eq!(grant.slot_secret.expose(), &[9u8; 32]);
        assert_eq!(grant.relay.id, 5);
        assert_eq!(
            grant.relay.address,
            "198.51.100.7:7000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(grant.relay.public_key.as_bytes(), &[3u8; 32]);
        assert_eq!(grant.expected_peer_public_key, None);
        assert_eq!(
            grant.join_code.as_deref(),
            Some("wm7zt7unzry3sz6yjpj753w6ki")
        );
        let again = Grant::from_json(&grant.to_json()).unwrap();
        assert_eq!(again.to_json(), grant.to_json());
        assert_eq!(*again.token, *grant.token);

        let mut joined = sample();
        let map = joined.as_object_mut().unwrap();
        map.remove("join_code");
        map.remove("join_code_expires_at");
        map.insert("slot".into(), "B".into());
        map.insert("expected_peer_public_key".into(), b64(32, 4).into());
        let grant = parse(&joined).unwrap();
        assert_eq!(grant.slot, Slot::B);
        assert_eq!(grant.join_code, None);
        assert_eq!(
            grant.expected_peer_public_key.unwrap().as_bytes(),
            &[4u8; 32]
        );
        assert!(!grant.to_json().contains("join_code"));
    }

    #[test]
    fn debug_hides_the_token_the_slot_secret_and_the_join_code() {
        let grant = parse(&sample()).unwrap();
        let text = format!("{grant:?}");
        assert!(!text.contains(&b64(TOKEN_LEN, 7)), "{text}");
        assert!(!text.contains(&b64(32, 9)), "{text}");
        assert!(!text.contains("wm7zt7unzry3sz6yjpj753w6ki"), "{text}");
        assert!(text.contains("2146d4dc68d435dd"), "{text}");
        let key = ApiKey::new("fgk1.app.very-secret\n");
        assert!(!format!("{key:?}").contains("very-secret"));
    }

    fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
        let mut json = sample();
        json.as_object_mut().unwrap().insert(field.into(), value);
        json
    }

    #[test]
    fn bad_base64_and_wrong_lengths_are_typed_errors() {
        let err = parse(&with("token", "not base64!".into())).unwrap_err();
        assert!(
            matches!(err, GrantError::Base64 { field: "token" }),
            "{err}"
        );
        let err = parse(&with("token", b64(TOKEN_LEN - 1, 1).into())).unwrap_err();
        assert!(
            matches!(
                err,
                GrantError::Length { field: "token", len, expected: TOKEN_LEN } if len == TOKEN_LEN - 1
            ),
            "{err}"
        );
        let err = parse(&with("slot_secret", b64(31, 1).into())).unwrap_err();
        assert!(
            matches!(
                err,
                GrantError::Length {
                    field: "slot_secret",
                    len: 31,
                    expected: 32
                }
            ),
            "{err}"
        );
        let err = parse(&with("expected_peer_public_key", b64(33, 1).into())).unwrap_err();
        assert!(
            matches!(
                err,
                GrantError::Length {
                    field: "expected_peer_public_key",
                    len: 33,
                    ..
                }
            ),
            "{err}"
        );
        let mut relay = sample()["relay"].clone();
        relay["public_key"] = "%%%%".into();
        let err = parse(&with("relay", relay)).unwrap_err();
        assert!(
            matches!(
                err,
                GrantError::Base64 {
                    field: "relay.public_key"
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn malformed_fields_and_json_are_typed_errors() {
        let err = parse(&with("session_id", "2146d4dc68d435d".into())).unwrap_err();
        assert!(matches!(err, GrantError::SessionId(_)), "{err}");
        let err = parse(&with("session_id", "+146d4dc68d435dd".into())).unwrap_err();
        assert!(matches!(err, GrantError::SessionId(_)), "{err}");
        let err = parse(&with("slot", "C".into())).unwrap_err();
        assert!(matches!(err, GrantError::Slot(_)), "{err}");
        let mut relay = sample()["relay"].clone();
        relay["address"] = "relay.example:7000".into();
        let err = parse(&with("relay", relay)).unwrap_err();
        assert!(matches!(err, GrantError::RelayAddress(_)), "{err}");
        let err = parse(&with("expires_at", 1795598326u64.into())).unwrap_err();
        assert!(matches!(err, GrantError::Lifetime { .. }), "{err}");
        let err = parse(&with("kid", "1".into())).unwrap_err();
        assert!(matches!(err, GrantError::Json(_)), "{err}");
        let err = parse(&with("surprise", 1.into())).unwrap_err();
        assert!(matches!(err, GrantError::Json(_)), "{err}");
        let err = Grant::from_json("[1, 2]").unwrap_err();
        assert!(matches!(err, GrantError::Json(_)), "{err}");
    }

    #[test]
    fn the_client_wants_https_a_valid_key_and_a_readable_ca() {
        let key = ApiKey::new("fgk1.app.secret");
        let err =
            GatewayClient::new("http://localhost:1", Path::new("/nonexistent"), &key).unwrap_err();
        assert!(matches!(err, GatewayError::Url(_)), "{err}");
        for bad in ["", " \n", "fgk1.app.line\nbreak"] {
            let bad = ApiKey::new(bad);
            let err = GatewayClient::new("https://localhost:1", Path::new("/nonexistent"), &bad)
                .unwrap_err();
            assert!(matches!(err, GatewayError::ApiKey), "{err}");
            assert!(!err.to_string().contains("break"), "{err}");
        }
        let err = GatewayClient::new(
            "https://localhost:1",
            Path::new("/nonexistent/ca.pem"),
            &key,
        )
        .unwrap_err();
        assert!(matches!(err, GatewayError::ReadCa { .. }), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let err = GatewayClient::new("https://localhost:1", &ca, &key).unwrap_err();
        assert!(matches!(err, GatewayError::BadCa { .. }), "{err}");
    }
}
