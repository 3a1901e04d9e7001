//! The known-peers file: text parsed and formatted by [`ferry_core::known_peers`], read and
//! written here.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
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
    /// Someone other than its owner may write the file, and so could have changed whom this
    /// peer trusts: it is not used.
    #[error(
        "{}: writable by group or others (mode {mode:04o}), so anyone could change whom this \
         peer trusts; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is longer than any known-peers file this peer writes.
    #[error("{}: longer than {MAX_FILE_LEN} bytes; not a known-peers file", path.display())]
    TooLong {
        /// The file.
        path: PathBuf,
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

/// The longest known-peers file read: a million peers' lines would not reach it.
const MAX_FILE_LEN: u64 = 64 << 20;

/// Reads the known-peers file at `path`; a missing file is an empty store. A file that group
/// or others may write is refused ([`KnownPeersFileError::InsecurePermissions`]): it decides
/// whom this peer trusts. A symbolic link is followed (the owner may keep the file elsewhere),
/// and the check is made on the file opened.
pub fn load_known_peers(path: &Path) -> Result<KnownPeers, KnownPeersFileError> {
    let io_error = |source| KnownPeersFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match crate::open_regular_file(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(KnownPeers::new()),
        Err(source) => return Err(io_error(source)),
    };
    let meta = file.metadata().map_err(io_error)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(KnownPeersFileError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = crate::read_text_at_most(file, MAX_FILE_LEN).map_err(|source| {
        if source.kind() == io::ErrorKind::FileTooLarge {
            KnownPeersFileError::TooLong {
                path: path.to_owned(),
            }
        } else {
            io_error(source)
        }
    })?;
    KnownPeers::parse(&text).map_err(|source| KnownPeersFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Loads the known-peers file at `path`, lets `change` modify it, and saves it, holding an
/// exclusive lock (on `dir/.name.lock`) throughout, so that two processes updating the file at
/// once cannot lose each other's changes. Returns what `change` returns; nothing is written
/// when it returns `false` as its first value. A `path` that is a symbolic link is resolved
/// first, so the file the owner keeps elsewhere is the one updated (rather than the link
/// replaced by a copy). The file is written anew: comment lines are not kept.
pub fn update_known_peers<R>(
    path: &Path,
    change: impl FnOnce(&mut KnownPeers) -> (bool, R),
) -> Result<R, KnownPeersFileError> {
    let resolved;
    let path = match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            resolved = fs::canonicalize(path).map_err(|source| KnownPeersFileError::Io {
                path: path.to_owned(),
                source,
            })?;
            resolved.as_path()
        }
        _ => path,
    };
    let lock_path = sibling(path, ".lock");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|source| KnownPeersFileError::Io {
            path: lock_path.clone(),
            source,
        })?;
    lock.lock().map_err(|source| KnownPeersFileError::Io {
        path: lock_path.clone(),
        source,
    })?;
    let mut peers = load_known_peers(path)?;
    let (changed, result) = change(&mut peers);
    if changed {
        save_known_peers(path, &peers)?;
    }
    // Dropping the file releases the lock.
    drop(lock);
    Ok(result)
}

/// Writes `peers` to `path` atomically: a fresh temporary file with mode 0600 in the same
/// directory (created exclusively, never through a symbolic link), synced, then renamed over
/// `path`. Use [`update_known_peers`] when other processes may write the file too.
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
    sibling(path, ".tmp")
}

/// `dir/.name<suffix>`, next to `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_else(|| "known-peers".as_ref()));
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `contents` to a new file at `path`, mode 0600. A file left there by an interrupted
/// save (or anything planted there, a symbolic link included) is removed first; the new one is
/// created with `O_EXCL`, which never follows a link.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The umask may have taken bits off, never added them; this makes the mode exact.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
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
    fn an_update_through_a_symbolic_link_updates_the_file_it_points_at() {
        let dir = temp_dir("symlink");
        let real = dir.join("elsewhere");
        let mut peers = KnownPeers::new();
        peers.insert("alice", [1; 32]).expect("valid");
        save_known_peers(&real, &peers).expect("save");
        let link = dir.join("known-peers");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let forgot = update_known_peers(&link, |known| {
            let forgot = known.forget("alice");
            (forgot, forgot)
        })
        .expect("update");
        assert!(forgot);
        assert!(
            fs::symlink_metadata(&link)
                .expect("stat")
                .file_type()
                .is_symlink(),
            "the link stays a link"
        );
        assert_eq!(load_known_peers(&real).expect("load").get("alice"), None);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn a_file_others_may_write_is_refused_and_a_planted_temp_file_is_replaced() {
        let dir = temp_dir("modes");
        let path = dir.join("known-peers");
        let mut peers = KnownPeers::new();
        peers.insert("bob", [2; 32]).expect("valid");
        save_known_peers(&path, &peers).expect("save");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).expect("chmod");
        let err = load_known_peers(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KnownPeersFileError::InsecurePermissions { mode: 0o620, .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Readable by others is fine: the keys in it are public.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(load_known_peers(&path).expect("load"), peers);
        // A symbolic link planted where the temporary file goes is removed, not written
        // through.
        let target = dir.join("elsewhere");
        fs::write(&target, "untouched").expect("write");
        std::os::unix::fs::symlink(&target, temp_path(&path)).expect("symlink");
        save_known_peers(&path, &peers).expect("save");
        assert_eq!(fs::read_to_string(&target).expect("read"), "untouched");
        assert_eq!(load_known_peers(&path).expect("load"), peers);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let dir = temp_dir("concurrent");
        let path = dir.join("known-peers");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..25u8 {
                        update_known_peers(path, |peers| {
                            let name = format!("peer-{t}-{i}");
                            peers.insert(&name, [t; 32]).expect("valid");
                            (true, ())
                        })
                        .expect("update");
                    }
                });
            }
        });
        assert_eq!(load_known_peers(&path).expect("load").len(), 100);
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
