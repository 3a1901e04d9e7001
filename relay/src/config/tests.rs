use ferry_core::keys::GatewaySigningKey;
use ring::rand::SystemRandom;
use std::os::unix::fs::PermissionsExt;

use ferry_core::problems::Check;

use super::schema::{File, LimitsSection};
use super::validate::validate_limits;
use super::*;
use crate::xdp::Mode;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "ferry-config-{}-{nanos}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let rng = SystemRandom::new();
        let key = RelayStaticKey::generate(&rng).unwrap();
        ferry_keyfile::write_secret_file(&dir.join("relay.key"), &key, false).unwrap();
        Self(dir)
    }

    fn parse(&self, text: &str) -> Result<RelayConfig, ConfigError> {
        parse_str(text, &self.0.join("relay.toml"), &self.0)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gateway_key() -> String {
    let rng = SystemRandom::new();
    GatewaySigningKey::generate(&rng)
        .unwrap()
        .public()
        .to_string()
}

fn minimal() -> String {
    format!(
        "[relay]\nid = 7\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\npublic_key = \"{}\"\n\n[xdp]\ninterfaces = [\"eth0\"]\n",
        gateway_key()
    )
}

fn problems(result: Result<RelayConfig, ConfigError>) -> Vec<Problem> {
    match result {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected validation problems, got {other:?}"),
    }
}

fn fields(result: Result<RelayConfig, ConfigError>) -> Vec<String> {
    problems(result).into_iter().map(|p| p.field).collect()
}

#[test]
fn a_minimal_file_gets_safe_defaults() {
    let dir = Dir::new("minimal");
    let cfg = dir.parse(&minimal()).unwrap();
    assert_eq!(cfg.relay_id, 7);
    assert_eq!(cfg.listen.len(), 2);
    assert!(cfg.admin_listen.ip().is_loopback());
    assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(60));
    assert!(cfg.workers >= 1);
    assert_eq!(cfg.gateway_keys.len(), 1);
    assert_eq!(cfg.verifier_config().relay_id, 7);
}

#[test]
fn the_example_file_is_valid() {
    let dir = Dir::new("example");
    // The files `ferry-relay init` and `ferry-gateway init` make, here in the test's directory.
    let rng = SystemRandom::new();
    let gateway = GatewaySigningKey::generate(&rng).unwrap();
    ferry_keyfile::write_public_file(&dir.0.join("gateway-1.key.pub"), &gateway.public(), false)
        .unwrap();
    let shipped = include_str!("../../relay.example.toml");
    let text = shipped.replace("/var/lib/ferry/", "");
    let cfg = dir.parse(&text).unwrap();
    assert_eq!(cfg.gateway_keys, [(1, gateway.public())]);
    // Shipped with the guard off (the interface names are the host's), saying how to turn it on.
    assert_eq!(cfg.xdp.mode, Mode::Off);
    assert_eq!(
        cfg.limits,
        validate_limits(&LimitsSection::default(), &mut Check::default())
    );
    // The example shows the defaults: it means the same as the minimal file.
    let min = dir.parse(&minimal()).unwrap();
    assert_eq!(cfg.listen, min.listen);
    assert_eq!((cfg.workers, &cfg.cpus), (min.workers, &min.cpus));
    assert_eq!(
        (cfg.udp_gso, cfg.udp_gro, cfg.send_zc_min_bytes),
        (min.udp_gso, min.udp_gro, min.send_zc_min_bytes)
    );
    assert_eq!(
        (cfg.admin_listen, &cfg.log_level),
        (min.admin_listen, &min.log_level)
    );
    assert_eq!(cfg.limits, min.limits);
    // Without the gateway's public key file, it fails closed, naming the field.
    std::fs::remove_file(dir.0.join("gateway-1.key.pub")).unwrap();
    assert_eq!(
        fields(dir.parse(&text)),
        ["gateway_keys[0].public_key_file"]
    );
}

#[test]
fn a_gateway_key_is_inline_or_in_a_file_never_both() {
    let dir = Dir::new("keyfile");
    let rng = SystemRandom::new();
    let gateway = GatewaySigningKey::generate(&rng).unwrap();
    ferry_keyfile::write_public_file(&dir.0.join("gw.pub"), &gateway.public(), false).unwrap();
    let with = |entry: &str| {
        format!(
            "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\n{entry}\n\
             [xdp]\nmode = \"off\"\n"
        )
    };
    let cfg = dir.parse(&with("public_key_file = \"gw.pub\"\n")).unwrap();
    assert_eq!(cfg.gateway_keys, [(1, gateway.public())]);
    let both = format!(
        "public_key_file = \"gw.pub\"\npublic_key = \"{}\"\n",
        gateway.public()
    );
    assert_eq!(fields(dir.parse(&with(&both))), ["gateway_keys[0]"]);
    assert_eq!(fields(dir.parse(&with(""))), ["gateway_keys[0]"]);
    assert_eq!(
        fields(dir.parse(&with("public_key_file = \"missing.pub\"\n"))),
        ["gateway_keys[0].public_key_file"]
    );
}

/// The fields of the example file, `section.field`.
fn example_fields() -> Vec<String> {
    // Optional sections are commented out with a bare `#` (prose comments are `# `): read them
    // as if they were not.
    let text: String = include_str!("../../relay.example.toml")
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest)
                if rest.starts_with('[') || rest.contains(" = ") && !rest.starts_with(' ') =>
            {
                format!("{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for (section, value) in &table {
        let entries = match value {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) => a.iter().filter_map(toml::Value::as_table).collect(),
            other => panic!("{section} = {other} is not a section"),
        };
        for entry in entries {
            out.extend(entry.keys().map(|k| format!("{section}.{k}")));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The fields documented in docs/config.md: rows of the table under each section heading.
fn documented_fields() -> Vec<String> {
    let mut out = Vec::new();
    let mut section = None;
    for line in include_str!("../../../docs/config.md").lines() {
        // The gateway's part follows; gateway-lite's tests check it.
        if line == "# Gateway configuration" {
            break;
        }
        if let Some(heading) = line.strip_prefix("## `[") {
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
    // the example shows every field but the alternatives it leaves commented out.
    let accepted = ferry_testkit::config_fields::accepted_fields(|text| {
        toml::from_str::<File>(text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert_eq!(accepted, documented_fields());
    let example = example_fields();
    let commented: Vec<&String> = accepted.iter().filter(|f| !example.contains(f)).collect();
    assert_eq!(commented, ["gateway_keys.public_key"]);
    // And the parser knows each of them: a file with all of them parsed above, and here
    // every section rejects a field it does not know.
    assert!(example.len() >= 20, "{example:?}");
    let dir = Dir::new("fields");
    for section in ["relay", "limits", "admin", "log"] {
        let text = if section == "relay" {
            minimal().replace("[relay]\n", "[relay]\nbogus = 1\n")
        } else {
            minimal() + &format!("\n[{section}]\nbogus = 1\n")
        };
        match dir.parse(&text) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("unknown field `bogus`"), "{message}")
            }
            other => panic!("[{section}] took an unknown field: {other:?}"),
        }
    }
}

#[test]
fn parse_errors_say_where() {
    let dir = Dir::new("where");
    let text = minimal() + "\n[limits]\nmax_sessions = \"many\"\n";
    let line = text.lines().count();
    match dir.parse(&text) {
        Err(ConfigError::Parse { message, .. }) => {
            assert!(message.contains(&format!("line {line}")), "{message}");
            assert!(message.contains("max_sessions"), "{message}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    let text = minimal().replace("[relay]\n", "[relay]\nbogus = 1\n");
    match dir.parse(&text) {
        Err(ConfigError::Parse { message, .. }) => {
            assert!(message.contains("line 2"), "{message}")
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn unknown_fields_are_errors_that_name_them() {
    let dir = Dir::new("unknown");
    let text = minimal() + "\n[limits]\nidle_timeout = 5\n";
    match dir.parse(&text) {
        Err(ConfigError::Parse { message, .. }) => {
            assert!(message.contains("idle_timeout"), "{message}")
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn every_problem_is_reported_with_its_field() {
    let dir = Dir::new("ranges");
    let text = minimal()
        + "\n[limits]\nidle_timeout_secs = 2\nmax_clock_skew_secs = 301\nmax_sessions = 0\n\
           bind_rate_per_ip = -1.0\ndefault_session_rate = 10\n\n[log]\nlevel = \"loud\"\n";
    let found = fields(dir.parse(&text));
    for field in [
        "limits.idle_timeout_secs",
        "limits.max_clock_skew_secs",
        "limits.max_sessions",
        "limits.bind_rate_per_ip",
        "limits.default_session_rate",
        "log.level",
    ] {
        assert!(
            found.iter().any(|f| f == field),
            "{field} missing from {found:?}"
        );
    }
    let message = dir.parse(&text).unwrap_err().to_string();
    assert!(
        message.contains("must be between 5 and 3600, got 2"),
        "{message}"
    );
}

#[test]
fn each_out_of_range_value_names_its_field_alone() {
    let dir = Dir::new("each");
    let cases = [
        ("relay", "id = 0", "relay.id"),
        ("relay", "listen = []", "relay.listen"),
        ("relay", "listen = [\"0.0.0.0:0\"]", "relay.listen[0]"),
        ("relay", "workers = 300", "relay.workers"),
        ("limits", "max_sessions = 0", "limits.max_sessions"),
        (
            "limits",
            "max_bindings_per_ip = 0",
            "limits.max_bindings_per_ip",
        ),
        (
            "limits",
            "max_bindings_per_ip = 100001",
            "limits.max_bindings_per_ip",
        ),
        (
            "limits",
            "bind_rate_per_ip = 0.0",
            "limits.bind_rate_per_ip",
        ),
        (
            "limits",
            "bind_rate_per_ip = nan",
            "limits.bind_rate_per_ip",
        ),
        (
            "limits",
            "bind_rate_per_ip = inf",
            "limits.bind_rate_per_ip",
        ),
        (
            "limits",
            "bind_burst_per_ip = 0",
            "limits.bind_burst_per_ip",
        ),
        (
            "limits",
            "default_session_rate = 1499",
            "limits.default_session_rate",
        ),
        (
            "limits",
            "max_session_rate = 1000000",
            "limits.max_session_rate",
        ),
        (
            "limits",
            "idle_timeout_secs = 4",
            "limits.idle_timeout_secs",
        ),
        (
            "limits",
            "idle_timeout_secs = 3601",
            "limits.idle_timeout_secs",
        ),
        (
            "limits",
            "max_clock_skew_secs = 301",
            "limits.max_clock_skew_secs",
        ),
        (
            "limits",
            "max_token_lifetime_secs = 59",
            "limits.max_token_lifetime_secs",
        ),
        (
            "limits",
            "max_token_lifetime_secs = 86401",
            "limits.max_token_lifetime_secs",
        ),
        (
            "limits",
            "replay_cache_capacity = 199999",
            "limits.replay_cache_capacity",
        ),
        ("limits", "tracked_ips = 1023", "limits.tracked_ips"),
        ("limits", "ipv6_prefix_len = 7", "limits.ipv6_prefix_len"),
        ("limits", "ipv6_prefix_len = 129", "limits.ipv6_prefix_len"),
        ("admin", "listen = \"localhost:9477\"", "admin.listen"),
        ("log", "level = \"INFO\"", "log.level"),
        ("xdp", "mode = \"xdpdrv\"", "xdp.mode"),
        ("xdp", "interfaces = []", "xdp.interfaces"),
        (
            "xdp",
            "interfaces = [\"eth0\", \"eth0\"]",
            "xdp.interfaces[1]",
        ),
        ("xdp", "interfaces = [\"a/b\"]", "xdp.interfaces[0]"),
        (
            "xdp",
            "interfaces = [\"sixteen-chars-xx\"]",
            "xdp.interfaces[0]",
        ),
        ("xdp", "max_sources = 0", "xdp.max_sources"),
        ("xdp", "max_sources = 16777217", "xdp.max_sources"),
        ("xdp", "ipv6_prefix_len = 7", "xdp.ipv6_prefix_len"),
        ("xdp", "ipv6_prefix_len = 129", "xdp.ipv6_prefix_len"),
        (
            "xdp",
            "data_packets_per_second = 0",
            "xdp.data_packets_per_second",
        ),
        ("xdp", "data_packet_burst = 0", "xdp.data_packet_burst"),
        (
            "xdp",
            "handshake_packet_burst = 180000",
            "xdp.handshake_packet_burst",
        ),
        ("xdp", "data_byte_burst = 1471", "xdp.data_byte_burst"),
        ("xdp", "deny = [\"198.18.0.1/24\"]", "xdp.deny[0]"),
        ("xdp", "deny = [\"198.18.0.0/33\"]", "xdp.deny[0]"),
        ("xdp", "deny = [\"::/0\", \"::/0\"]", "xdp.deny[1]"),
        ("xdp", "allow = [\"example.com\"]", "xdp.allow[0]"),
    ];
    for (section, line, field) in cases {
        let text = match section {
            "relay" if line.starts_with("id ") => minimal().replace("id = 7", line),
            "relay" => minimal().replace("[relay]\n", &format!("[relay]\n{line}\n")),
            // minimal() lists an interface: this line comes first, so it wins.
            "xdp" if line.starts_with("interfaces") => {
                minimal().replace("interfaces = [\"eth0\"]\n", &format!("{line}\n"))
            }
            "xdp" => minimal().replace("[xdp]\n", &format!("[xdp]\n{line}\n")),
            _ => minimal() + &format!("\n[{section}]\n{line}\n"),
        };
        let found = problems(dir.parse(&text));
        assert_eq!(found.len(), 1, "{line}: {found:?}");
        assert_eq!(found[0].field, field, "{line}");
    }
    // The bounds themselves are accepted.
    let edges = minimal()
        + "\n[limits]\nidle_timeout_secs = 5\nmax_clock_skew_secs = 300\n\
           max_token_lifetime_secs = 86400\ndefault_session_rate = 1500\n\
           max_session_rate = 1500\nreplay_cache_capacity = 200000\n";
    dir.parse(&edges).unwrap();
}

#[test]
fn xdp_lists_and_ports_are_checked() {
    let dir = Dir::new("xdp");
    let both = minimal().replace(
        "[xdp]\n",
        "[xdp]\ndeny = [\"198.18.0.0/16\"]\nallow = [\"198.18.0.0/16\", \"2001:db8::/32\"]\n",
    );
    assert_eq!(fields(dir.parse(&both)), ["xdp.allow[0]"]);
    let off = "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\n\
               public_key = \"KEY\"\n\n[xdp]\nmode = \"off\"\n"
        .replace("KEY", &gateway_key());
    let cfg = dir.parse(&off).unwrap();
    assert_eq!(cfg.xdp.mode, Mode::Off);
    let cfg = dir.parse(&minimal()).unwrap();
    assert_eq!(cfg.xdp.mode, Mode::Auto);
    assert_eq!(cfg.xdp_ports(), [7000]);
    assert_eq!(cfg.xdp.interfaces, ["eth0"]);
    assert!(cfg.xdp.fast_path, "the fast path is on by default");
}

#[test]
fn gateway_keys_are_checked() {
    let dir = Dir::new("keys");
    let key = gateway_key();
    let text = format!(
        "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\npublic_key = \"{key}\"\n\n\
         [[gateway_keys]]\nkid = 1\npublic_key = \"{key}\"\n\n[[gateway_keys]]\nkid = 2\npublic_key = \"not base64!\"\n\n[xdp]\nmode = \"off\"\n"
    );
    let found = fields(dir.parse(&text));
    assert_eq!(found, ["gateway_keys[1].kid", "gateway_keys[2].public_key"]);
    // A repeated kid with a bad key: both problems, and a first entry whose file is missing
    // does not hide the repetition.
    let text = "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\n\
                public_key_file = \"none.pub\"\n\n[[gateway_keys]]\nkid = 1\npublic_key = \"xyz\"\n\n\
                [xdp]\nmode = \"off\"\n";
    let found = fields(dir.parse(text));
    assert_eq!(
        found,
        [
            "gateway_keys[0].public_key_file",
            "gateway_keys[1].kid",
            "gateway_keys[1].public_key"
        ]
    );
    let none = "[relay]\nid = 1\nstatic_key = \"relay.key\"\n[xdp]\nmode = \"off\"\n";
    assert_eq!(fields(dir.parse(none)), ["gateway_keys"]);
}

#[test]
fn listen_and_admin_addresses_are_checked() {
    let dir = Dir::new("listen");
    let text = minimal().replace(
        "[relay]\n",
        "[relay]\nlisten = [\"0.0.0.0:7000\", \"0.0.0.0:7000\", \"nowhere\"]\n",
    ) + "\n[admin]\nlisten = \"198.18.0.1:9477\"\n";
    let found = fields(dir.parse(&text));
    assert!(found.contains(&"relay.listen[1]".to_string()), "{found:?}");
    assert!(found.contains(&"relay.listen[2]".to_string()), "{found:?}");
    assert!(found.contains(&"admin.listen".to_string()), "{found:?}");
    let allowed =
        minimal() + "\n[admin]\nlisten = \"198.18.0.1:9477\"\nallow_non_loopback = true\n";
    assert!(dir.parse(&allowed).is_ok());
}

#[test]
fn workers_and_cpus_are_checked() {
    let dir = Dir::new("workers");
    let with = |relay: &str| minimal().replace("[relay]\n", &format!("[relay]\n{relay}\n"));
    let cfg = dir.parse(&with("workers = 0\ncpus = [2, 3]")).unwrap();
    assert_eq!((cfg.workers, cfg.cpus.as_slice()), (2, [2, 3].as_slice()));
    assert_eq!(cfg.cpu_for_worker(1), Some(3));
    let cfg = dir.parse(&with("workers = 0")).unwrap();
    assert!((1..=MAX_WORKERS).contains(&cfg.workers));
    assert_eq!(fields(dir.parse(&with("workers = 257"))), ["relay.workers"]);
    assert_eq!(
        fields(dir.parse(&with("workers = 3\ncpus = [0, 1]"))),
        ["relay.cpus"]
    );
    assert_eq!(
        fields(dir.parse(&with("workers = 3\ncpus = [0, 1, 1]"))),
        ["relay.cpus[2]"]
    );
    let problems = problems(dir.parse(&with("workers = 2\ncpus = [0, 4096]")));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "relay.cpus[1]");
    assert!(problems[0].problem.contains("out of range"), "{problems:?}");
}

#[test]
fn the_admin_listener_stays_on_loopback_unless_allowed() {
    let dir = Dir::new("admin");
    for ok in ["127.0.0.1:9477", "[::1]:9477", "[::ffff:127.0.0.1]:9477"] {
        let text = minimal() + &format!("\n[admin]\nlisten = \"{ok}\"\n");
        assert!(dir.parse(&text).is_ok(), "{ok}");
    }
    let text = minimal() + "\n[admin]\nlisten = \"[2001:db8::1]:9477\"\n";
    let found = problems(dir.parse(&text));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].field, "admin.listen");
    assert!(found[0].problem.contains("allow_non_loopback"), "{found:?}");
}

#[test]
fn a_readable_key_file_is_refused_with_the_fix() {
    let dir = Dir::new("perms");
    std::fs::set_permissions(
        dir.0.join("relay.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let message = dir.parse(&minimal()).unwrap_err().to_string();
    assert!(message.contains("chmod 600"), "{message}");
    assert!(message.starts_with("relay.static_key"), "{message}");
    // With other problems, the key's is listed among them.
    let text = minimal() + "\n[limits]\nidle_timeout_secs = 2\n";
    let found = problems(dir.parse(&text));
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].field, "limits.idle_timeout_secs");
    assert_eq!(found[1].field, "relay.static_key");
    assert!(found[1].problem.contains("chmod 600"), "{found:?}");
}

#[test]
fn the_config_file_itself_must_be_a_regular_file_of_bounded_length() {
    let dir = Dir::new("config-file");
    let path = dir.0.join("relay.toml");
    // A FIFO would block the read until something writes to it: check-config, a start and a
    // reload would hang.
    let made = std::process::Command::new("mkfifo").arg(&path).status();
    assert!(made.unwrap().success(), "mkfifo {}", path.display());
    let message = load(&path).unwrap_err().to_string();
    assert!(message.contains("is a FIFO"), "{message}");
    std::fs::remove_file(&path).unwrap();
    // A device behind a link (endless) and a file past the limit are refused, not read whole.
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    let message = load(&path).unwrap_err().to_string();
    assert!(message.contains("character device"), "{message}");
    std::fs::remove_file(&path).unwrap();
    let padding = "#".repeat(MAX_CONFIG_FILE as usize);
    std::fs::write(&path, minimal() + &padding).unwrap();
    let message = load(&path).unwrap_err().to_string();
    assert!(
        message.ends_with(&format!("is longer than {MAX_CONFIG_FILE} bytes")),
        "{message}"
    );
    // The same text within the limit loads.
    std::fs::write(&path, minimal()).unwrap();
    load(&path).unwrap();
}

#[test]
fn a_key_or_ca_path_that_is_no_regular_file_is_named_as_such_without_waiting() {
    let dir = Dir::new("not-regular");
    let mkfifo = |name: &str| {
        let path = dir.0.join(name);
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success(), "mkfifo {}", path.display());
    };
    // A FIFO would block a plain open until something writes to it.
    std::fs::remove_file(dir.0.join("relay.key")).unwrap();
    mkfifo("relay.key");
    let message = dir.parse(&minimal()).unwrap_err().to_string();
    assert!(message.starts_with("relay.static_key"), "{message}");
    assert!(message.contains("is a FIFO"), "{message}");
    // A directory is a directory, not a file with loose permissions.
    std::fs::remove_file(dir.0.join("relay.key")).unwrap();
    std::fs::create_dir(dir.0.join("relay.key")).unwrap();
    std::fs::set_permissions(
        dir.0.join("relay.key"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let message = dir.parse(&minimal()).unwrap_err().to_string();
    assert!(message.contains("is a directory"), "{message}");
    assert!(!message.contains("chmod"), "{message}");
    std::fs::remove_dir(dir.0.join("relay.key")).unwrap();
    let rng = SystemRandom::new();
    ferry_keyfile::write_secret_file(
        &dir.0.join("relay.key"),
        &RelayStaticKey::generate(&rng).unwrap(),
        true,
    )
    .unwrap();
    // A gateway's public key file and the heartbeat's CA file alike.
    mkfifo("gw.pub");
    mkfifo("ca.pem");
    let key_file = dir.0.join("hb.key");
    std::fs::write(
        &key_file,
        "fgk1.relay7.c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2Vj\n",
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = "[relay]\nid = 1\nstatic_key = \"relay.key\"\n\n[[gateway_keys]]\nkid = 1\n\
                public_key_file = \"gw.pub\"\n\n[xdp]\nmode = \"off\"\n\n[heartbeat]\n\
                gateway_url = \"https://gateway.test\"\napi_key_file = \"hb.key\"\n\
                ca_file = \"ca.pem\"\naddress = \"198.18.0.1:7000\"\ninterval_secs = 5\n";
    let found = problems(dir.parse(text));
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        ["gateway_keys[0].public_key_file", "heartbeat.ca_file"],
        "{found:?}"
    );
    assert!(
        found.iter().all(|p| p.problem.contains("is a FIFO")),
        "{found:?}"
    );
}

#[test]
fn reload_takes_limits_and_keys_but_not_addresses_or_keys_of_the_relay() {
    let dir = Dir::new("reload");
    let old = dir.parse(&minimal()).unwrap();
    let tighter = dir
        .parse(&(minimal() + "\n[limits]\nmax_sessions = 10\nidle_timeout_secs = 30\n"))
        .unwrap();
    let applied = old.reload_from(tighter).unwrap();
    assert_eq!(applied.limits.max_sessions, 10);
    assert_eq!(applied.limits.idle_timeout, Duration::from_secs(30));
    let reordered = dir
        .parse(&minimal().replace(
            "[relay]\n",
            "[relay]\nlisten = [\"[::]:7000\", \"0.0.0.0:7000\"]\n",
        ))
        .unwrap();
    assert!(old.reload_from(reordered).is_ok());
    let moved = dir
        .parse(&minimal().replace("[relay]\n", "[relay]\nlisten = [\"0.0.0.0:7001\"]\n"))
        .unwrap();
    match old.reload_from(moved) {
        Err(ConfigError::NeedsRestart(fields)) => assert_eq!(fields, ["relay.listen"]),
        other => panic!("expected NeedsRestart, got {other:?}"),
    }
    for limit in [
        "max_clock_skew_secs = 10",
        "max_token_lifetime_secs = 600",
        "ipv6_prefix_len = 48",
    ] {
        let changed = dir
            .parse(&(minimal() + "\n[limits]\n" + limit + "\n"))
            .unwrap();
        let field = format!("limits.{}", limit.split(' ').next().unwrap());
        match old.reload_from(changed) {
            Err(ConfigError::NeedsRestart(fields)) => assert_eq!(fields, [field]),
            other => panic!("expected NeedsRestart for {field}, got {other:?}"),
        }
    }
    // The guard's rates and lists reload; its mode, interfaces and map size do not.
    let xdp = |line: &str| {
        dir.parse(&minimal().replace("[xdp]\n", &format!("[xdp]\n{line}\n")))
            .unwrap()
    };
    let applied = old
        .reload_from(xdp(
            "deny = [\"198.18.0.0/15\"]\ndata_packets_per_second = 10",
        ))
        .unwrap();
    assert_eq!(applied.xdp.deny.len(), 1);
    // So does the fast path's switch.
    let applied = old.reload_from(xdp("fast_path = false")).unwrap();
    assert!(!applied.xdp.fast_path);
    for line in ["mode = \"generic\"", "max_sources = 1000"] {
        match old.reload_from(xdp(line)) {
            Err(ConfigError::NeedsRestart(fields)) => {
                assert_eq!(fields, ["xdp.mode / xdp.interfaces / xdp.max_sources"])
            }
            other => panic!("expected NeedsRestart for {line}, got {other:?}"),
        }
    }
    let other_key = Dir::new("reload-key");
    let rekeyed = other_key.parse(&minimal()).unwrap();
    assert!(matches!(
        old.reload_from(rekeyed),
        Err(ConfigError::NeedsRestart(_))
    ));
}

#[test]
fn the_restart_table_names_documented_fields_and_agrees_with_the_limits_docs() {
    let documented = documented_fields();
    let restart: Vec<&str> = reload::restart_only_names()
        .flat_map(|name| name.split(" / "))
        .collect();
    for field in &restart {
        assert!(
            documented.iter().any(|d| d == field),
            "{field} is not in docs/config.md"
        );
    }
    // In the `[limits]` table, the SIGHUP column says `restart` exactly for these fields.
    let mut in_limits = false;
    let mut rows = 0;
    for line in include_str!("../../../docs/config.md").lines() {
        if line.starts_with("## ") {
            in_limits = line.starts_with("## `[limits]`");
        } else if let (true, Some(row)) = (in_limits, line.strip_prefix("| `")) {
            let field = format!("limits.{}", row.split('`').next().unwrap());
            let sighup = row.split('|').nth(4).unwrap().trim();
            let listed = restart.contains(&field.as_str());
            assert_eq!(
                sighup == "restart",
                listed,
                "{field}: SIGHUP column {sighup:?}"
            );
            rows += 1;
        }
    }
    assert!(rows >= 12, "{rows} rows in the [limits] table");
}

/// `[heartbeat]`: a valid section is read with its key and CA; every wrong field is named,
/// an API key file others may read is refused, and the key never shows in `Debug`.
#[test]
fn the_heartbeat_section_is_checked_and_its_files_read() {
    let dir = Dir::new("heartbeat");
    let ca = rcgen::generate_simple_self_signed(vec!["gateway.test".to_string()]).unwrap();
    std::fs::write(dir.0.join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.0.join("not-a-ca.pem"), "hello").unwrap();
    let key = "fgk1.relay7.c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2Vj";
    let key_file = dir.0.join("hb.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let section = |url: &str, key_file: &str, ca: &str, address: &str, interval: u64| {
        format!(
            "{}\n[heartbeat]\ngateway_url = \"{url}\"\napi_key_file = \"{key_file}\"\n\
             ca_file = \"{ca}\"\naddress = \"{address}\"\ninterval_secs = {interval}\n",
            minimal()
        )
    };
    let cfg = dir
        .parse(&section(
            "https://gateway.test:8443/",
            "hb.key",
            "ca.pem",
            "198.18.0.1:7000",
            5,
        ))
        .unwrap();
    let hb = cfg.heartbeat.expect("heartbeat settings");
    assert_eq!(hb.gateway_url, "https://gateway.test:8443");
    assert_eq!(*hb.api_key, key);
    assert_eq!(hb.address, "198.18.0.1:7000".parse().unwrap());
    assert_eq!(hb.interval, Duration::from_secs(5));
    assert!(!format!("{hb:?}").contains("c2VjcmV0"), "{hb:?}");
    assert!(dir.parse(&minimal()).unwrap().heartbeat.is_none());

    let wrong = fields(dir.parse(&section(
        "http://gateway.test",
        "missing.key",
        "not-a-ca.pem",
        "0.0.0.0:7000",
        0,
    )));
    assert_eq!(
        wrong,
        [
            "heartbeat.gateway_url",
            "heartbeat.address",
            "heartbeat.interval_secs",
            "heartbeat.api_key_file",
            "heartbeat.ca_file"
        ]
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = problems(dir.parse(&section(
        "https://gateway.test",
        "hb.key",
        "ca.pem",
        "198.18.0.1:7000",
        10,
    )));
    assert_eq!(loose.len(), 1, "{loose:?}");
    assert_eq!(loose[0].field, "heartbeat.api_key_file");
    std::fs::write(&key_file, "not a key").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fields(dir.parse(&section(
            "https://gateway.test",
            "hb.key",
            "ca.pem",
            "198.18.0.1:7000",
            10,
        ))),
        ["heartbeat.api_key_file"]
    );
}
