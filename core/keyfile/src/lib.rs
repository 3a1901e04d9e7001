//! `ferry-keyfile`: the files behind Ferry's keys and trusted peers, on a Unix file system.
//!
//! `ferry-core` parses and formats key text and known-peers text but never touches the file
//! system (as rustls keeps PEM files out of its core); this crate is the IO around it, shared by
//! the relay, the gateway, the peer and the bench:
//!
//! - key files ([`load_secret_file`], [`load_public_file`], [`write_secret_file`],
//!   [`write_public_file`], [`write_key_pair`]): secret key files are created with mode 0600,
//!   and a secret key file that the group or others may access is refused with the `chmod`
//!   that fixes it. The format is described in [`ferry_core::keys`].
//! - the peer's known-peers file for trust on first use ([`load_known_peers`],
//!   [`save_known_peers`], [`update_known_peers`]): a missing file is an empty store, a file
//!   that group or others may write is refused, saving writes a fresh private temporary file
//!   (never through a symbolic link) and renames it over the old one, so a crash never leaves
//!   half a file, and an update holds a lock so that concurrent writers lose nothing. The
//!   format is described in [`ferry_core::known_peers`].
//! - [`open_regular_file`], how every Ferry program opens a file it reads (a key, a
//!   certificate, a config): anything but a regular file (a FIFO, a directory, a device, a
//!   socket) is refused at once with an error naming what it is, where a FIFO would otherwise
//!   block the open until something writes to it; [`read_text_file`] and
//!   [`read_text_at_most`] read such a file whole, up to a limit, into memory erased on drop.
#![forbid(unsafe_code)]

mod keys;
mod known_peers;
mod regular;

pub use keys::{
    KeyFileError, load_public_file, load_secret_file, load_secret_text, write_key_pair,
    write_missing_public_file, write_public_file, write_secret_file,
};
pub use known_peers::{
    KnownPeersFileError, load_known_peers, save_known_peers, update_known_peers,
};
pub use regular::{
    MAX_CONFIG_FILE, MAX_PEM_FILE, open_regular_file, read_text_at_most, read_text_file,
};
