//! What the config targets share: a directory holding every file the example configs name
//! (by relative name), and the rule that keeps a fuzzed config inside it.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::OnceLock;

use ferry_core::keys::{GatewaySigningKey, RelayStaticKey, format_public_key, format_secret_key};

/// Writes `text` to `name` in `dir` with `mode`.
fn write(dir: &std::path::Path, name: &str, text: &str, mode: u32) {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .expect("fixture file");
    file.write_all(text.as_bytes()).expect("fixture file");
}

/// The fixture directory (made once per process): `relay.key` (+ `.pub`), `gateway-1.key`
/// (+ `.pub`), `gateway-tls.crt`/`.key`, `ca.pem`, `api-key`, `password`, and
/// `api-keys.toml`.
pub fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fixture directory");
        let relay = RelayStaticKey::from_bytes(&[7; 32]);
        write(&dir, "relay.key", &format_secret_key(&relay), 0o600);
        write(
            &dir,
            "relay.key.pub",
            &format_public_key(&relay.public()),
            0o644,
        );
        let gateway = GatewaySigningKey::from_seed_bytes(&[9; 32]).expect("fixed seed");
        write(&dir, "gateway-1.key", &format_secret_key(&gateway), 0o600);
        write(
            &dir,
            "gateway-1.key.pub",
            &format_public_key(&gateway.public()),
            0o644,
        );
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        write(&dir, "gateway-tls.crt", &cert.cert.pem(), 0o644);
        write(
            &dir,
            "gateway-tls.key",
            &cert.signing_key.serialize_pem(),
            0o600,
        );
        write(&dir, "ca.pem", &cert.cert.pem(), 0o644);
        write(
            &dir,
            "api-key",
            "fk_heartbeat.c2VjcmV0c2VjcmV0c2VjcmV0\n",
            0o600,
        );
        write(&dir, "password", "hunter2\n", 0o600);
        write(&dir, "api-keys.toml", "api_keys = []\n", 0o600);
        dir
    })
}

/// The longest word of each secret file in [`dir`]: no error message may contain one.
pub fn secrets() -> &'static [String] {
    static SECRETS: OnceLock<Vec<String>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        [
            "relay.key",
            "gateway-1.key",
            "gateway-tls.key",
            "api-key",
            "password",
        ]
        .iter()
        .filter_map(|name| {
            let text = std::fs::read_to_string(dir().join(name)).expect("fixture file");
            text.split_whitespace()
                .filter(|w| !w.starts_with('#') && !w.starts_with("-----"))
                .max_by_key(|w| w.len())
                .map(str::to_owned)
        })
        .collect()
    })
}

/// Panics if `message` contains a secret of the fixture directory that the config `text`
/// itself does not (a parse error may quote the config, never a file it names).
pub fn assert_no_secret(message: &str, text: &str) {
    for secret in secrets() {
        if !text.contains(secret.as_str()) {
            assert!(
                !message.contains(secret.as_str()),
                "a secret in {message:?}"
            );
        }
    }
}

/// Whether every string in the TOML `text` stays inside the fixture directory when taken as
/// a path (not absolute, no `..`), so that a fuzzed config never makes the parser read other
/// files of the host (`/dev/zero`, a FIFO). Texts that are not TOML pass: the parser refuses
/// them before it reads a file.
pub fn stays_inside(text: &str) -> bool {
    fn inside(value: &toml::Value) -> bool {
        match value {
            toml::Value::String(s) => !s.starts_with('/') && !s.contains(".."),
            toml::Value::Array(items) => items.iter().all(inside),
            toml::Value::Table(table) => table.values().all(inside),
            _ => true,
        }
    }
    match text.parse::<toml::Table>() {
        Ok(table) => table.values().all(inside),
        Err(_) => true,
    }
}
