//! The transfer's files: a reader and a writer on blocking threads (each hashing what passes,
//! so the driver's thread only moves bytes), the receiver's partial file, and putting it in
//! place once its hash matched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ring::digest::{Context, SHA256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::TransferError;
use super::wire::HASH_LEN;

/// The size of a chunk the reader hands over.
pub(crate) const CHUNK: usize = 256 * 1024;
/// How many chunks may wait between a file thread and the driver, each way.
pub(crate) const CHUNKS_QUEUED: usize = 4;

/// What the reader hands the sender's driver.
#[derive(Debug)]
pub(crate) enum ReadChunk {
    /// The next bytes of the file.
    Data(Bytes),
    /// The whole file was read; its SHA-256.
    Done([u8; HASH_LEN]),
    /// Reading failed; the error says why.
    Failed(TransferError),
}

/// Reads exactly `size` bytes of `file` on a blocking thread, in [`CHUNK`]s, then its hash.
/// A file that ends early or grows while it is read is an error: the header has promised the
/// receiver `size` bytes.
pub(crate) fn spawn_reader(mut file: File, path: PathBuf, size: u64) -> mpsc::Receiver<ReadChunk> {
    let (tx, rx) = mpsc::channel(CHUNKS_QUEUED);
    tokio::task::spawn_blocking(move || {
        let mut hash = Context::new(&SHA256);
        let mut left = size;
        let io_error = |source| TransferError::Io {
            action: "reading",
            path: path.clone(),
            source,
        };
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            let mut buf = vec![0; want];
            let got = match read_full(&mut file, &mut buf) {
                Ok(got) => got,
                Err(e) => {
                    let _ = tx.blocking_send(ReadChunk::Failed(io_error(e)));
                    return;
                }
            };
            if got < want {
                let message = format!("the file shrank while it was sent, {left} bytes short");
                let _ = tx.blocking_send(ReadChunk::Failed(io_error(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    message,
                ))));
                return;
            }
            hash.update(&buf);
            left -= got as u64;
            if tx.blocking_send(ReadChunk::Data(Bytes::from(buf))).is_err() {
                return;
            }
        }
        let mut probe = [0; 1];
        let last = match file.read(&mut probe) {
            Ok(0) => ReadChunk::Done(digest(hash)),
            Ok(_) => ReadChunk::Failed(io_error(io::Error::other(
                "the file grew while it was sent",
            ))),
            Err(e) => ReadChunk::Failed(io_error(e)),
        };
        let _ = tx.blocking_send(last);
    });
    rx
}

/// Fills `buf` unless the file ends first; returns how much it read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The finished SHA-256.
fn digest(hash: Context) -> [u8; HASH_LEN] {
    let mut out = [0; HASH_LEN];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

/// The receiver's file while it arrives: `.NAME.ferry-partial` in the target directory,
/// deleted on drop unless [`conclude`] put it in place.
#[derive(Debug)]
pub(crate) struct PartialFile {
    /// The partial file's path.
    pub(crate) path: PathBuf,
    /// Where the file goes once complete.
    pub(crate) target: PathBuf,
    /// False once the partial file is gone (moved into place or deleted).
    armed: bool,
}

impl PartialFile {
    /// Creates the partial file for `name` in `dir`, refusing when `name` already exists there.
    /// A partial file left by an earlier run is refused too, rather than overwritten: it may be
    /// something else of the same name.
    pub(crate) fn create(dir: &Path, name: &str) -> Result<(Self, File), TransferError> {
        let target = dir.join(name);
        if target.symlink_metadata().is_ok() {
            return Err(TransferError::FileExists { path: target });
        }
        let path = dir.join(format!(".{name}.ferry-partial"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| TransferError::Io {
                action: "creating",
                path: path.clone(),
                source,
            })?;
        Ok((
            Self {
                path,
                target,
                armed: true,
            },
            file,
        ))
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the chunks it is sent to `file` on a blocking thread, hashing them; when the sender
/// side of the channel is dropped, syncs the file to disk and returns the content's SHA-256.
pub(crate) fn spawn_writer(
    mut file: File,
    path: PathBuf,
) -> (
    mpsc::Sender<Bytes>,
    JoinHandle<Result<[u8; HASH_LEN], TransferError>>,
) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHUNKS_QUEUED);
    let task = tokio::task::spawn_blocking(move || {
        let io_error = |source| TransferError::Io {
            action: "writing",
            path: path.clone(),
            source,
        };
        let mut hash = Context::new(&SHA256);
        while let Some(chunk) = rx.blocking_recv() {
            hash.update(&chunk);
            file.write_all(&chunk).map_err(io_error)?;
        }
        file.sync_all().map_err(io_error)?;
        Ok(digest(hash))
    });
    (tx, task)
}

/// The receiver's decision once the content is written and synced: on a matching hash the
/// partial file becomes the target (never replacing a file that appeared meanwhile), otherwise
/// it is deleted and the mismatch reported.
pub(crate) fn conclude(
    mut partial: PartialFile,
    sent: &[u8; HASH_LEN],
    computed: &[u8; HASH_LEN],
) -> Result<PathBuf, TransferError> {
    if sent != computed {
        return Err(TransferError::HashMismatch {
            sent: hex(sent),
            computed: hex(computed),
        });
    }
    // A hard link fails if the target exists, which a rename would silently replace.
    match std::fs::hard_link(&partial.path, &partial.target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(TransferError::FileExists {
                path: partial.target.clone(),
            });
        }
        Err(_) => {
            // A file system without hard links: check, then rename.
            if partial.target.symlink_metadata().is_ok() {
                return Err(TransferError::FileExists {
                    path: partial.target.clone(),
                });
            }
            std::fs::rename(&partial.path, &partial.target).map_err(|source| {
                TransferError::Io {
                    action: "renaming into place",
                    path: partial.target.clone(),
                    source,
                }
            })?;
            partial.armed = false;
            return Ok(partial.target.clone());
        }
    }
    partial.armed = false;
    let _ = std::fs::remove_file(&partial.path);
    Ok(partial.target.clone())
}

/// Lower-case hex of a hash.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::tests::entries;

    #[test]
    fn a_matching_hash_puts_the_file_in_place_and_a_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (partial, mut file) = PartialFile::create(dir.path(), "good").expect("create");
        file.write_all(b"content").expect("write");
        assert_eq!(entries(dir.path()), vec![".good.ferry-partial"]);
        let placed = conclude(partial, &[1; HASH_LEN], &[1; HASH_LEN]).expect("matches");
        assert_eq!(placed, dir.path().join("good"));
        assert_eq!(std::fs::read(&placed).expect("read"), b"content");
        assert_eq!(entries(dir.path()), vec!["good"]);

        let (partial, _file) = PartialFile::create(dir.path(), "bad").expect("create");
        let err = conclude(partial, &[1; HASH_LEN], &[2; HASH_LEN]).expect_err("mismatch");
        assert!(
            matches!(&err, TransferError::HashMismatch { sent, computed }
                if sent == &"01".repeat(32) && computed == &"02".repeat(32)),
            "{err}"
        );
        assert_eq!(entries(dir.path()), vec!["good"]);
    }

    #[test]
    fn an_existing_file_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("taken"), b"mine").expect("write");
        assert!(matches!(
            PartialFile::create(dir.path(), "taken"),
            Err(TransferError::FileExists { .. })
        ));
        // A file that appears while the transfer runs is not replaced either.
        let (partial, _file) = PartialFile::create(dir.path(), "late").expect("create");
        std::fs::write(dir.path().join("late"), b"theirs").expect("write");
        assert!(matches!(
            conclude(partial, &[0; HASH_LEN], &[0; HASH_LEN]),
            Err(TransferError::FileExists { .. })
        ));
        assert_eq!(
            std::fs::read(dir.path().join("late")).expect("read"),
            b"theirs"
        );
        assert_eq!(entries(dir.path()), vec!["late", "taken"]);
    }
}
