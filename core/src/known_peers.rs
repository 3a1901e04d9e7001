//! The local `known-peers` file for trust on first use (docs/protocol.md §9.1).
//!
//! One peer per line, `<name> <base64 key>`, where a name is `[A-Za-z0-9._@-]{1,64}` and the
//! key is a 32-byte X25519 public key in standard base64. Blank lines and lines starting with
//! `#` are ignored. This module parses ([`KnownPeers::parse`]) and formats
//! ([`KnownPeers::to_text`]) that text; the `ferry-keyfile` crate reads and writes the file.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

/// The longest peer name.
pub const MAX_NAME_LEN: usize = 64;

const KEY_LEN: usize = 32;

/// What is wrong with the text of a known-peers file, or with an edit.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KnownPeersError {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
