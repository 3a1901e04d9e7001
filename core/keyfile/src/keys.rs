//! Key files: text parsed and formatted by [`ferry_core::keys`], read and written here.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry_core::keys::{
    KeyError, PublicKey, SecretKey, format_public_key, format_secret_key, parse_public_key,
    parse_secret_key,
};
use zeroize::Zeroizing;

/// Largest key file we read; a key line is about 80 bytes.
const MAX_FILE_LEN: u64 = 16 * 1024;

/// Errors reading or writing a key file. None of them contains secret bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
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
    /// Writing refused because the path is a symbolic link: a key is never written through
    /// one (into whatever file it points at).
    #[error("key file {} is a symbolic link; refusing to write a key through it", path.display())]
    SymbolicLink {
        /// The file.
        path: PathBuf,
    },
    /// The file is longer than any key file.
    #[error("key file {}: longer than {MAX_FILE_LEN} bytes; not a key file", path.display())]
    TooLong {
        /// The file.
        path: PathBuf,
    },
    /// A secret key file may be accessed by group or others (the operator is to blame).
    #[error(
        "key file {path} is open to group or others (mode {mode:04o}); run `chmod 600 {path}`",
        path = path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file was read but does not hold one key of the expected kind (its writer is to
    /// blame).
    #[error("key file {}: {source}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with its text.
        #[source]
        source: KeyError,
    },
}

/// Opens `path` for writing with `mode`, creating it (and refusing an existing file unless
/// `overwrite`).
fn create_key_file(path: &Path, mode: u32, overwrite: bool) -> Result<File, KeyFileError> {
    let mut options = OpenOptions::new();
    // Never through a symbolic link (ELOOP), be it new or overwritten.
    options
        .write(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyFileError::AlreadyExists {
                path: path.to_owned(),
            }
        } else if source.raw_os_error() == Some(libc::ELOOP) {
            KeyFileError::SymbolicLink {
                path: path.to_owned(),
            }
        } else {
            KeyFileError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    // `mode` only applies to new files; an overwritten file keeps its old bits otherwise.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(file)
}

fn write_all(mut file: File, path: &Path, text: &str) -> Result<(), KeyFileError> {
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Writes `key` to a new file at `path` with mode 0600. An existing file is an error
/// ([`KeyFileError::AlreadyExists`]) unless `overwrite`.
pub fn write_secret_file<K: SecretKey>(
    path: &Path,
    key: &K,
    overwrite: bool,
) -> Result<(), KeyFileError> {
    let file = create_key_file(path, 0o600, overwrite)?;
    write_all(file, path, &format_secret_key(key))
}

/// Writes `key` to `path` with mode 0644. An existing file is an error unless `overwrite`.
pub fn write_public_file<K: PublicKey>(
    path: &Path,
    key: &K,
    overwrite: bool,
) -> Result<(), KeyFileError> {
    let file = create_key_file(path, 0o644, overwrite)?;
    write_all(file, path, &format_public_key(key))
}

fn read_key_file(path: &Path, secret: bool) -> Result<Zeroizing<String>, KeyFileError> {
    let io_error = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = crate::open_regular_file(path).map_err(io_error)?;
    if secret {
        // Checked on the open file, so the file we read is the file we checked.
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    crate::read_text_at_most(file, MAX_FILE_LEN).map_err(|source| {
        if source.kind() == io::ErrorKind::FileTooLarge {
            KeyFileError::TooLong {
                path: path.to_owned(),
            }
        } else {
            io_error(source)
        }
    })
}

/// Whether `text` is a public key file's: a line (after any comments) with the public
/// header.
fn is_public_key_text(text: &str) -> bool {
    text.lines().any(|line| {
        line.trim_start()
            .starts_with(ferry_core::keys::PUBLIC_HEADER)
    })
}

/// Loads a secret key file of kind `K`, refusing files with any group or other permission bit.
pub fn load_secret_file<K: SecretKey>(path: &Path) -> Result<K, KeyFileError> {
    let text = match read_key_file(path, true) {
        Ok(text) => text,
        // A public key file (mode 0644, as it should be) where the secret key belongs: say
        // that, rather than `chmod 600` it.
        Err(insecure @ KeyFileError::InsecurePermissions { .. }) => {
            match read_key_file(path, false) {
                Ok(text) if is_public_key_text(&text) => text,
                _ => return Err(insecure),
            }
        }
        Err(e) => return Err(e),
    };
    parse_secret_key(&text).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Reads a secret text file (an API key, for example), refusing files with any group or
/// other permission bit, into memory that is erased when dropped.
pub fn load_secret_text(path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    read_key_file(path, true)
}

/// Loads a public key file of kind `K`.
pub fn load_public_file<K: PublicKey>(path: &Path) -> Result<K, KeyFileError> {
    let text = read_key_file(path, false)?;
    parse_public_key(&text).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// The public key file of `secret_path`: the same path with `.pub` added.
fn public_path(secret_path: &Path) -> PathBuf {
    let mut public = secret_path.as_os_str().to_owned();
    public.push(".pub");
    PathBuf::from(public)
}

/// Writes the public key of `key` (read from `secret_path`) to `secret_path` + `.pub`
/// (mode 0644) if no file is there: what an `init` that keeps an existing key does, so that a
/// key moved in without its public half gets it back. Returns the path when it wrote one.
pub fn write_missing_public_file<K: SecretKey>(
    secret_path: &Path,
    key: &K,
) -> Result<Option<PathBuf>, KeyFileError> {
    let public = public_path(secret_path);
    if std::fs::symlink_metadata(&public).is_ok() {
        return Ok(None);
    }
    write_public_file(&public, &key.public_key(), false)?;
    Ok(Some(public))
}

/// Writes `key` to `secret_path` (mode 0600) and its public key next to it, at
/// `secret_path` + `.pub` (mode 0644): what every `keygen` command does. Returns the public
/// key's path.
pub fn write_key_pair<K: SecretKey>(
    secret_path: &Path,
    key: &K,
    overwrite: bool,
) -> Result<PathBuf, KeyFileError> {
    let public = public_path(secret_path);
    // Both checked first, so that a refusal leaves no half of a pair behind.
    if !overwrite {
        for path in [secret_path, public.as_path()] {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(KeyFileError::AlreadyExists {
                    path: path.to_owned(),
                });
            }
        }
    }
    write_secret_file(secret_path, key, overwrite)?;
    write_public_file(&public, &key.public_key(), overwrite)?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use ferry_core::keys::{
        GatewayPublicKey, GatewaySigningKey, PeerPublicKey, PeerStaticKey, RelayPublicKey,
        RelayStaticKey,
    };
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
        // The file text holds every byte of the key, so equal texts mean equal keys.
        assert_eq!(*format_secret_key(&loaded), *format_secret_key(key));
        assert_eq!(
            format_public_key(&public),
            format_public_key(&key.public_key())
        );
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
            load_secret_file::<RelayStaticKey>(&dir.path("relay-x25519.key"))
                .unwrap()
                .public(),
            relay.public()
        );
        assert_eq!(
            load_public_file::<GatewayPublicKey>(&dir.path("gateway-ed25519.pub")).unwrap(),
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
        assert_eq!(
            load_public_file::<RelayPublicKey>(&public).unwrap(),
            key.public()
        );
        assert!(matches!(
            write_key_pair(&secret, &key, false),
            Err(KeyFileError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn a_pair_whose_public_file_exists_writes_nothing() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("pair-half");
        let key = PeerStaticKey::generate(&rng).unwrap();
        let secret = dir.path("peer.key");
        std::fs::write(dir.path("peer.key.pub"), "someone's\n").unwrap();
        let err = write_key_pair(&secret, &key, false).unwrap_err();
        assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err}");
        assert!(!secret.exists(), "no secret left behind");
    }

    #[test]
    fn a_key_is_never_written_through_a_symbolic_link() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("symlink");
        let target = dir.path("elsewhere");
        std::fs::write(&target, "precious\n").unwrap();
        let link = dir.path("peer.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let key = PeerStaticKey::generate(&rng).unwrap();
        for overwrite in [false, true] {
            let err = write_secret_file(&link, &key, overwrite).unwrap_err();
            assert!(
                matches!(
                    err,
                    KeyFileError::SymbolicLink { .. } | KeyFileError::AlreadyExists { .. }
                ),
                "{err}"
            );
        }
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        let err = write_secret_file(&link, &key, true).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_file_longer_than_any_key_file_is_refused_not_cut() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("long");
        let key = PeerStaticKey::generate(&rng).unwrap().public();
        let path = dir.path("peer.key.pub");
        let text = format!("{}{}", "# padding\n".repeat(2000), format_public_key(&key));
        std::fs::write(&path, text).unwrap();
        let err = load_public_file::<PeerPublicKey>(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::TooLong { .. }), "{err}");
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
        assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err}");
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_secret_file(&path, &second, true).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let loaded = load_secret_file::<PeerStaticKey>(&path).unwrap();
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
            let err = load_secret_file::<RelayStaticKey>(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, KeyFileError::InsecurePermissions { .. }));
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        std::fs::set_permissions(&path, Permissions::from_mode(0o400)).unwrap();
        load_secret_file::<RelayStaticKey>(&path).unwrap();
        // The public key file named where the secret one belongs: told so, not `chmod 600`.
        let public = write_key_pair(
            &dir.path("pair.key"),
            &RelayStaticKey::generate(&rng).unwrap(),
            false,
        )
        .unwrap();
        let msg = load_secret_file::<RelayStaticKey>(&public)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(ferry_core::keys::PUBLIC_HEADER) && !msg.contains("chmod"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_kind_and_header_are_refused() {
        let rng = SystemRandom::new();
        let dir = TempDir::new("kind");
        let path = dir.path("peer.key");
        write_secret_file(&path, &PeerStaticKey::generate(&rng).unwrap(), false).unwrap();
        let err = load_secret_file::<RelayStaticKey>(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyFileError::Key {
                    source: KeyError::WrongKind {
                        expected: "relay-x25519",
                        found: "peer-x25519",
                    },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("peer.key"));
        // A secret file is not a public key file, and vice versa.
        let err = load_public_file::<PeerPublicKey>(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyFileError::Key {
                    source: KeyError::WrongHeader { .. },
                    ..
                }
            ),
            "{err}"
        );
        let pub_path = dir.path("peer.pub");
        write_public_file(
            &pub_path,
            &PeerStaticKey::generate(&rng).unwrap().public(),
            false,
        )
        .unwrap();
        std::fs::set_permissions(&pub_path, Permissions::from_mode(0o600)).unwrap();
        let err = load_secret_file::<PeerStaticKey>(&pub_path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyFileError::Key {
                    source: KeyError::WrongHeader { .. },
                    ..
                }
            ),
            "{err}"
        );
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
                matches!(e, KeyError::Base64)
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
            let err = load_secret_file::<RelayStaticKey>(&path).unwrap_err();
            let KeyFileError::Key { source, .. } = &err else {
                panic!("{text:?}: {err:?}");
            };
            assert!(is_expected(source), "{text:?}: {err:?}");
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
        assert_eq!(
            load_secret_file::<RelayStaticKey>(&path).unwrap().public(),
            key.public()
        );
    }
}
