//! API keys: what a client presents (`Authorization: Bearer <key>`), how the gateway stores it
//! (only a hash), and what it may do (scopes).
//!
//! A key reads `fgk1.<id>.<secret>`: `id` names the key (in the config, the audit log and a
//! revocation) and is not secret; `secret` is 32 random bytes from the system RNG (256 bits),
//! base64url without padding. The config holds `sha256:<hex>` of
//! `"ferry api key v1\0" ‖ secret`, never the key. A fast hash is enough: the secret is random,
//! so there is nothing to guess a dictionary for (a slow hash such as Argon2 would only make
//! every request expensive). The gateway finds the entry by `id` and compares the hashes in
//! constant time.
//!
//! The admin token of the admin listener is the same kind of key with the id `admin`.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SecureRandom;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

/// The prefix of every key.
pub const KEY_PREFIX: &str = "fgk1";
/// Random bytes in a key's secret part.
pub const SECRET_LEN: usize = 32;
/// Longest key id.
pub const MAX_ID_LEN: usize = 64;
/// Longest realm name.
pub const MAX_REALM_LEN: usize = 64;
const HASH_CONTEXT: &[u8] = b"ferry api key v1\0";
const HASH_PREFIX: &str = "sha256:";

/// Why a key string, a hash line or a scope is refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyError {
    /// The key is not `fgk1.<id>.<secret>`.
    #[error("not an API key of the form fgk1.<id>.<secret>")]
    Format,
    /// The key id has characters outside `a-z 0-9 - _` or a bad length.
    #[error("key id must be 1 to {MAX_ID_LEN} characters from a-z, 0-9, '-' and '_'")]
    Id,
    /// A stored hash is not `sha256:` and 64 hex digits.
    #[error(
        "hash must be \"sha256:\" followed by 64 hex digits (as `ferry-gateway apikey new` prints it)"
    )]
    Hash,
    /// A scope is not `create:<realm>`, `join:<realm>` or `relay:<id>`.
    #[error(
        "scope {0:?} must be create:<realm>, join:<realm> (realm from a-z, 0-9, '-', '_', or *) or relay:<relay id>"
    )]
    Scope(String),
    /// The system random number generator failed.
    #[error("the random number generator failed")]
    Rng,
}

/// Whether `id` is a valid key id (also used for realms).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The stored form of a key: SHA-256 of the domain-separated secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    fn of_secret(secret: &[u8]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(HASH_CONTEXT);
        ctx.update(secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }

    /// Whether `presented` is the key this hash was made from; constant time in the secret.
    pub fn matches(&self, presented: &PresentedKey) -> bool {
        let other = Self::of_secret(presented.secret.as_bytes());
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HASH_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

impl FromStr for KeyHash {
    type Err = ApiKeyError;

    fn from_str(text: &str) -> Result<Self, ApiKeyError> {
        let hex = text
            .trim()
            .strip_prefix(HASH_PREFIX)
            .ok_or(ApiKeyError::Hash)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiKeyError::Hash);
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte =
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| ApiKeyError::Hash)?;
        }
        Ok(Self(out))
    }
}

/// A key as a client presented it, parsed but not yet checked. `Debug` hides the secret.
pub struct PresentedKey {
    id: String,
    secret: Zeroizing<String>,
}

impl PresentedKey {
    /// Parses `fgk1.<id>.<secret>`; says only that the shape is wrong, never echoing it.
    pub fn parse(text: &str) -> Result<Self, ApiKeyError> {
        let mut parts = text.split('.');
        let (Some(KEY_PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ApiKeyError::Format);
        };
        if !valid_id(id) {
            return Err(ApiKeyError::Id);
        }
        // The exact length of 32 bytes in base64url without padding.
        if secret.len() != 43 || B64URL.decode(secret).is_err() {
            return Err(ApiKeyError::Format);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: Zeroizing::new(secret.to_owned()),
        })
    }

    /// The key id (not secret).
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey({}, <redacted>)", self.id)
    }
}

/// A freshly generated key: the full text (shown once) and the hash to store.
pub struct NewKey {
    /// `fgk1.<id>.<secret>`; give it to the client, never store it.
    pub key: Zeroizing<String>,
    /// What the config stores.
    pub hash: KeyHash,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NewKey(<redacted>, {})", self.hash)
    }
}

/// Generates a key with id `id` and 256 random bits.
pub fn generate(rng: &dyn SecureRandom, id: &str) -> Result<NewKey, ApiKeyError> {
    if !valid_id(id) {
        return Err(ApiKeyError::Id);
    }
    let mut raw = Zeroizing::new([0u8; SECRET_LEN]);
    rng.fill(raw.as_mut()).map_err(|_| ApiKeyError::Rng)?;
    let secret = Zeroizing::new(B64URL.encode(*raw));
    let hash = KeyHash::of_secret(secret.as_bytes());
    Ok(NewKey {
        key: Zeroizing::new(format!("{KEY_PREFIX}.{id}.{}", secret.as_str())),
        hash,
    })
}

/// A random key id: `k` and 16 hex digits.
pub fn random_id(rng: &dyn SecureRandom) -> Result<String, ApiKeyError> {
    let mut raw = [0u8; 8];
    rng.fill(&mut raw).map_err(|_| ApiKeyError::Rng)?;
    Ok(std::iter::once("k".to_string())
        .chain(raw.iter().map(|b| format!("{b:02x}")))
        .collect())
}

/// Where a realm pattern applies: one realm, or all (`*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RealmPattern {
    /// Every realm.
    Any,
    /// Exactly this realm.
    Exact(String),
}

impl RealmPattern {
    fn matches(&self, realm: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(r) => r == realm,
        }
    }
}

/// One thing a key may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `create:<realm>`: create sessions in the realm.
    Create(RealmPattern),
    /// `join:<realm>`: join sessions created in the realm.
    Join(RealmPattern),
    /// `relay:<id>`: report (heartbeat) as relay `id`.
    Relay(u64),
}

impl FromStr for Scope {
    type Err = ApiKeyError;

    fn from_str(text: &str) -> Result<Self, ApiKeyError> {
        let bad = || ApiKeyError::Scope(text.chars().take(80).collect());
        let (kind, arg) = text.split_once(':').ok_or_else(bad)?;
        let realm = || match arg {
            "*" => Ok(RealmPattern::Any),
            r if valid_id(r) => Ok(RealmPattern::Exact(r.to_owned())),
            _ => Err(bad()),
        };
        match kind {
            "create" => Ok(Self::Create(realm()?)),
            "join" => Ok(Self::Join(realm()?)),
            "relay" => match arg.parse::<u64>() {
                Ok(id) if id != 0 => Ok(Self::Relay(id)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let realm = |p: &RealmPattern| match p {
            RealmPattern::Any => "*".to_string(),
            RealmPattern::Exact(r) => r.clone(),
        };
        match self {
            Self::Create(p) => write!(f, "create:{}", realm(p)),
            Self::Join(p) => write!(f, "join:{}", realm(p)),
            Self::Relay(id) => write!(f, "relay:{id}"),
        }
    }
}

/// The scopes of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(pub Vec<Scope>);

impl Scopes {
    /// May this key create a session in `realm`?
    pub fn may_create(&self, realm: &str) -> bool {
        self.0
            .iter()
            .any(|s| matches!(s, Scope::Create(p) if p.matches(realm)))
    }

    /// May this key join a session of `realm`?
    pub fn may_join(&self, realm: &str) -> bool {
        self.0
            .iter()
            .any(|s| matches!(s, Scope::Join(p) if p.matches(realm)))
    }

    /// May this key report as relay `id`?
    pub fn may_report_relay(&self, id: u64) -> bool {
        self.0
            .iter()
            .any(|s| matches!(s, Scope::Relay(r) if *r == id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn a_new_key_matches_its_hash_only() {
        let rng = SystemRandom::new();
        let new = generate(&rng, "acme-app").unwrap();
        assert!(new.key.starts_with("fgk1.acme-app."));
        let presented = PresentedKey::parse(&new.key).unwrap();
        assert_eq!(presented.id(), "acme-app");
        assert!(new.hash.matches(&presented));
        let other = generate(&rng, "acme-app").unwrap();
        assert_ne!(other.key, new.key);
        assert!(!other.hash.matches(&presented));
        // The hash survives the config file.
        let parsed: KeyHash = new.hash.to_string().parse().unwrap();
        assert_eq!(parsed, new.hash);
        assert!(!format!("{presented:?}").contains(&new.key[14..]));
        assert!(!format!("{new:?}").contains(&new.key[14..]));
    }

    #[test]
    fn secrets_have_256_random_bits() {
        let rng = SystemRandom::new();
        let key = generate(&rng, "x").unwrap();
        let secret = key.key.rsplit('.').next().unwrap();
        assert_eq!(B64URL.decode(secret).unwrap().len() * 8, 256);
        assert!(random_id(&rng).unwrap().starts_with('k'));
        assert!(valid_id(&random_id(&rng).unwrap()));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let rng = SystemRandom::new();
        let good = generate(&rng, "a").unwrap().key.to_string();
        let secret = good.rsplit('.').next().unwrap().to_string();
        for bad in [
            String::new(),
            "Bearer".into(),
            format!("fgk2.a.{secret}"),
            format!("fgk1.A.{secret}"),
            format!("fgk1..{secret}"),
            format!("fgk1.a.{secret}.x"),
            format!("fgk1.a.{}", &secret[..42]),
            format!("fgk1.a.{secret}A"),
            format!("fgk1.a.{}!", &secret[..42]),
        ] {
            assert!(PresentedKey::parse(&bad).is_err(), "{bad}");
        }
        assert_eq!(generate(&rng, "Bad Id").unwrap_err(), ApiKeyError::Id);
    }

    #[test]
    fn hashes_parse_strictly() {
        for bad in [
            "",
            "sha256:",
            "sha256:zz",
            "md5:00",
            &format!("sha256:{}", "0".repeat(63)),
        ] {
            assert_eq!(
                bad.parse::<KeyHash>().unwrap_err(),
                ApiKeyError::Hash,
                "{bad}"
            );
        }
        let ok = format!("sha256:{}", "aB".repeat(32));
        assert!(ok.parse::<KeyHash>().is_ok());
    }

    #[test]
    fn scopes_parse_and_match() {
        let scopes = Scopes(
            ["create:acme", "join:*", "relay:7"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
        );
        assert!(scopes.may_create("acme"));
        assert!(!scopes.may_create("other"));
        assert!(scopes.may_join("other"));
        assert!(scopes.may_report_relay(7));
        assert!(!scopes.may_report_relay(8));
        for s in &scopes.0 {
            assert_eq!(s.to_string().parse::<Scope>().unwrap(), *s);
        }
        for bad in [
            "create",
            "create:",
            "create:Acme",
            "admin:x",
            "relay:0",
            "relay:x",
            "join:a b",
        ] {
            assert!(
                matches!(bad.parse::<Scope>(), Err(ApiKeyError::Scope(_))),
                "{bad}"
            );
        }
    }
}
