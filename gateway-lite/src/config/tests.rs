use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

use ferry_core::keys::RelayStaticKey;
use ring::rand::SystemRandom;

use super::*;

/// A temporary directory with a signing key, a TLS certificate and key, a client CA and a
/// relay key, removed on drop.
struct Dir(PathBuf);

fn write_file(path: &Path, text: &str, mode: u32) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Dir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "ferry-gw-config-{}-{nanos}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let rng = SystemRandom::new();
        for file in ["gateway-1.key", "gateway-2.key"] {
            let key = GatewaySigningKey::generate(&rng).unwrap();
            ferry_keyfile::write_secret_file(&dir.join(file), &key, false).unwrap();
        }
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        write_file(&dir.join("tls.crt"), &cert.cert.pem(), 0o644);
        write_file(
            &dir.join("tls.key"),
            &cert.signing_key.serialize_pem(),
            0o600,
        );
        let ca = rcgen::generate_simple_self_signed(vec!["clients".to_string()]).unwrap();
        write_file(&dir.join("ca.crt"), &ca.cert.pem(), 0o644);
        Self(dir)
    }

    fn parse(&self, text: &str) -> Result<GatewayConfig, ConfigError> {
        parse_str(text, &self.0.join("gateway.toml"), &self.0)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hash() -> String {
    apikey::generate(&SystemRandom::new(), "x")
        .unwrap()
        .hash
        .to_string()
}

fn relay_key() -> String {
    RelayStaticKey::generate(&SystemRandom::new())
        .unwrap()
        .public()
        .to_string()
}

fn minimal() -> String {
    "[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n\n[signing]\nactive_kid = 1\n\n\
     [[signing.keys]]\nkid = 1\nkey_file = \"gateway-1.key\"\n"
        .to_string()
}

fn problems(result: Result<GatewayConfig, ConfigError>) -> Vec<Problem> {
    match result {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected validation problems, got {other:?}"),
    }
}

fn fields(result: Result<GatewayConfig, ConfigError>) -> Vec<String> {
    problems(result).into_iter().map(|p| p.field).collect()
}

/// The shipped example file with its paths pointed at `dir`'s files (what `ferry-gateway init`
/// makes, and the relay's public key file `ferry-relay init` makes, written here).
fn example_in(dir: &Dir) -> (String, RelayPublicKey) {
    let relay = RelayStaticKey::generate(&SystemRandom::new())
        .unwrap()
        .public();
    let path = dir.0.join("relay.key.pub");
    let _ = std::fs::remove_file(&path);
    ferry_keyfile::write_public_file(&path, &relay, false).unwrap();
    let text = include_str!("../../gateway.example.toml")
        .replace("/var/lib/ferry/gateway-tls.", "tls.")
        .replace("/var/lib/ferry/", "");
    (text, relay)
}

#[test]
fn a_minimal_file_gets_safe_defaults() {
    let dir = Dir::new("minimal");
    let cfg = dir.parse(&minimal()).unwrap();
    assert!(matches!(cfg.server.transport, Transport::Tls(_)));
    assert!(!cfg.server.client_auth);
    assert_eq!(cfg.server.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(cfg.signing.active.kid(), 1);
    assert_eq!(cfg.signing.published.len(), 1);
    assert_eq!(cfg.sessions.token_lifetime_secs, 300);
    assert_eq!(cfg.sessions.max_session_age_secs, 86_400);
    assert!(cfg.admin.listen.ip().is_loopback());
    assert!(cfg.admin.token_hash.is_none());
    assert!(matches!(cfg.state, StateBackend::Memory { .. }));
    assert!(cfg.api_keys.is_empty() && cfg.relays.is_empty());
}

#[test]
fn the_example_file_is_valid_and_means_the_defaults() {
    let dir = Dir::new("example");
    let (text, relay) = example_in(&dir);
    let cfg = dir.parse(&text).unwrap();
    // No mTLS unless asked for; no API key until the operator adds one; the relay next door.
    assert!(!cfg.server.client_auth);
    assert!(cfg.api_keys.is_empty());
    assert_eq!(cfg.relays.len(), 1);
    assert_eq!(cfg.relays[0].public_key, relay);
    assert_eq!(cfg.relays[0].address, "127.0.0.1:7000".parse().unwrap());
    let min = dir.parse(&minimal()).unwrap();
    assert_eq!(cfg.sessions, min.sessions);
    assert_eq!(cfg.limits, min.limits);
    assert_eq!(cfg.state, min.state);
    assert_eq!(cfg.relay_health, min.relay_health);
    assert_eq!(cfg.server.listen, min.server.listen);
    assert_eq!(cfg.server.max_body_bytes, min.server.max_body_bytes);
    assert_eq!(cfg.server.request_timeout, min.server.request_timeout);
    assert_eq!(cfg.admin.listen, min.admin.listen);
    assert_eq!(cfg.log_level, min.log_level);
    // Without the relay's public key file it fails closed, naming the field.
    std::fs::remove_file(dir.0.join("relay.key.pub")).unwrap();
    assert_eq!(fields(dir.parse(&text)), ["relays[0].public_key_file"]);
}

#[test]
fn a_relay_key_is_inline_or_in_a_file_never_both() {
    let dir = Dir::new("relay-keyfile");
    let (_, relay) = example_in(&dir);
    let with = |entry: &str| {
        minimal() + &format!("\n[[relays]]\nid = 1\naddress = \"198.51.100.1:7000\"\n{entry}")
    };
    let cfg = dir
        .parse(&with("public_key_file = \"relay.key.pub\"\n"))
        .unwrap();
    assert_eq!(cfg.relays[0].public_key, relay);
    let both = format!("public_key_file = \"relay.key.pub\"\npublic_key = \"{relay}\"\n");
    assert_eq!(fields(dir.parse(&with(&both))), ["relays[0]"]);
    assert_eq!(fields(dir.parse(&with(""))), ["relays[0]"]);
    assert_eq!(
        fields(dir.parse(&with("public_key_file = \"missing.pub\"\n"))),
        ["relays[0].public_key_file"]
    );
}

/// The fields of the example file, `section.field` (`signing.keys` tables as `signing.keys.kid`).
fn example_fields() -> Vec<String> {
    let table: toml::Table = toml::from_str(include_str!("../../gateway.example.toml")).unwrap();
    let mut out = Vec::new();
    fn walk(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
        let entries = match value {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table) => {
                a.iter().filter_map(toml::Value::as_table).collect()
            }
            _ => {
                out.push(prefix.to_string());
                return;
            }
        };
        for entry in entries {
            for (k, v) in entry {
                walk(&format!("{prefix}.{k}"), v, out);
            }
        }
    }
    for (section, value) in &table {
        walk(section, value, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// The fields documented in the gateway part of docs/config.md: rows of the table under each
/// `## Gateway `[section]`` heading.
fn documented_fields() -> Vec<String> {
    let docs = include_str!("../../../docs/config.md");
    let gateway = docs
        .split_once("\n# Gateway configuration\n")
        .expect("docs/config.md has a `# Gateway configuration` part")
        .1;
    let mut out = Vec::new();
    let mut section = None;
    for line in gateway.lines() {
        if let Some(heading) = line.strip_prefix("## Gateway `[") {
            section = Some(heading.trim_start_matches('[').split(']').next().unwrap());
        } else if let (Some(section), Some(row)) = (section, line.strip_prefix("| `")) {
            out.push(format!("{section}.{}", row.split('`').next().unwrap()));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_field_is_in_the_example_and_the_docs() {
    // docs/config.md names every field the parser accepts (asked of the parser itself), and
    // the example shows every field but the ones it leaves commented out.
    let accepted = ferry_testkit::config_fields::accepted_fields(|text| {
        toml::from_str::<File>(text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert_eq!(accepted, documented_fields());
    let example = example_fields();
    let commented: Vec<&String> = accepted.iter().filter(|f| !example.contains(f)).collect();
    assert_eq!(
        commented,
        [
            "api_keys.hash",
            "api_keys.id",
            "api_keys.scopes",
            "auth.key_file",
            "relays.public_key",
            "tls.client_ca"
        ]
    );
    assert!(example.len() >= 35, "{example:?}");
    let dir = Dir::new("fields");
    for section in [
        "server",
        "tls",
        "signing",
        "sessions",
        "auth",
        "relay_health",
        "limits",
        "state",
        "admin",
        "log",
    ] {
        let text = match section {
            "tls" => minimal().replace("[tls]\n", "[tls]\nbogus = 1\n"),
            "signing" => minimal().replace("[signing]\n", "[signing]\nbogus = 1\n"),
            _ => minimal() + &format!("\n[{section}]\nbogus = 1\n"),
        };
        match dir.parse(&text) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("unknown field `bogus`"), "{message}")
            }
            other => panic!("[{section}] took an unknown field: {other:?}"),
        }
    }
    let text = minimal()
        + "\n[[relays]]\nid = 1\naddress = \"198.51.100.1:7000\"\npublic_key = \"x\"\nbogus = 1\n";
    assert!(matches!(dir.parse(&text), Err(ConfigError::Parse { .. })));
}

#[test]
fn parse_errors_say_where() {
    let dir = Dir::new("where");
    let text = minimal() + "\n[sessions]\ntoken_lifetime_secs = \"long\"\n";
    let line = text.lines().count();
    match dir.parse(&text) {
        Err(ConfigError::Parse { message, .. }) => {
            assert!(message.contains(&format!("line {line}")), "{message}");
            assert!(message.contains("token_lifetime_secs"), "{message}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn each_out_of_range_value_names_its_field_alone() {
    let dir = Dir::new("each");
    let cases = [
        ("server", "listen = \"nowhere\"", "server.listen"),
        ("server", "max_body_bytes = 100", "server.max_body_bytes"),
        (
            "server",
            "request_timeout_ms = 99",
            "server.request_timeout_ms",
        ),
        (
            "server",
            "header_read_timeout_ms = 60001",
            "server.header_read_timeout_ms",
        ),
        (
            "server",
            "tls_handshake_timeout_ms = 0",
            "server.tls_handshake_timeout_ms",
        ),
        ("server", "max_connections = 0", "server.max_connections"),
        (
            "sessions",
            "token_lifetime_secs = 29",
            "sessions.token_lifetime_secs",
        ),
        (
            "sessions",
            "token_lifetime_secs = 3601",
            "sessions.token_lifetime_secs",
        ),
        (
            "sessions",
            "join_code_ttl_secs = 9",
            "sessions.join_code_ttl_secs",
        ),
        (
            "sessions",
            "rate_bytes_per_sec = 10",
            "sessions.rate_bytes_per_sec",
        ),
        (
            "sessions",
            "max_session_age_secs = 0",
            "sessions.max_session_age_secs",
        ),
        (
            "sessions",
            "max_session_age_secs = 31536001",
            "sessions.max_session_age_secs",
        ),
        (
            "relay_health",
            "interval_secs = 0",
            "relay_health.interval_secs",
        ),
        ("relay_health", "timeout_ms = 10", "relay_health.timeout_ms"),
        (
            "relay_health",
            "heartbeat_ttl_secs = 601",
            "relay_health.heartbeat_ttl_secs",
        ),
        ("limits", "per_ip_rate = 0.0", "limits.per_ip_rate"),
        ("limits", "per_ip_rate = nan", "limits.per_ip_rate"),
        ("limits", "per_key_rate = inf", "limits.per_key_rate"),
        ("limits", "per_ip_burst = 0", "limits.per_ip_burst"),
        ("limits", "per_key_burst = 1000001", "limits.per_key_burst"),
        ("limits", "tracked_clients = 999", "limits.tracked_clients"),
        ("limits", "ipv6_prefix_len = 7", "limits.ipv6_prefix_len"),
        ("limits", "ipv6_prefix_len = 129", "limits.ipv6_prefix_len"),
        (
            "server",
            "trusted_proxies = [\"10.0.0.1/8\"]",
            "server.trusted_proxies[0]",
        ),
        (
            "auth",
            "revoked_keys = [\"Bad Id\"]",
            "auth.revoked_keys[0]",
        ),
        ("state", "backend = \"etcd\"", "state.backend"),
        ("state", "backend = \"redis\"", "state.redis_url"),
        (
            "state",
            "redis_url = \"redis://127.0.0.1/\"",
            "state.redis_url",
        ),
        (
            "state",
            "redis_username = \"ferry\"",
            "state.redis_username",
        ),
        ("state", "key_prefix = \"\"", "state.key_prefix"),
        ("state", "max_sessions = 10", "state.max_sessions"),
        ("admin", "listen = \"198.18.0.1:9478\"", "admin.listen"),
        ("admin", "token_hash = \"plain\"", "admin.token_hash"),
        ("log", "level = \"INFO\"", "log.level"),
    ];
    for (section, line, field) in cases {
        let text = minimal() + &format!("\n[{section}]\n{line}\n");
        let found = problems(dir.parse(&text));
        assert_eq!(found.len(), 1, "{line}: {found:?}");
        assert_eq!(found[0].field, field, "{line}");
    }
    let edges = minimal()
        + "\n[sessions]\ntoken_lifetime_secs = 3600\njoin_code_ttl_secs = 10\nrate_bytes_per_sec = 1500\n\
           max_session_age_secs = 1\n\
           \n[server]\nmax_body_bytes = 1048576\nrequest_timeout_ms = 100\n";
    dir.parse(&edges).unwrap();
}

#[test]
fn plain_http_only_on_loopback_and_only_when_asked() {
    let dir = Dir::new("plain");
    let signing =
        "[signing]\nactive_kid = 1\n\n[[signing.keys]]\nkid = 1\nkey_file = \"gateway-1.key\"\n";
    assert_eq!(fields(dir.parse(signing)), ["tls"]);
    let loopback = format!("[server]\nplain_http = true\nlisten = \"127.0.0.1:8080\"\n\n{signing}");
    let cfg = dir.parse(&loopback).unwrap();
    assert!(matches!(cfg.server.transport, Transport::PlainLoopback));
    let v6 = loopback.replace("127.0.0.1:8080", "[::1]:8080");
    assert!(dir.parse(&v6).is_ok());
    let public = loopback.replace("127.0.0.1:8080", "0.0.0.0:8080");
    assert_eq!(fields(dir.parse(&public)), ["server.plain_http"]);
    let both = minimal() + "\n[server]\nplain_http = true\nlisten = \"127.0.0.1:8080\"\n";
    assert_eq!(fields(dir.parse(&both)), ["server.plain_http"]);
}

#[test]
fn tls_files_are_checked_naming_the_field() {
    let dir = Dir::new("tls");
    let missing = minimal().replace("tls.crt", "nope.crt");
    assert_eq!(fields(dir.parse(&missing)), ["tls.cert"]);
    let not_pem = minimal().replace("cert = \"tls.crt\"", "cert = \"gateway-1.key\"");
    assert_eq!(fields(dir.parse(&not_pem)), ["tls.cert"]);
    let no_key = minimal().replace("key = \"tls.key\"", "key = \"gateway-1.key\"");
    assert_eq!(fields(dir.parse(&no_key)), ["tls.key"]);
    let bad_ca = minimal().replace("[tls]\n", "[tls]\nclient_ca = \"nope.crt\"\n");
    assert_eq!(fields(dir.parse(&bad_ca)), ["tls.client_ca"]);
    std::fs::set_permissions(
        dir.0.join("tls.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let found = problems(dir.parse(&minimal()));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].field, "tls.key");
    assert!(found[0].problem.contains("chmod 600"), "{found:?}");
    // A key ring cannot sign with is named as such, as the TLS key's problem.
    write_file(&dir.0.join("rsa1024.key"), tls::tests::RSA_1024_KEY, 0o600);
    let weak = minimal().replace("key = \"tls.key\"", "key = \"rsa1024.key\"");
    let found = problems(dir.parse(&weak));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].field, "tls.key");
    assert!(
        found[0]
            .problem
            .contains("cannot sign with this private key"),
        "{found:?}"
    );
    // An expired certificate is no problem but a warning.
    let (cert, key) = tls::tests::cert_valid((2020, 1, 1), (2020, 1, 2));
    write_file(&dir.0.join("old.crt"), &cert, 0o644);
    write_file(&dir.0.join("old.key"), &key, 0o600);
    let old = minimal()
        .replace("\"tls.crt\"", "\"old.crt\"")
        .replace("\"tls.key\"", "\"old.key\"");
    let cfg = dir.parse(&old).unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(
        cfg.warnings[0].starts_with("tls.cert: ")
            && cfg.warnings[0].contains("expired on 2020-01-02 00:00:00 UTC"),
        "{:?}",
        cfg.warnings
    );
    std::fs::set_permissions(
        dir.0.join("tls.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert!(dir.parse(&minimal()).unwrap().warnings.is_empty());
}

#[test]
fn signing_keys_are_checked() {
    let dir = Dir::new("signing");
    let two = minimal() + "\n[[signing.keys]]\nkid = 2\nkey_file = \"gateway-2.key\"\n";
    let cfg = dir.parse(&two).unwrap();
    assert_eq!(cfg.signing.active.kid(), 1);
    assert_eq!(
        cfg.signing
            .published
            .iter()
            .map(|(k, _)| *k)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    let switched = dir
        .parse(&two.replace("active_kid = 1", "active_kid = 2"))
        .unwrap();
    assert_eq!(switched.signing.active.kid(), 2);
    assert_eq!(switched.signing.active.public(), cfg.signing.published[1].1);
    assert_eq!(
        fields(dir.parse(&minimal().replace("active_kid = 1", "active_kid = 3"))),
        ["signing.active_kid"]
    );
    let dup = minimal() + "\n[[signing.keys]]\nkid = 1\nkey_file = \"gateway-2.key\"\n";
    assert_eq!(fields(dir.parse(&dup)), ["signing.keys[1].kid"]);
    let missing = minimal() + "\n[[signing.keys]]\nkid = 2\nkey_file = \"nope.key\"\n";
    assert_eq!(fields(dir.parse(&missing)), ["signing.keys[1].key_file"]);
    let none = "[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n\n[signing]\nactive_kid = 1\n";
    assert_eq!(fields(dir.parse(none)), ["signing.keys"]);
    std::fs::set_permissions(
        dir.0.join("gateway-1.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let found = problems(dir.parse(&minimal()));
    assert_eq!(found[0].field, "signing.keys[0].key_file");
    assert!(found[0].problem.contains("chmod 600"), "{found:?}");
}

#[test]
fn api_keys_are_checked() {
    let dir = Dir::new("apikeys");
    let h = hash();
    let text = minimal()
        + &format!(
            "\n[[api_keys]]\nid = \"a\"\nhash = \"{h}\"\nscopes = [\"create:x\"]\n\
             \n[[api_keys]]\nid = \"a\"\nhash = \"{h}\"\nscopes = [\"join:x\"]\n\
             \n[[api_keys]]\nid = \"B\"\nhash = \"sha1:00\"\nscopes = [\"admin\"]\n\
             \n[[api_keys]]\nid = \"c\"\nhash = \"{h}\"\nscopes = []\n"
        );
    assert_eq!(
        fields(dir.parse(&text)),
        [
            "api_keys[1].id",
            "api_keys[2].id",
            "api_keys[2].hash",
            "api_keys[2].scopes[0]",
            "api_keys[3].scopes"
        ]
    );
    let with_file = minimal() + "\n[auth]\nkey_file = \"keys.toml\"\n";
    assert_eq!(fields(dir.parse(&with_file)), ["auth.key_file"]);
    write_file(
        &dir.0.join("keys.toml"),
        &format!("[[api_keys]]\nid = \"k\"\nhash = \"{h}\"\nscopes = [\"nope\"]\n"),
        0o600,
    );
    let found = fields(dir.parse(&with_file));
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("auth.key_file ") && found[0].ends_with("api_keys[0].scopes[0]"));
}

#[test]
fn relays_are_checked() {
    let dir = Dir::new("relays");
    let k = relay_key();
    let text = minimal()
        + &format!(
            "\n[[relays]]\nid = 1\naddress = \"198.51.100.1:7000\"\npublic_key = \"{k}\"\n\
             \n[[relays]]\nid = 1\naddress = \"198.51.100.2:7000\"\npublic_key = \"{k}\"\n\
             \n[[relays]]\nid = 0\naddress = \"198.51.100.2:7000\"\npublic_key = \"{k}\"\n\
             \n[[relays]]\nid = 3\naddress = \"0.0.0.0:7000\"\npublic_key = \"{k}\"\n\
             \n[[relays]]\nid = 4\naddress = \"198.51.100.4:0\"\npublic_key = \"AAAA\"\n"
        );
    assert_eq!(
        fields(dir.parse(&text)),
        [
            "relays[1].id",
            "relays[2].id",
            "relays[3].address",
            "relays[4].address",
            "relays[4].public_key"
        ]
    );
}

#[test]
fn trusted_proxies_and_revoked_keys_are_checked() {
    let dir = Dir::new("proxies");
    let text = minimal()
        + "\n[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"2001:db8::/32\", \
           \"10.0.0.0/8\", \"proxy.example\", \"::1/129\"]\n\
           \n[auth]\nrevoked_keys = [\"old-app\", \"old-app\"]\n";
    let found = problems(dir.parse(&text));
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "server.trusted_proxies[3]",
            "server.trusted_proxies[4]",
            "server.trusted_proxies[5]",
            "auth.revoked_keys[1]"
        ]
    );
    assert_eq!(found[0].problem, "10.0.0.0/8 is listed twice");
    let good = minimal()
        + "\n[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"2001:db8::/32\"]\n\
           \n[auth]\nrevoked_keys = [\"old-app\"]\n\n[limits]\nipv6_prefix_len = 48\n";
    let cfg = dir.parse(&good).unwrap();
    assert!(
        cfg.server
            .trusted_proxies
            .trusts("10.9.8.7".parse().unwrap())
    );
    assert!(
        !cfg.server
            .trusted_proxies
            .trusts("192.0.2.1".parse().unwrap())
    );
    assert_eq!(cfg.revoked_keys, ["old-app"]);
    assert_eq!(cfg.limits.ipv6_prefix_len, 48);
    let too_many: Vec<String> = (0..1025)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let text = minimal() + &format!("\n[server]\ntrusted_proxies = [{}]\n", too_many.join(", "));
    assert_eq!(fields_of(dir.parse(&text)), ["server.trusted_proxies"]);
}

fn fields_of(result: Result<GatewayConfig, ConfigError>) -> Vec<String> {
    fields(result)
}

#[test]
fn a_reload_takes_keys_relays_limits_and_signing_but_not_listeners_or_state() {
    let dir = Dir::new("reload");
    let running = dir.parse(&minimal()).unwrap().restart_settings();
    let reloadable = minimal().replace("active_kid = 1", "active_kid = 2")
        + &format!(
            "\n[[signing.keys]]\nkid = 2\nkey_file = \"gateway-2.key\"\n\
             \n[[api_keys]]\nid = \"new\"\nhash = \"{}\"\nscopes = [\"create:*\"]\n\
             \n[[relays]]\nid = 9\naddress = \"198.51.100.9:7000\"\npublic_key = \"{}\"\n\
             \n[limits]\nper_ip_rate = 5.0\nipv6_prefix_len = 56\n\
             \n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n\
             \n[sessions]\ntoken_lifetime_secs = 60\nmax_session_age_secs = 3600\n\
             \n[auth]\nrevoked_keys = [\"gone\"]\n\
             \n[admin]\ntoken_hash = \"{}\"\n",
            hash(),
            relay_key(),
            hash()
        );
    let applied = running
        .check_reload(dir.parse(&reloadable).unwrap())
        .unwrap();
    assert_eq!(applied.signing.active.kid(), 2);
    assert_eq!(applied.relays.len(), 1);
    assert_eq!(applied.sessions.max_session_age_secs, 3600);
    // The TLS files are re-read, and mTLS may be turned on: still HTTPS.
    let mtls = minimal().replace(
        "key = \"tls.key\"\n",
        "key = \"tls.key\"\nclient_ca = \"ca.crt\"\n",
    );
    assert!(running.check_reload(dir.parse(&mtls).unwrap()).is_ok());
    let cases = [
        ("[server]\nlisten = \"0.0.0.0:9443\"", "server.listen"),
        ("[server]\nmax_body_bytes = 2048", "server.max_body_bytes"),
        ("[server]\nmax_connections = 5", "server.max_connections"),
        ("[relay_health]\nprobe = false", "[relay_health]"),
        ("[state]\nmax_sessions = 5000", "[state]"),
        ("[admin]\nlisten = \"127.0.0.1:9999\"", "admin.listen"),
        ("[log]\nlevel = \"debug\"", "log.level"),
    ];
    for (section, field) in cases {
        let changed = dir.parse(&(minimal() + "\n" + section + "\n")).unwrap();
        match running.check_reload(changed) {
            Err(ConfigError::NeedsRestart { fields, .. }) => assert_eq!(fields, [field]),
            other => panic!("{section}: expected NeedsRestart, got {other:?}"),
        }
    }
    // Several at once are all named; HTTPS to plain HTTP is one of them.
    let plain = "[server]\nlisten = \"127.0.0.1:8080\"\nplain_http = true\n\n[signing]\nactive_kid = 1\n\n\
                 [[signing.keys]]\nkid = 1\nkey_file = \"gateway-1.key\"\n";
    match running.check_reload(dir.parse(plain).unwrap()) {
        Err(e @ ConfigError::NeedsRestart { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("server.listen, server.plain_http / [tls]"),
                "{text}"
            );
            assert!(text.contains("nothing of this file was applied"), "{text}");
        }
        other => panic!("expected NeedsRestart, got {other:?}"),
    }
}

/// `[state]` with Redis over TLS and an ACL user: the CA and password files are read (the
/// password never printed); credentials in the URL, a CA without TLS, a user without a
/// password, and a password file others may read are each refused, naming the field.
#[test]
fn redis_tls_and_credentials_are_checked_and_read() {
    let dir = Dir::new("redis-tls");
    write_file(&dir.0.join("redis.pw"), "s3cret-pw\n", 0o600);
    write_file(&dir.0.join("loose.pw"), "s3cret-pw\n", 0o644);
    let state = |lines: &str| minimal() + &format!("\n[state]\nbackend = \"redis\"\n{lines}\n");
    let cfg = dir
        .parse(&state(
            "redis_url = \"rediss://redis.test:6380/0\"\nredis_ca_file = \"ca.crt\"\n\
             redis_username = \"ferry\"\nredis_password_file = \"redis.pw\"",
        ))
        .unwrap();
    match &cfg.state {
        StateBackend::Redis {
            url,
            ca_pem,
            username,
            password,
            ..
        } => {
            assert_eq!(url, "rediss://redis.test:6380/0");
            assert!(
                ca_pem
                    .as_ref()
                    .is_some_and(|p| p.starts_with(b"-----BEGIN"))
            );
            assert_eq!(username.as_deref(), Some("ferry"));
            assert_eq!(password.as_ref().map(|p| p.0.as_str()), Some("s3cret-pw"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{cfg:?}").contains("s3cret"));
    for (lines, field) in [
        (
            "redis_url = \"redis://ferry:pw@redis.test/0\"",
            "state.redis_url",
        ),
        (
            "redis_url = \"redis://redis.test/0\"\nredis_ca_file = \"ca.crt\"",
            "state.redis_ca_file",
        ),
        (
            "redis_url = \"rediss://redis.test/0\"\nredis_ca_file = \"gateway-1.key\"",
            "state.redis_ca_file",
        ),
        (
            "redis_url = \"redis://redis.test/0\"\nredis_username = \"ferry\"",
            "state.redis_username",
        ),
        (
            "redis_url = \"redis://redis.test/0\"\nredis_password_file = \"loose.pw\"",
            "state.redis_password_file",
        ),
    ] {
        assert_eq!(fields(dir.parse(&state(lines))), [field], "{lines}");
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within 10 s (an open of a
/// FIFO would otherwise block the test forever).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("blocked: a file that is not a regular file was opened as one")
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

/// Every file the config names, and the config itself, must be a regular file: a FIFO is
/// refused at once (its open would wait for a writer forever) and a directory is called one,
/// before any permission check (which would otherwise say `chmod 600`).
#[test]
fn files_that_are_not_regular_files_are_refused_at_once_and_named() {
    let dir = Dir::new("not-regular");
    mkfifo(&dir.0.join("fifo"));
    std::fs::create_dir(dir.0.join("dir")).unwrap();
    let redis = "\n[state]\nbackend = \"redis\"\nredis_url = \"rediss://127.0.0.1:1/0\"\n";
    let cases: [(&str, &str, String); 5] = [
        ("tls.cert", "tls.crt", minimal()),
        ("tls.key", "tls.key", minimal()),
        ("signing.keys[0].key_file", "gateway-1.key", minimal()),
        (
            "tls.client_ca",
            "ca.crt",
            minimal().replace("[tls]\n", "[tls]\nclient_ca = \"ca.crt\"\n"),
        ),
        (
            "state.redis_ca_file",
            "ca.crt",
            minimal() + redis + "redis_ca_file = \"ca.crt\"\n",
        ),
    ];
    for (field, name, text) in cases {
        for (special, what) in [
            ("fifo", "is a FIFO (named pipe), not a regular file"),
            ("dir", "is a directory, not a regular file"),
        ] {
            let text = text.replace(&format!("\"{name}\""), &format!("\"{special}\""));
            let path = dir.0.clone();
            let found = problems(within_10s(move || {
                parse_str(&text, &path.join("gateway.toml"), &path)
            }));
            assert_eq!(found.len(), 1, "{field} {special}: {found:?}");
            assert_eq!(found[0].field, field, "{found:?}");
            assert!(found[0].problem.contains(what), "{field}: {found:?}");
            assert!(!found[0].problem.contains("chmod"), "{field}: {found:?}");
        }
    }
    // auth.key_file, and the config file itself.
    for (special, what) in [
        ("fifo", "is a FIFO (named pipe), not a regular file"),
        ("dir", "is a directory, not a regular file"),
    ] {
        let text = minimal() + &format!("\n[auth]\nkey_file = \"{special}\"\n");
        let path = dir.0.clone();
        let found = problems(within_10s(move || {
            parse_str(&text, &path.join("gateway.toml"), &path)
        }));
        assert_eq!(found[0].field, "auth.key_file", "{found:?}");
        assert!(found[0].problem.contains(what), "{found:?}");
        let path = dir.0.join(special);
        let error = within_10s(move || load(&path)).unwrap_err().to_string();
        assert!(error.contains(what), "{error}");
    }
}
