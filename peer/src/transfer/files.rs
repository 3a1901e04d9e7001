//! The transfer's files: a reader and a writer on blocking threads (each hashing what passes,
//! so the driver's thread only moves bytes), the receiver's partial file, and putting it in
//! place once its hash matched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom as _, SystemRandom};
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

/// The beginning of a staging file's name; a random part follows.
pub(crate) const STAGING_PREFIX: &str = ".ferry-partial-";

/// The receiver's file while it arrives: `.ferry-partial-RANDOM` in the target directory,
/// deleted on drop unless [`conclude`] put it in place. The name does not depend on the file's
/// name, so it always fits (a file name may be 255 bytes, the file system's limit), and a
/// staging file left behind by a `recv` that was killed never blocks a later transfer.
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
    /// Creates the partial file for `name`, `size` bytes long, in `dir`: refused when `name`
    /// already exists there or when the file system has less than `size` bytes free.
    pub(crate) fn create(dir: &Path, name: &str, size: u64) -> Result<(Self, File), TransferError> {
        let target = dir.join(name);
        if target.symlink_metadata().is_ok() {
            return Err(TransferError::FileExists { path: target });
        }
        let free = free_space(dir).map_err(|source| TransferError::Io {
            action: "checking the free space of",
            path: dir.to_owned(),
            source,
        })?;
        if let Some(free) = free
            && size > free
        {
            return Err(TransferError::NoSpace {
                dir: dir.to_owned(),
                name: name.to_owned(),
                size,
                free,
            });
        }
        let mut attempts = 0;
        loop {
            let path = dir.join(staging_name()?);
            // `create_new` is O_CREAT | O_EXCL: never an existing file, never through a link.
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    let partial = Self {
                        path,
                        target,
                        armed: true,
                    };
                    return Ok((partial, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                    attempts += 1;
                }
                Err(source) => {
                    return Err(TransferError::Io {
                        action: "creating",
                        path,
                        source,
                    });
                }
            }
        }
    }
}

/// A fresh staging file name: [`STAGING_PREFIX`] and 16 random hex digits.
fn staging_name() -> Result<String, TransferError> {
    let mut random = [0; 8];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| TransferError::Setup("the system's random generator failed".into()))?;
    Ok(format!("{STAGING_PREFIX}{}", hex(&random)))
}

/// The bytes an unprivileged user may still write to the file system holding `dir`; `None`
/// when the file system reports no size at all (some FUSE and network file systems), which
/// says nothing about its space.
fn free_space(dir: &Path) -> io::Result<Option<u64>> {
    let stat = rustix::fs::statvfs(dir)?;
    if stat.f_blocks == 0 {
        return Ok(None);
    }
    Ok(Some(stat.f_bavail.saturating_mul(stat.f_frsize)))
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with `RENAME_NOREPLACE`): an
/// `AlreadyExists` error then, and `to` untouched.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    Ok(renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE)?)
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
        let chunks = std::iter::from_fn(|| rx.blocking_recv());
        let (hash, _flushes) = write_chunks(&mut file, chunks, FLUSH_EVERY).map_err(io_error)?;
        Ok(hash)
    });
    (tx, task)
}

/// The receiver flushes what it has written to disk every this many bytes.
const FLUSH_EVERY: u64 = 64 << 20;

/// Writes `chunks` to `file`, hashing them, and returns the hash once everything is on disk,
/// with the number of flushes made on the way. Every `flush_every` bytes it waits for what it
/// wrote to reach the disk (`fdatasync`), so that the last flush, which the sender waits for
/// with its stall timeout running, never has more than that to write, however large the file
/// and however slow the disk; the waits on the way hold up the stream instead, through the
/// bounded queue and QUIC's flow control, while the connection stays alive.
fn write_chunks(
    file: &mut File,
    chunks: impl Iterator<Item = Bytes>,
    flush_every: u64,
) -> io::Result<([u8; HASH_LEN], u32)> {
    let mut hash = Context::new(&SHA256);
    let (mut unflushed, mut flushes) = (0u64, 0u32);
    for chunk in chunks {
        hash.update(&chunk);
        file.write_all(&chunk)?;
        unflushed += chunk.len() as u64;
        if unflushed >= flush_every {
            file.sync_data()?;
            (unflushed, flushes) = (0, flushes + 1);
        }
    }
    file.sync_all()?;
    Ok((digest(hash), flushes))
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
    let exists = || TransferError::FileExists {
        path: partial.target.clone(),
    };
    let failed = |source| TransferError::Io {
        action: "putting in place",
        path: partial.target.clone(),
        source,
    };
    match rename_no_replace(&partial.path, &partial.target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
        // A file system without RENAME_NOREPLACE (EINVAL): a hard link, which never replaces a
        // file either, then the staging name goes.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            match std::fs::hard_link(&partial.path, &partial.target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
                Err(e) => return Err(failed(e)),
            }
            let _ = std::fs::remove_file(&partial.path);
        }
        Err(e) => return Err(failed(e)),
    }
    partial.armed = false;
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

    /// The one staging file in `dir`.
    fn staging(dir: &Path) -> Vec<String> {
        entries(dir)
            .into_iter()
            .filter(|name| name.starts_with(STAGING_PREFIX))
            .collect()
    }

    #[test]
    fn the_writer_flushes_on_the_way_so_the_last_flush_is_short() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        let mut file = File::create(&path).expect("create");
        let chunks = (0..10u8).map(|i| Bytes::from(vec![i; 100]));
        let (hash, flushes) = write_chunks(&mut file, chunks, 250).expect("write");
        // After 300, 600 and 900 bytes; the last 100 are left to the final sync.
        assert_eq!(flushes, 3);
        let written = std::fs::read(&path).expect("read");
        let expected: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 100]).collect();
        assert_eq!(written, expected);
        let mut whole = Context::new(&SHA256);
        whole.update(&expected);
        assert_eq!(hash, digest(whole));
    }

    #[test]
    fn a_matching_hash_puts_the_file_in_place_and_a_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (partial, mut file) = PartialFile::create(dir.path(), "good", 7).expect("create");
        file.write_all(b"content").expect("write");
        assert_eq!(entries(dir.path()), staging(dir.path()));
        assert_eq!(staging(dir.path()).len(), 1);
        let placed = conclude(partial, &[1; HASH_LEN], &[1; HASH_LEN]).expect("matches");
        assert_eq!(placed, dir.path().join("good"));
        assert_eq!(std::fs::read(&placed).expect("read"), b"content");
        assert_eq!(entries(dir.path()), vec!["good"]);

        let (partial, _file) = PartialFile::create(dir.path(), "bad", 0).expect("create");
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
            PartialFile::create(dir.path(), "taken", 1),
            Err(TransferError::FileExists { .. })
        ));
        // A file that appears while the transfer runs is not replaced either.
        let (partial, _file) = PartialFile::create(dir.path(), "late", 0).expect("create");
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

    #[test]
    fn the_longest_name_is_staged_and_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = "n".repeat(255);
        let (partial, _file) = PartialFile::create(dir.path(), &name, 0).expect("create");
        assert!(partial.path.file_name().expect("name").len() < 40);
        conclude(partial, &[0; HASH_LEN], &[0; HASH_LEN]).expect("in place");
        assert_eq!(entries(dir.path()), vec![name]);
    }

    #[test]
    fn leftovers_of_earlier_runs_block_nothing_and_stay_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What an older ferry-peer left, and a staging file of a run that was killed.
        std::fs::write(dir.path().join(".f.ferry-partial"), b"old").expect("write");
        let (killed, _file) = PartialFile::create(dir.path(), "f", 0).expect("create");
        let leftover = killed.path.clone();
        std::mem::forget(killed);
        let (partial, _file) = PartialFile::create(dir.path(), "f", 0).expect("create again");
        assert_ne!(partial.path, leftover);
        conclude(partial, &[0; HASH_LEN], &[0; HASH_LEN]).expect("in place");
        assert_eq!(std::fs::read(&leftover).expect("leftover kept"), b"");
        assert_eq!(entries(dir.path()).len(), 3);
    }

    #[test]
    fn a_file_larger_than_the_free_space_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = PartialFile::create(dir.path(), "huge", u64::MAX).expect_err("refused");
        assert!(
            matches!(&err, TransferError::NoSpace { size: u64::MAX, .. }),
            "{err:?}"
        );
        assert!(entries(dir.path()).is_empty());
    }
}
