//! Fuzzes the known-peers file as peers read and update it (`ferry_keyfile`:
//! `load_known_peers`, `update_known_peers`; `ferry_core::known_peers` parses the text).
//!
//! The input is split at its first NUL byte: the bytes before it are written as the file
//! (mode 0600), the bytes after it are edits (two bytes each: insert a fixed name with a key,
//! or forget a name, by the low bit). Nothing may panic, and:
//! - loading the file gives exactly what parsing its text gives, and refuses a file that is
//!   not UTF-8;
//! - every name loaded is valid, and every entry is a line of the file (`name key`);
//! - after the edits are applied with `update_known_peers`, loading gives the edited store,
//!   the file has mode 0600, and no temporary or stray file is left but the lock.
#![no_main]

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::OnceLock;

use base64::Engine as _;
use ferry_core::known_peers::{KnownPeers, is_valid_name};
use ferry_keyfile::{load_known_peers, update_known_peers};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = ["alice", "bob@example.org", "carol.phone", "x"];

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-fuzz-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fixture directory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let (file, edits) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let path = dir().join("known-peers");
    std::fs::write(&path, file).expect("writing the file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let loaded = load_known_peers(&path);
    let Ok(text) = std::str::from_utf8(file) else {
        assert!(loaded.is_err(), "a file that is not UTF-8 loaded");
        return;
    };
    let parsed = KnownPeers::parse(text);
    let mut peers = match (loaded, parsed) {
        (Ok(loaded), Ok(parsed)) => {
            assert_eq!(loaded, parsed);
            loaded
        }
        (Err(_), Err(_)) => return,
        (loaded, parsed) => panic!("load says {loaded:?}, parse says {parsed:?}"),
    };
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (name, key) in peers.list() {
        assert!(is_valid_name(name), "invalid name {name:?} loaded");
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().eq([name, b64.as_str()])),
            "{name} {b64} is not a line of the file"
        );
    }

    for edit in edits.chunks_exact(2) {
        let name = NAMES[usize::from(edit[0] >> 1) % NAMES.len()];
        if edit[0] & 1 == 0 {
            peers.insert(name, [edit[1]; 32]).expect("a valid name");
        } else {
            peers.forget(name);
        }
    }
    let want = peers.clone();
    update_known_peers(&path, |stored| {
        *stored = want.clone();
        (true, ())
    })
    .expect("updating the file");
    assert_eq!(
        load_known_peers(&path).expect("loading the saved file"),
        peers
    );
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "saved with mode {mode:o}");
    for entry in std::fs::read_dir(dir()).expect("listing the directory") {
        let name = entry.expect("entry").file_name();
        assert!(
            name == "known-peers" || name == ".known-peers.lock",
            "left behind: {name:?}"
        );
    }
});
