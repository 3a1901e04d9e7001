//! Opening a file that must be a regular file (a key, a certificate, a config), without ever
//! blocking on one that is not.
//!
//! `open(2)` of a FIFO for reading waits until something opens it for writing, so a key path
//! that names a FIFO would hang `check-config`, a start, or a reload forever; a directory, a
//! device (`/dev/zero` behind a symbolic link) or a socket is no key either, and deserves an
//! error that says so rather than one about its contents or its permission bits.

use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

use zeroize::Zeroizing;

/// Opens `path` for reading if it is a regular file once symbolic links are followed.
/// Anything else is refused with [`io::ErrorKind::InvalidInput`] and a message naming what it
/// is ("is a FIFO (named pipe), not a regular file"), without blocking: the file is opened with
/// `O_NONBLOCK`, which changes nothing for a regular file, and its type is checked on the open
/// file, so the file read is the file checked.
pub fn open_regular_file(path: &Path) -> io::Result<File> {
    // A socket cannot be opened at all (ENXIO); say what it is instead.
    if let Ok(meta) = std::fs::metadata(path)
        && meta.file_type().is_socket()
    {
        return Err(not_regular(meta.file_type()));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    match kind.is_file() {
        true => Ok(file),
        false => Err(not_regular(kind)),
    }
}

/// Reads the regular file at `path` ([`open_regular_file`]) to its end as UTF-8 text, as
/// [`read_text_at_most`] does.
pub fn read_text_file(path: &Path, max: u64) -> io::Result<Zeroizing<String>> {
    read_text_at_most(open_regular_file(path)?, max)
}

/// The longest config file Ferry reads (the relay's, the gateway's and its key list, the
/// bench's testbed file): a relay deny list of 16,384 prefixes is under 1 MiB.
pub const MAX_CONFIG_FILE: u64 = 16 << 20;

/// The longest PEM file Ferry reads (a certificate chain, a key, a CA bundle): a system bundle
/// of every public root is about 220 KiB.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// The most bytes reserved before a read: a secret file no longer than this (a key, a grant,
/// an API key) is read into one buffer that never grows, so no copy of it is left behind in
/// freed memory, which the final zeroize could not reach.
const RESERVED: u64 = 64 << 10;

/// Reads `file` to its end as UTF-8 text into memory that is erased when dropped. A file of
/// more than `max` bytes is refused with [`io::ErrorKind::FileTooLarge`] ("is longer than
/// `max` bytes") after reading at most one byte past `max`, so `/dev/zero` behind a check that
/// missed it, or a file that keeps growing, cannot fill the memory.
pub fn read_text_at_most(file: File, max: u64) -> io::Result<Zeroizing<String>> {
    let reserve = usize::try_from(max.min(RESERVED) + 1).unwrap_or(usize::MAX);
    let mut text = Zeroizing::new(String::with_capacity(reserve));
    file.take(max.saturating_add(1)).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("is longer than {max} bytes"),
        ));
    }
    Ok(text)
}

fn not_regular(kind: FileType) -> io::Error {
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ferry-regular-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn refusal(path: &Path) -> String {
        let e = open_regular_file(path).expect_err("must be refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        e.to_string()
    }

    #[test]
    fn a_regular_file_and_a_link_to_one_open() {
        let dir = temp_dir("file");
        let file = dir.join("key");
        std::fs::write(&file, "text").expect("write");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        for path in [&file, &link] {
            let mut text = String::new();
            open_regular_file(path)
                .expect("open")
                .read_to_string(&mut text)
                .expect("read");
            assert_eq!(text, "text");
        }
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer() {
        let dir = temp_dir("fifo");
        let fifo = dir.join("key");
        // mkfifo(1) keeps this crate free of unsafe code.
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success(), "mkfifo {}", fifo.display());
        // With a blocking open this test would hang; the harness's timeout would be the failure.
        assert!(refusal(&fifo).contains("FIFO"));
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_directory_a_device_and_a_socket_are_named_as_such() {
        let dir = temp_dir("other");
        assert!(refusal(&dir).contains("is a directory"));
        let zero = dir.join("zero.key");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        assert!(refusal(&zero).contains("character device"));
        let socket = dir.join("socket.key");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        assert!(refusal(&socket).contains("socket"));
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_file_is_read_whole_up_to_its_limit_and_refused_past_it() {
        let dir = temp_dir("limit");
        let file = dir.join("config");
        std::fs::write(&file, "0123456789").expect("write");
        assert_eq!(
            read_text_file(&file, 10).expect("at the limit").as_str(),
            "0123456789"
        );
        let e = read_text_file(&file, 9).expect_err("one byte over");
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
        assert_eq!(e.to_string(), "is longer than 9 bytes");
        // Past the reserved buffer the text still arrives whole.
        let long = "x".repeat(RESERVED as usize * 3);
        std::fs::write(&file, &long).expect("write");
        assert_eq!(read_text_file(&file, 1 << 20).expect("long").as_str(), long);
        // An endless file stops one byte past the limit.
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        let e = read_text_at_most(File::open(&zero).expect("open"), 1000).expect_err("endless");
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
        std::fs::write(&file, [0xff, 0xfe]).expect("write");
        let e = read_text_file(&file, 100).expect_err("not UTF-8");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_missing_file_keeps_its_own_error() {
        let dir = temp_dir("missing");
        let e = open_regular_file(&dir.join("absent")).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
