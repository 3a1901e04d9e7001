//! The known-peers file: text parsed and formatted by [`ferry_core::known_peers`], read and
//! written here.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ferry_core::known_peers::{KnownPeers, KnownPeersError};

/// What went wrong reading or writing a known-peers file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KnownPeersFileError {
    /// The file could not be read or written (the file system is to blame).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (or its temporary sibling) concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file was read but a line of it is invalid (whoever edited it is to blame).
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The first bad line and what is wrong with it.
        #[source]
        source: KnownPeersError,
    },
}

/// Reads the known-peers file at `path`; a missing file is an empty store.
pub fn load_known_peers(path: &Path) -> Result<KnownPeers, KnownPeersFileError> {
    match fs::read_to_string(path) {
        Ok(text) => KnownPeers::parse(&text).map_err(|source| KnownPeersFileError::Parse {
            path: path.to_owned(),
            source,
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(KnownPeers::new()),
        Err(source) => Err(KnownPeersFileError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `peers` to `path` atomically: a temporary file with mode 0600 in the same directory,
/// synced, then renamed over `path`.
pub fn save_known_peers(path: &Path, peers: &KnownPeers) -> Result<(), KnownPeersFileError> {
    let temp = temp_path(path);
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| KnownPeersFileError::Io { path, source }
    };
    write_private(&temp, peers.to_text().as_bytes()).map_err(|source| {
        let _ = fs::remove_file(&temp);
        io_error(&temp)(source)
    })?;
    fs::rename(&temp, path).map_err(|source| {
        let _ = fs::remove_file(&temp);
        io_error(path)(source)
    })
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
    fn load_save_forget_round_trip() {
        let dir = temp_dir("round-trip");
        let path = dir.join("known-peers");
        let mut peers = load_known_peers(&path).expect("missing file is empty");
        assert!(peers.is_empty());
        assert_eq!(peers.insert("bob", [2; 32]).expect("valid"), None);
        assert_eq!(peers.insert("alice", [1; 32]).expect("valid"), None);
        assert!(matches!(
            peers.insert("no spaces", [0; 32]),
            Err(KnownPeersError::InvalidName(_))
        ));
        save_known_peers(&path, &peers).expect("save");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!temp_path(&path).exists());

        let mut loaded = load_known_peers(&path).expect("load");
        assert_eq!(loaded, peers);
        let names: Vec<_> = loaded.list().map(|(name, _)| name).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(loaded.get("bob"), Some(&[2; 32]));

        assert!(loaded.forget("alice"));
        assert!(!loaded.forget("alice"));
        save_known_peers(&path, &loaded).expect("save again");
        let reloaded = load_known_peers(&path).expect("reload");
        assert_eq!(reloaded.len(), 1);
        assert_eq!(reloaded.get("alice"), None);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn unreadable_path_is_an_io_error() {
        let dir = temp_dir("io-error");
        // A directory cannot be read as a file.
        assert!(matches!(
            load_known_peers(&dir),
            Err(KnownPeersFileError::Io { .. })
        ));
        let missing_dir = dir.join("missing").join("known-peers");
        assert!(matches!(
            save_known_peers(&missing_dir, &KnownPeers::new()),
            Err(KnownPeersFileError::Io { .. })
        ));
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_bad_line_is_reported_with_the_file_and_the_line() {
        let dir = temp_dir("bad-line");
        let path = dir.join("known-peers");
        fs::write(&path, "# comment\nbob not-base64\n").expect("write");
        let err = load_known_peers(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KnownPeersFileError::Parse {
                    source: KnownPeersError::BadLine { line: 2, .. },
                    ..
                }
            ),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("line 2"), "{message}");
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
