//! The local `known-peers` file for trust on first use (docs/protocol.md §9.1).
//!
//! One peer per line, `<name> <base64 key>`, where a name is `[A-Za-z0-9._@-]{1,64}` and the
//! key is a 32-byte X25519 public key in standard base64. Blank lines and lines starting with
//! `#` are ignored. [`KnownPeers::save`] writes a temporary file with mode 0600 and renames it
//! over the old one, so a crash never leaves a half-written file.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

/// The longest peer name.
pub const MAX_NAME_LEN: usize = 64;

const KEY_LEN: usize = 32;

/// What went wrong reading, writing or editing a known-peers file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KnownPeersError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file (or its temporary sibling) concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A line is not `<name> <base64 key>`.
    #[error("line {line}: {reason}")]
    BadLine {
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same name appears on two lines.
    #[error("line {line}: duplicate name {name:?}")]
    DuplicateName {
        /// The 1-based line number of the second occurrence.
        line: usize,
        /// The repeated name.
        name: String,
    },
    /// A name given to [`KnownPeers::insert`] is not `[A-Za-z0-9._@-]{1,64}`.
    #[error("invalid peer name {0:?}")]
    InvalidName(String),
}

/// Whether `name` is a valid peer name: `[A-Za-z0-9._@-]{1,64}`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// Peer names and the static keys first seen for them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KnownPeers {
    peers: BTreeMap<String, [u8; KEY_LEN]>,
}

impl fmt::Debug for KnownPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.peers.keys()).finish()
    }
}

impl KnownPeers {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the file at `path`; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, KnownPeersError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Self::new()),
            Err(source) => Err(KnownPeersError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses the file format; errors name the first bad line.
    pub fn parse(text: &str) -> Result<Self, KnownPeersError> {
        let mut peers = Self::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (name, key) =
                parse_line(content).map_err(|reason| KnownPeersError::BadLine { line, reason })?;
            if peers.peers.insert(name.to_owned(), key).is_some() {
                return Err(KnownPeersError::DuplicateName {
                    line,
                    name: name.to_owned(),
                });
            }
        }
        Ok(peers)
    }

    /// The file contents: a header comment, then one sorted line per peer.
    pub fn to_text(&self) -> String {
        let mut text = String::from("# Ferry known peers: <name> <base64 X25519 public key>\n");
        for (name, key) in &self.peers {
            text.push_str(name);
            text.push(' ');
            text.push_str(&STANDARD.encode(key));
            text.push('\n');
        }
        text
    }

    /// Writes the store to `path` atomically: a temporary file with mode 0600 in the same
    /// directory, synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<(), KnownPeersError> {
        let temp = temp_path(path);
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| KnownPeersError::Io { path, source }
        };
        write_private(&temp, self.to_text().as_bytes()).map_err(|source| {
            let _ = fs::remove_file(&temp);
            io_error(&temp)(source)
        })?;
        fs::rename(&temp, path).map_err(|source| {
            let _ = fs::remove_file(&temp);
            io_error(path)(source)
        })
    }

    /// The key recorded for `name`.
    pub fn get(&self, name: &str) -> Option<&[u8; KEY_LEN]> {
        self.peers.get(name)
    }

    /// Records `key` for `name`, returning the key it replaces.
    pub fn insert(
        &mut self,
        name: &str,
        key: [u8; KEY_LEN],
    ) -> Result<Option<[u8; KEY_LEN]>, KnownPeersError> {
        if !is_valid_name(name) {
            return Err(KnownPeersError::InvalidName(name.to_owned()));
        }
        Ok(self.peers.insert(name.to_owned(), key))
    }

    /// All entries, sorted by name.
    pub fn list(&self) -> impl Iterator<Item = (&str, &[u8; KEY_LEN])> {
        self.peers.iter().map(|(name, key)| (name.as_str(), key))
    }

    /// Forgets `name`; returns whether it was known.
    pub fn forget(&mut self, name: &str) -> bool {
        self.peers.remove(name).is_some()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

fn parse_line(content: &str) -> Result<(&str, [u8; KEY_LEN]), &'static str> {
    let mut fields = content.split_ascii_whitespace();
    let (Some(name), Some(key)) = (fields.next(), fields.next()) else {
        return Err("expected `<name> <base64 key>`");
    };
    if fields.next().is_some() {
        return Err("unexpected text after the key");
    }
    if !is_valid_name(name) {
        return Err("invalid name (allowed: A-Z a-z 0-9 . _ @ -, 1 to 64 characters)");
    }
    let bytes = STANDARD
        .decode(key)
        .map_err(|_| "key is not valid base64")?;
    let key = bytes.try_into().map_err(|_| "key is not 32 bytes")?;
    Ok((name, key))
}

/// `dir/.name.tmp`, next to `path` so that the rename stays on one file system.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_else(|| "known-peers".as_ref()));
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        // An old temporary file keeps its mode on open; make sure it is private.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-known-peers-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn names() {
        for good in ["a", "alice@example.org", "node-1.eu_west", &"x".repeat(64)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "a b", "é", "a/b", "a:b", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn load_save_forget_round_trip() {
        let dir = temp_dir("round-trip");
        let path = dir.join("known-peers");
        let mut peers = KnownPeers::load(&path).expect("missing file is empty");
        assert!(peers.is_empty());
        assert_eq!(peers.insert("bob", [2; 32]).expect("valid"), None);
        assert_eq!(peers.insert("alice", [1; 32]).expect("valid"), None);
        assert!(matches!(
            peers.insert("no spaces", [0; 32]),
            Err(KnownPeersError::InvalidName(_))
        ));
        peers.save(&path).expect("save");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!temp_path(&path).exists());

        let mut loaded = KnownPeers::load(&path).expect("load");
        assert_eq!(loaded, peers);
        let names: Vec<_> = loaded.list().map(|(name, _)| name).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(loaded.get("bob"), Some(&[2; 32]));

        assert!(loaded.forget("alice"));
        assert!(!loaded.forget("alice"));
        loaded.save(&path).expect("save again");
        let reloaded = KnownPeers::load(&path).expect("reload");
        assert_eq!(reloaded.len(), 1);
        assert_eq!(reloaded.get("alice"), None);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn parses_comments_and_blank_lines() {
        let key = STANDARD.encode([7u8; 32]);
        let text = format!("# comment\n\n   \nalice {key}\n  # indented comment\nbob\t{key}  \n");
        let peers = KnownPeers::parse(&text).expect("parse");
        assert_eq!(peers.len(), 2);
        assert_eq!(KnownPeers::parse(&peers.to_text()).expect("reparse"), peers);
    }

    #[test]
    fn bad_lines_name_their_line() {
        let key = STANDARD.encode([7u8; 32]);
        let short = STANDARD.encode([7u8; 31]);
        let cases = [
            (format!("alice {key}\nbob\n"), 2),
            (format!("# c\nal ice {key}\n"), 2),
            (format!("bad/name {key}\n"), 1),
            ("alice not*base64\n".to_owned(), 1),
            (format!("\n\n\nalice {short}\n"), 4),
            (format!("alice {key} extra\n"), 1),
        ];
        for (text, want) in cases {
            match KnownPeers::parse(&text) {
                Err(KnownPeersError::BadLine { line, .. }) => assert_eq!(line, want, "{text:?}"),
                other => panic!("{text:?}: unexpected {other:?}"),
            }
        }
        match KnownPeers::parse(&format!("alice {key}\nalice {key}\n")) {
            Err(KnownPeersError::DuplicateName { line: 2, name }) => assert_eq!(name, "alice"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unreadable_path_is_an_io_error() {
        let dir = temp_dir("io-error");
        // A directory cannot be read as a file.
        assert!(matches!(
            KnownPeers::load(&dir),
            Err(KnownPeersError::Io { .. })
        ));
        let missing_dir = dir.join("missing").join("known-peers");
        assert!(matches!(
            KnownPeers::new().save(&missing_dir),
            Err(KnownPeersError::Io { .. })
        ));
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
