//! Key types and key files for relays, gateways and peers.
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
//! Secret files are created with mode 0600 and [`load_secret_file`] refuses any file that the
//! group or others may access. Secret types zeroize their bytes on drop, and neither `Debug`,
//! `Display` nor any [`KeyError`] ever contains secret bytes; `Debug` shows at most the
//! fingerprint of the matching public key. Public keys also parse from and print as plain
//! base64 ([`std::str::FromStr`], [`fmt::Display`]) since configuration files carry them.
//!
//! The gateway signing key is stored as its 32-byte Ed25519 seed (RFC 8032 private key) and
//! turned into a ring `Ed25519KeyPair` with `from_seed_unchecked` at load time; the seed is
//! zeroized on drop, ring's expanded key pair is not (ring offers no way to do so).

use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
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
/// Largest key file we read; a key line is about 80 bytes.
const MAX_FILE_LEN: u64 = 16 * 1024;
const KINDS: [&str; 3] = ["relay-x25519", "gateway-ed25519", "peer-x25519"];

/// Where a key came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// A key file.
    File(PathBuf),
    /// A string, e.g. a public key in a configuration file.
    Text,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "key file {}", path.display()),
            Self::Text => f.write_str("key string"),
        }
    }
}

/// Errors reading, writing, parsing or generating keys. None of them contains secret bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be opened, read or written (the file system is to blame).
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing refused because the file exists and overwriting was not asked for.
    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A secret key file may be accessed by group or others (the operator is to blame).
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`",
        path = path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The text is not one `<header> <kind> <base64>` line.
    #[error("{origin}: {reason}")]
    Format {
        /// Where the key came from.
        origin: KeySource,
        /// What is wrong.
        reason: &'static str,
    },
    /// A secret was found where a public key was expected, or the other way round.
    #[error("{origin}: expected a line starting with `{expected}`, found `{found}`")]
    WrongHeader {
        /// Where the key came from.
        origin: KeySource,
        /// The header that was expected.
        expected: &'static str,
        /// The header that was found (only ever one of the two known headers or `<other>`).
        found: &'static str,
    },
    /// The key is of another kind (e.g. a peer key given as a relay key).
    #[error("{origin}: expected a `{expected}` key, found `{found}`")]
    WrongKind {
        /// Where the key came from.
        origin: KeySource,
        /// The kind that was expected.
        expected: &'static str,
        /// The kind that was found (only ever a known kind or `<unknown>`).
        found: &'static str,
    },
    /// The key is not valid standard base64.
    #[error("{origin}: the key is not valid base64")]
    Base64 {
        /// Where the key came from.
        origin: KeySource,
    },
    /// The key does not decode to 32 bytes.
    #[error("{origin}: the key decodes to {len} bytes, expected {KEY_LEN}")]
    Length {
        /// Where the key came from.
        origin: KeySource,
        /// Number of decoded bytes.
        len: usize,
    },
    /// ring refused the Ed25519 seed.
    #[error("{origin}: the Ed25519 key was rejected")]
    Rejected {
        /// Where the key came from.
        origin: KeySource,
    },
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
        fn from_secret_bytes(bytes: &[u8; KEY_LEN], source: &KeySource) -> Result<Self, KeyError>;
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

            /// Loads a `ferry-public-v1` key file of this kind.
            pub fn load(path: &Path) -> Result<Self, KeyError> {
                load_public_file(path)
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

            /// Parses plain base64, or a full `ferry-public-v1 <kind> <base64>` line.
            fn from_str(text: &str) -> Result<Self, KeyError> {
                let text = text.trim();
                if text.starts_with(PUBLIC_HEADER) || text.starts_with(SECRET_HEADER) {
                    return parse_key_text::<Self>(text, PUBLIC_HEADER, KeySource::Text)
                        .map(|bytes| Self(*bytes));
                }
                decode_key(text, &KeySource::Text).map(|bytes| Self(*bytes))
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

    /// Loads a `ferry-secret-v1 relay-x25519` key file (mode must be 0600 or stricter).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_secret_file(path)
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
    fn from_secret_bytes(bytes: &[u8; KEY_LEN], _: &KeySource) -> Result<Self, KeyError> {
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

    /// Loads a `ferry-secret-v1 peer-x25519` key file (mode must be 0600 or stricter).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_secret_file(path)
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
    fn from_secret_bytes(bytes: &[u8; KEY_LEN], _: &KeySource) -> Result<Self, KeyError> {
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
        Self::from_seed(&*random_32(rng)?, &KeySource::Text)
    }

    /// A key from its 32-byte seed (for tests and fixed fixtures).
    pub fn from_seed_bytes(seed: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        Self::from_seed(seed, &KeySource::Text)
    }

    fn from_seed(seed: &[u8; KEY_LEN], source: &KeySource) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyError::Rejected {
            origin: source.clone(),
        })?;
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

    /// Loads a `ferry-secret-v1 gateway-ed25519` key file (mode must be 0600 or stricter).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_secret_file(path)
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
    fn from_secret_bytes(bytes: &[u8; KEY_LEN], source: &KeySource) -> Result<Self, KeyError> {
        Self::from_seed(bytes, source)
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

fn decode_key(b64: &str, source: &KeySource) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let bytes = Zeroizing::new(BASE64.decode(b64).map_err(|_| KeyError::Base64 {
        origin: source.clone(),
    })?);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(KeyError::Length {
            origin: source.clone(),
            len: bytes.len(),
        });
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// Finds the one key line in `text` and checks its header and kind against `header` and `K`.
fn parse_key_text<K: KindName>(
    text: &str,
    header: &'static str,
    source: KeySource,
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let format = |reason| KeyError::Format {
        origin: source.clone(),
        reason,
    };
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
            origin: source,
            expected: header,
            found: known_header(found_header),
        });
    }
    if kind != K::KIND_WORD {
        return Err(KeyError::WrongKind {
            origin: source,
            expected: K::KIND_WORD,
            found: known_kind(kind),
        });
    }
    decode_key(b64, &source)
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

/// Opens `path` for writing with `mode`, creating it (and refusing an existing file unless
/// `overwrite`).
fn create_key_file(path: &Path, mode: u32, overwrite: bool) -> Result<File, KeyError> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            KeyError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    // `mode` only applies to new files; an overwritten file keeps its old bits otherwise.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(file)
}

fn write_all(mut file: File, path: &Path, text: &str) -> Result<(), KeyError> {
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Writes `key` to a new file at `path` with mode 0600. An existing file is an error
/// ([`KeyError::AlreadyExists`]) unless `overwrite`.
pub fn write_secret_file<K: SecretKey>(
    path: &Path,
    key: &K,
    overwrite: bool,
) -> Result<(), KeyError> {
    let file = create_key_file(path, 0o600, overwrite)?;
    let bytes = key.to_secret_bytes();
    let text = Zeroizing::new(format!(
        "# Ferry {kind} secret key. Keep it secret; mode must stay 0600.\n\
         # public key: {public}\n\
         {SECRET_HEADER} {kind} {b64}\n",
        kind = <K as sealed::SecretBytes>::KIND,
        public = BASE64.encode(sealed::PublicBytes::to_public_bytes(&key.public_key())),
        b64 = Zeroizing::new(BASE64.encode(*bytes)).as_str(),
    ));
    write_all(file, path, &text)
}

/// Writes `key` to `path` with mode 0644. An existing file is an error unless `overwrite`.
pub fn write_public_file<K: PublicKey>(
    path: &Path,
    key: &K,
    overwrite: bool,
) -> Result<(), KeyError> {
    let file = create_key_file(path, 0o644, overwrite)?;
    let text = format!(
        "# Ferry {kind} public key\n{PUBLIC_HEADER} {kind} {b64}\n",
        kind = <K as sealed::PublicBytes>::KIND,
        b64 = BASE64.encode(key.to_public_bytes()),
    );
    write_all(file, path, &text)
}

fn read_key_file(path: &Path, secret: bool) -> Result<Zeroizing<String>, KeyError> {
    let io_error = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    if secret {
        // Checked on the open file, so the file we read is the file we checked.
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_FILE_LEN)
        .read_to_string(&mut text)
        .map_err(io_error)?;
    Ok(text)
}

/// Loads a secret key file of kind `K`, refusing files with any group or other permission bit.
pub fn load_secret_file<K: SecretKey>(path: &Path) -> Result<K, KeyError> {
    let text = read_key_file(path, true)?;
    let source = KeySource::File(path.to_owned());
    let bytes = parse_key_text::<SecretKind<K>>(&text, SECRET_HEADER, source.clone())?;
    K::from_secret_bytes(&bytes, &source)
}

/// Loads a public key file of kind `K`.
pub fn load_public_file<K: PublicKey>(path: &Path) -> Result<K, KeyError> {
    let text = read_key_file(path, false)?;
    let bytes = parse_key_text::<K>(&text, PUBLIC_HEADER, KeySource::File(path.to_owned()))?;
    Ok(K::from_public_bytes(*bytes))
}

/// Writes `key` to `secret_path` (mode 0600) and its public key next to it, at
/// `secret_path` + `.pub` (mode 0644): what every `keygen` command does. Returns the public
/// key's path.
pub fn write_key_pair<K: SecretKey>(
    secret_path: &Path,
    key: &K,
    overwrite: bool,
) -> Result<PathBuf, KeyError> {
    let mut public = secret_path.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    write_secret_file(secret_path, key, overwrite)?;
    write_public_file(&public, &key.public_key(), overwrite)?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::sealed::{PublicBytes as _, SecretBytes as _};
    use super::*;
    use ring::rand::SystemRandom;

    /// A unique temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ferry-keys-{}-{}-{name}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn path(&self, file: &str) -> PathBuf {
            self.0.join(file)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn round_trip<K: SecretKey>(dir: &TempDir, key: &K) -> K {
        let secret_path = dir.path(&format!("{}.key", K::KIND_NAME));
        let public_path = dir.path(&format!("{}.pub", K::KIND_NAME));
        write_secret_file(&secret_path, key, false).unwrap();
        write_public_file(&public_path, &key.public_key(), false).unwrap();
        assert_eq!(mode_of(&secret_path), 0o600);
        let loaded: K = load_secret_file(&secret_path).unwrap();
        let public: K::Public = load_public_file(&public_path).unwrap();
        assert_eq!(loaded.to_secret_bytes(), key.to_secret_bytes());
        assert_eq!(public.to_public_bytes(), key.public_key().to_public_bytes());
        loaded
    }

    #[test]
    fn write_load_round_trip_for_each_kind() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("round-trip");
        let relay = RelayStaticKey::generate(&rng).unwrap();
        assert_eq!(round_trip(&dir, &relay).public(), relay.public());
        let gateway = GatewaySigningKey::generate(&rng).unwrap();
        assert_eq!(round_trip(&dir, &gateway).public(), gateway.public());
        let peer = PeerStaticKey::generate(&rng).unwrap();
        let loaded = round_trip(&dir, &peer);
        assert_eq!(loaded.secret_bytes(), peer.secret_bytes());
        assert_eq!(loaded.public(), peer.public());
        assert_eq!(
            RelayStaticKey::load(&dir.path("relay-x25519.key"))
                .unwrap()
                .public(),
            relay.public()
        );
        assert_eq!(
            GatewayPublicKey::load(&dir.path("gateway-ed25519.pub")).unwrap(),
            gateway.public()
        );
    }

    #[test]
    fn write_key_pair_puts_the_public_key_next_to_the_secret() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("pair");
        let key = RelayStaticKey::generate(&rng).unwrap();
        let secret = dir.path("relay.key");
        let public = write_key_pair(&secret, &key, false).unwrap();
        assert_eq!(public, dir.path("relay.key.pub"));
        assert_eq!(mode_of(&secret), 0o600);
        assert_eq!(mode_of(&public), 0o644);
        assert_eq!(RelayPublicKey::load(&public).unwrap(), key.public());
        assert!(matches!(
            write_key_pair(&secret, &key, false),
            Err(KeyError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("overwrite");
        let path = dir.path("peer.key");
        let first = PeerStaticKey::generate(&rng).unwrap();
        let second = PeerStaticKey::generate(&rng).unwrap();
        write_secret_file(&path, &first, false).unwrap();
        let err = write_secret_file(&path, &second, false).unwrap_err();
        assert!(matches!(err, KeyError::AlreadyExists { .. }), "{err}");
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_secret_file(&path, &second, true).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let loaded = PeerStaticKey::load(&path).unwrap();
        assert_eq!(loaded.public(), second.public());
    }

    #[test]
    fn group_or_world_accessible_secret_is_refused() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("perms");
        let path = dir.path("relay.key");
        write_secret_file(&path, &RelayStaticKey::generate(&rng).unwrap(), false).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o610] {
            std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            let err = RelayStaticKey::load(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, KeyError::InsecurePermissions { .. }));
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        std::fs::set_permissions(&path, Permissions::from_mode(0o400)).unwrap();
        RelayStaticKey::load(&path).unwrap();
    }

    #[test]
    fn wrong_kind_and_header_are_refused() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("kind");
        let path = dir.path("peer.key");
        write_secret_file(&path, &PeerStaticKey::generate(&rng).unwrap(), false).unwrap();
        let err = RelayStaticKey::load(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::WrongKind {
                    expected: "relay-x25519",
                    found: "peer-x25519",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("peer.key"));
        // A secret file is not a public key file, and vice versa.
        let err = load_public_file::<PeerPublicKey>(&path).unwrap_err();
        assert!(matches!(err, KeyError::WrongHeader { .. }), "{err}");
        let pub_path = dir.path("peer.pub");
        write_public_file(
            &pub_path,
            &PeerStaticKey::generate(&rng).unwrap().public(),
            false,
        )
        .unwrap();
        std::fs::set_permissions(&pub_path, Permissions::from_mode(0o600)).unwrap();
        let err = PeerStaticKey::load(&pub_path).unwrap_err();
        assert!(matches!(err, KeyError::WrongHeader { .. }), "{err}");
    }

    fn write_raw(path: &Path, text: &str) {
        let mut file = create_key_file(path, 0o600, true).unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn bad_base64_length_and_format_are_refused_naming_the_file() {
        let dir = TempDir::new("format");
        let path = dir.path("bad.key");
        type Expectation = fn(&KeyError) -> bool;
        let cases: [(&str, Expectation); 5] = [
            ("ferry-secret-v1 relay-x25519 !!!notbase64\n", |e| {
                matches!(e, KeyError::Base64 { .. })
            }),
            ("ferry-secret-v1 relay-x25519 AAAA\n", |e| {
                matches!(e, KeyError::Length { len: 3, .. })
            }),
            ("# only a comment\n\n", |e| {
                matches!(e, KeyError::Format { .. })
            }),
            ("ferry-secret-v1 relay-x25519\n", |e| {
                matches!(e, KeyError::Format { .. })
            }),
            (
                "ferry-secret-v1 relay-x25519 AAAA\nferry-secret-v1 relay-x25519 AAAA\n",
                |e| matches!(e, KeyError::Format { .. }),
            ),
        ];
        for (text, is_expected) in cases {
            write_raw(&path, text);
            let err = RelayStaticKey::load(&path).unwrap_err();
            assert!(is_expected(&err), "{text:?}: {err:?}");
            assert!(err.to_string().contains("bad.key"), "{err}");
        }
    }

    #[test]
    fn comments_are_allowed() {
        let dir = TempDir::new("comments");
        let path = dir.path("relay.key");
        let key = RelayStaticKey::from_bytes(&[3; 32]);
        let b64 = BASE64.encode([3u8; 32]);
        write_raw(
            &path,
            &format!("# a comment\n\n  ferry-secret-v1   relay-x25519 {b64}  # trailing\n"),
        );
        assert_eq!(RelayStaticKey::load(&path).unwrap().public(), key.public());
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
            KeyError::Base64 { .. }
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
