//! Key types for relays, gateways and peers, and the text of their key files.
//!
//! | kind              | secret type           | public type          | used for |
//! |-------------------|-----------------------|----------------------|----------|
//! | `relay-x25519`    | [`RelayStaticKey`]    | [`RelayPublicKey`]   | unsealing slot secrets (`docs/protocol.md` §4.1) |
//! | `gateway-ed25519` | [`GatewaySigningKey`] | [`GatewayPublicKey`] | signing tokens (§4) |
//! | `peer-x25519`     | [`PeerStaticKey`]     | [`PeerPublicKey`]    | the peers' Noise static key (§9) |
//!
//! A key file is text with one key line; blank lines and `#` comments are ignored:
//!
//! ```text
//! # relay static key of relay-1
//! ferry-secret-v1 relay-x25519 <base64 of 32 bytes>
//! ferry-public-v1 relay-x25519 <base64 of 32 bytes>
//! ```
//!
//! This module parses and formats that text ([`parse_secret_key`], [`parse_public_key`],
//! [`format_secret_key`], [`format_public_key`]) and never touches the file system: reading and
//! writing the files, with their permission checks (secret files mode 0600, refused when the
//! group or others may access them), is the `ferry-keyfile` crate's job. Secret types zeroize
//! their bytes on drop, and neither `Debug`, `Display` nor any [`KeyError`] ever contains secret
//! bytes; `Debug` shows at most the fingerprint of the matching public key. Public keys also
//! parse from and print as plain base64 ([`std::str::FromStr`], [`fmt::Display`]) since
//! configuration files carry them.
//!
//! The gateway signing key is stored as its 32-byte Ed25519 seed (RFC 8032 private key) and
//! turned into a ring `Ed25519KeyPair` with `from_seed_unchecked` when it is parsed or made; the seed is
//! zeroized on drop, ring's expanded key pair is not (ring offers no way to do so).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use x25519_dalek::{PublicKey as X25519Public, SharedSecret, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of every key in this module, secret or public.
pub const KEY_LEN: usize = 32;
/// First word of a secret key line.
pub const SECRET_HEADER: &str = "ferry-secret-v1";
/// First word of a public key line.
pub const PUBLIC_HEADER: &str = "ferry-public-v1";
const KINDS: [&str; 3] = ["relay-x25519", "gateway-ed25519", "peer-x25519"];

/// Errors parsing or generating keys. None of them contains secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not one `<header> <kind> <base64>` line.
    #[error("{reason}")]
    Format {
        /// What is wrong.
        reason: &'static str,
    },
    /// A secret was found where a public key was expected, or the other way round.
    #[error("expected a line starting with `{expected}`, found `{found}`")]
    WrongHeader {
        /// The header that was expected.
        expected: &'static str,
        /// The header that was found (only ever one of the two known headers or `<other>`).
        found: &'static str,
    },
    /// The key is of another kind (e.g. a peer key given as a relay key).
    #[error("expected a `{expected}` key, found `{found}`")]
    WrongKind {
        /// The kind that was expected.
        expected: &'static str,
        /// The kind that was found (only ever a known kind or `<unknown>`).
        found: &'static str,
    },
    /// The key is not valid standard base64.
    #[error("the key is not valid base64")]
    Base64,
    /// The key does not decode to 32 bytes.
    #[error("the key decodes to {len} bytes, expected {KEY_LEN}")]
    Length {
        /// Number of decoded bytes.
        len: usize,
    },
    /// ring refused the Ed25519 seed.
    #[error("the Ed25519 key was rejected")]
    Rejected,
    /// The system random number generator failed.
    #[error("the random number generator failed")]
    Rng,
}

mod sealed {
    use super::*;

    /// Byte access for the file format; not nameable outside this module.
    pub trait SecretBytes: Sized {
        const KIND: &'static str;
        fn to_secret_bytes(&self) -> Zeroizing<[u8; KEY_LEN]>;
        fn from_secret_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, KeyError>;
    }

    /// Byte access for the file format; not nameable outside this module.
    pub trait PublicBytes: Sized {
        const KIND: &'static str;
        fn to_public_bytes(&self) -> [u8; KEY_LEN];
        fn from_public_bytes(bytes: [u8; KEY_LEN]) -> Self;
    }
}

/// A secret key type that has a key file format ([`RelayStaticKey`], [`GatewaySigningKey`],
/// [`PeerStaticKey`]).
pub trait SecretKey: sealed::SecretBytes {
    /// The public half.
    type Public: PublicKey;
    /// The kind word in key files, e.g. `relay-x25519`.
    const KIND_NAME: &'static str = <Self as sealed::SecretBytes>::KIND;
    /// The matching public key.
    fn public_key(&self) -> Self::Public;
}

/// A public key type that has a key file format ([`RelayPublicKey`], [`GatewayPublicKey`],
/// [`PeerPublicKey`]).
pub trait PublicKey: sealed::PublicBytes {
    /// The kind word in key files, e.g. `relay-x25519`.
    const KIND_NAME: &'static str = <Self as sealed::PublicBytes>::KIND;
}

fn random_32(rng: &dyn SecureRandom) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(bytes.as_mut()).map_err(|_| KeyError::Rng)?;
    Ok(bytes)
}

/// Short hex fingerprint of a public key: the first 8 bytes of its SHA-256.
fn fingerprint(public: &[u8; KEY_LEN]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Defines a 32-byte public key newtype with base64 `Display`/`FromStr`.
macro_rules! public_key_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// Wraps raw public key bytes.
            pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// The raw public key bytes.
            pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }

            /// Short hex fingerprint (first 8 bytes of the SHA-256 of the key), for logs.
            pub fn fingerprint(&self) -> String {
                fingerprint(&self.0)
            }
        }

        impl sealed::PublicBytes for $name {
            const KIND: &'static str = $kind;
            fn to_public_bytes(&self) -> [u8; KEY_LEN] {
                self.0
            }
            fn from_public_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }
        }

        impl PublicKey for $name {}

        impl fmt::Display for $name {
            /// Standard base64 of the 32 bytes.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&BASE64.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = KeyError;

            /// Parses plain base64, a full `ferry-public-v1 <kind> <base64>` line, or the
            /// whole text of a public key file (its `#` comment line and that line).
            fn from_str(text: &str) -> Result<Self, KeyError> {
                let text = text.trim();
                if text.starts_with(PUBLIC_HEADER)
                    || text.starts_with(SECRET_HEADER)
                    || text.starts_with('#')
                {
                    return parse_key_text::<Self>(text, PUBLIC_HEADER).map(|bytes| Self(*bytes));
                }
                decode_key(text).map(|bytes| Self(*bytes))
            }
        }
    };
}

public_key_type!(
    /// A relay's static X25519 public key `R`, to which gateways seal slot secrets (§4.1).
    RelayPublicKey,
    "relay-x25519"
);
public_key_type!(
    /// A gateway's Ed25519 token verification key, trusted by relays under a `kid` (§4.2).
    GatewayPublicKey,
    "gateway-ed25519"
);
public_key_type!(
    /// A peer's static X25519 public key: its identity in the Noise handshake (§9.1).
    PeerPublicKey,
    "peer-x25519"
);

/// A relay's static X25519 secret key; unseals slot secrets (§4.1). Zeroized on drop.
#[derive(Clone)]
pub struct RelayStaticKey {
    secret: StaticSecret,
    public: RelayPublicKey,
}

impl RelayStaticKey {
    /// A fresh random key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(&*random_32(rng)?))
    }

    /// A key from its 32 secret bytes (for tests and fixed fixtures).
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let secret = StaticSecret::from(*bytes);
        let public = RelayPublicKey(X25519Public::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// The public key `R`.
    pub fn public(&self) -> RelayPublicKey {
        self.public
    }

    /// X25519 with a peer-chosen public key; the caller must check `was_contributory`.
    pub(crate) fn diffie_hellman(&self, their_public: &[u8; KEY_LEN]) -> SharedSecret {
        self.secret
            .diffie_hellman(&X25519Public::from(*their_public))
    }
}

impl fmt::Debug for RelayStaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RelayStaticKey(<redacted>, public {})",
            self.public.fingerprint()
        )
    }
}

impl sealed::SecretBytes for RelayStaticKey {
    const KIND: &'static str = "relay-x25519";
    fn to_secret_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.secret.to_bytes())
    }
    fn from_secret_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(bytes))
    }
}

impl SecretKey for RelayStaticKey {
    type Public = RelayPublicKey;
    fn public_key(&self) -> RelayPublicKey {
        self.public
    }
}

/// A peer's static X25519 secret key, used by the Noise handshake (§9.1). Zeroized on drop.
#[derive(Clone)]
pub struct PeerStaticKey {
    secret: StaticSecret,
    public: PeerPublicKey,
}

impl PeerStaticKey {
    /// A fresh random key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(&*random_32(rng)?))
    }

    /// A key from its 32 secret bytes (for tests and fixed fixtures).
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let secret = StaticSecret::from(*bytes);
        let public = PeerPublicKey(X25519Public::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// The raw secret bytes, for handing to the Noise implementation (`snow`'s
    /// `local_private_key`).
    ///
    /// Handle with care: do not copy them into anything that outlives the handshake builder,
    /// never log or format them, and zeroize any copy you make.
    pub fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        self.secret.as_bytes()
    }

    /// The public key: this peer's identity.
    pub fn public(&self) -> PeerPublicKey {
        self.public
    }
}

impl fmt::Debug for PeerStaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PeerStaticKey(<redacted>, public {})",
            self.public.fingerprint()
        )
    }
}

impl sealed::SecretBytes for PeerStaticKey {
    const KIND: &'static str = "peer-x25519";
    fn to_secret_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.secret.to_bytes())
    }
    fn from_secret_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(bytes))
    }
}

impl SecretKey for PeerStaticKey {
    type Public = PeerPublicKey;
    fn public_key(&self) -> PeerPublicKey {
        self.public
    }
}

/// Zeroize-on-drop holder of an Ed25519 seed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Seed([u8; KEY_LEN]);

/// A gateway's Ed25519 token signing key (§4). Stored as its 32-byte seed, which is zeroized
/// on drop.
pub struct GatewaySigningKey {
    seed: Seed,
    pair: Ed25519KeyPair,
    public: GatewayPublicKey,
}

impl GatewaySigningKey {
    /// A fresh random key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Self::from_seed_bytes(&*random_32(rng)?)
    }

    /// A key from its 32-byte seed (for tests and fixed fixtures).
    pub fn from_seed_bytes(seed: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyError::Rejected)?;
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Self {
            seed: Seed(*seed),
            pair,
            public: GatewayPublicKey(public),
        })
    }

    /// The verification key to give relays.
    pub fn public(&self) -> GatewayPublicKey {
        self.public
    }

    /// Ed25519 signature of `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for GatewaySigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GatewaySigningKey(<redacted>, public {})",
            self.public.fingerprint()
        )
    }
}

impl sealed::SecretBytes for GatewaySigningKey {
    const KIND: &'static str = "gateway-ed25519";
    fn to_secret_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.seed.0)
    }
    fn from_secret_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        Self::from_seed_bytes(bytes)
    }
}

impl SecretKey for GatewaySigningKey {
    type Public = GatewayPublicKey;
    fn public_key(&self) -> GatewayPublicKey {
        self.public
    }
}

/// The known kind word equal to `found`, or `<unknown>`; never echoes file contents.
fn known_kind(found: &str) -> &'static str {
    KINDS
        .into_iter()
        .find(|kind| *kind == found)
        .unwrap_or("<unknown>")
}

fn known_header(found: &str) -> &'static str {
    [SECRET_HEADER, PUBLIC_HEADER]
        .into_iter()
        .find(|h| *h == found)
        .unwrap_or("<other>")
}

fn decode_key(b64: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let bytes = Zeroizing::new(BASE64.decode(b64).map_err(|_| KeyError::Base64)?);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(KeyError::Length { len: bytes.len() });
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// Finds the one key line in `text` and checks its header and kind against `header` and `K`.
fn parse_key_text<K: KindName>(
    text: &str,
    header: &'static str,
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let format = |reason| KeyError::Format { reason };
    let mut lines = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty());
    let line = lines.next().ok_or_else(|| format("no key line found"))?;
    if lines.next().is_some() {
        return Err(format("more than one key line"));
    }
    let mut words = line.split_whitespace();
    let (Some(found_header), Some(kind), Some(b64), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(format("expected one line `<header> <kind> <base64>`"));
    };
    if found_header != header {
        return Err(KeyError::WrongHeader {
            expected: header,
            found: known_header(found_header),
        });
    }
    if kind != K::KIND_WORD {
        return Err(KeyError::WrongKind {
            expected: K::KIND_WORD,
            found: known_kind(kind),
        });
    }
    decode_key(b64)
}

/// The kind word of secret and public key types alike.
trait KindName {
    const KIND_WORD: &'static str;
}

impl<T: sealed::PublicBytes> KindName for T {
    const KIND_WORD: &'static str = T::KIND;
}

/// Adapter so that secret types can use [`parse_key_text`] without overlapping impls.
struct SecretKind<K>(std::marker::PhantomData<K>);

impl<K: sealed::SecretBytes> KindName for SecretKind<K> {
    const KIND_WORD: &'static str = K::KIND;
}

/// The text of a secret key file for `key`: two comment lines (its kind, and its public key)
/// and the `ferry-secret-v1` line. Zeroized on drop.
pub fn format_secret_key<K: SecretKey>(key: &K) -> Zeroizing<String> {
    let bytes = key.to_secret_bytes();
    Zeroizing::new(format!(
        "# Ferry {kind} secret key. Keep it secret; mode must stay 0600.\n\
         # public key: {public}\n\
         {SECRET_HEADER} {kind} {b64}\n",
        kind = <K as sealed::SecretBytes>::KIND,
        public = BASE64.encode(sealed::PublicBytes::to_public_bytes(&key.public_key())),
        b64 = Zeroizing::new(BASE64.encode(*bytes)).as_str(),
    ))
}

/// The text of a public key file for `key`: a comment line and the `ferry-public-v1` line.
pub fn format_public_key<K: PublicKey>(key: &K) -> String {
    format!(
        "# Ferry {kind} public key\n{PUBLIC_HEADER} {kind} {b64}\n",
        kind = <K as sealed::PublicBytes>::KIND,
        b64 = BASE64.encode(key.to_public_bytes()),
    )
}

/// Parses the text of a secret key file of kind `K`: exactly one `ferry-secret-v1 <kind>
/// <base64>` line, blank lines and `#` comments aside.
pub fn parse_secret_key<K: SecretKey>(text: &str) -> Result<K, KeyError> {
    let bytes = parse_key_text::<SecretKind<K>>(text, SECRET_HEADER)?;
    K::from_secret_bytes(&bytes)
}

/// Parses the text of a public key file of kind `K`: exactly one `ferry-public-v1 <kind>
/// <base64>` line, blank lines and `#` comments aside.
pub fn parse_public_key<K: PublicKey>(text: &str) -> Result<K, KeyError> {
    let bytes = parse_key_text::<K>(text, PUBLIC_HEADER)?;
    Ok(K::from_public_bytes(*bytes))
}

#[cfg(test)]
mod tests {
    use super::sealed::SecretBytes as _;
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn a_public_key_parses_from_base64_its_line_or_its_whole_file() {
        let key = PeerStaticKey::generate(&SystemRandom::new())
            .unwrap()
            .public();
        let file = format_public_key(&key);
        let line = file.lines().nth(1).unwrap();
        let b64 = line.split_whitespace().nth(2).unwrap();
        for text in [file.as_str(), line, b64] {
            assert_eq!(text.parse::<PeerPublicKey>().unwrap(), key, "{text:?}");
        }
    }

    #[test]
    fn key_text_round_trip_for_each_kind() {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        let parsed: RelayStaticKey = parse_secret_key(&format_secret_key(&relay)).unwrap();
        assert_eq!(parsed.to_secret_bytes(), relay.to_secret_bytes());
        assert_eq!(parsed.public(), relay.public());
        let gateway = GatewaySigningKey::generate(&rng).unwrap();
        let parsed: GatewaySigningKey = parse_secret_key(&format_secret_key(&gateway)).unwrap();
        assert_eq!(parsed.to_secret_bytes(), gateway.to_secret_bytes());
        assert_eq!(parsed.public(), gateway.public());
        let peer = PeerStaticKey::generate(&rng).unwrap();
        let parsed: PeerStaticKey = parse_secret_key(&format_secret_key(&peer)).unwrap();
        assert_eq!(parsed.secret_bytes(), peer.secret_bytes());
        let text = format_public_key(&peer.public());
        assert_eq!(
            parse_public_key::<PeerPublicKey>(&text).unwrap(),
            peer.public()
        );
        // The secret text names the public key; the public text carries no secret.
        assert!(format_secret_key(&peer).contains(&peer.public().to_string()));
        assert!(!text.contains(&BASE64.encode(peer.secret_bytes())));
    }

    #[test]
    fn key_text_errors() {
        let b64 = BASE64.encode([3u8; 32]);
        let secret = format!("# a comment\n\n  ferry-secret-v1   relay-x25519 {b64}  # trailing\n");
        let key: RelayStaticKey = parse_secret_key(&secret).unwrap();
        assert_eq!(key.public(), RelayStaticKey::from_bytes(&[3; 32]).public());
        assert_eq!(
            parse_secret_key::<PeerStaticKey>(&secret).unwrap_err(),
            KeyError::WrongKind {
                expected: "peer-x25519",
                found: "relay-x25519"
            }
        );
        assert_eq!(
            parse_public_key::<RelayPublicKey>(&secret).unwrap_err(),
            KeyError::WrongHeader {
                expected: PUBLIC_HEADER,
                found: SECRET_HEADER
            }
        );
        assert_eq!(
            parse_secret_key::<RelayStaticKey>("ferry-secret-v1 relay-x25519 AAAA").unwrap_err(),
            KeyError::Length { len: 3 }
        );
        assert_eq!(
            parse_secret_key::<RelayStaticKey>("ferry-secret-v1 relay-x25519 %%%").unwrap_err(),
            KeyError::Base64
        );
        for bad in ["", "# only a comment\n", "ferry-secret-v1 relay-x25519\n"] {
            assert!(
                matches!(
                    parse_secret_key::<RelayStaticKey>(bad),
                    Err(KeyError::Format { .. })
                ),
                "{bad:?}"
            );
        }
        let twice = format!("{secret}{secret}");
        assert_eq!(
            parse_secret_key::<RelayStaticKey>(&twice).unwrap_err(),
            KeyError::Format {
                reason: "more than one key line"
            }
        );
    }

    #[test]
    fn public_keys_parse_from_strings() {
        let key = PeerStaticKey::from_bytes(&[4; 32]).public();
        let text = key.to_string();
        assert_eq!(text.parse::<PeerPublicKey>().unwrap(), key);
        let line = format!("ferry-public-v1 peer-x25519 {text}");
        assert_eq!(line.parse::<PeerPublicKey>().unwrap(), key);
        let err = line.parse::<RelayPublicKey>().unwrap_err();
        assert!(matches!(err, KeyError::WrongKind { .. }), "{err}");
        assert!(matches!(
            "AAAA".parse::<GatewayPublicKey>().unwrap_err(),
            KeyError::Length { len: 3, .. }
        ));
        assert!(matches!(
            "%%%".parse::<GatewayPublicKey>().unwrap_err(),
            KeyError::Base64
        ));
        assert_eq!(PeerPublicKey::from_bytes(*key.as_bytes()), key);
    }

    fn assert_no_secret(debug: &str, secret: &[u8; 32]) {
        let b64 = BASE64.encode(secret);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains(&b64), "{debug}");
        assert!(!debug.contains(&b64[..12]), "{debug}");
        assert!(!debug.contains(&hex[..16]), "{debug}");
        assert!(
            !debug.contains(&format!("{:?}", secret[..4].to_vec())),
            "{debug}"
        );
    }

    #[test]
    fn debug_of_secrets_does_not_show_them() {
        let rng = SystemRandom::new();
        let relay = RelayStaticKey::generate(&rng).unwrap();
        assert_no_secret(&format!("{relay:?}"), &relay.to_secret_bytes());
        let gateway = GatewaySigningKey::generate(&rng).unwrap();
        assert_no_secret(&format!("{gateway:?}"), &gateway.to_secret_bytes());
        let peer = PeerStaticKey::generate(&rng).unwrap();
        assert_no_secret(&format!("{peer:?}"), peer.secret_bytes());
        assert!(format!("{peer:?}").contains(&peer.public().fingerprint()));
    }
}
