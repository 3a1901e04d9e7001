//! The gateway's config file: one TOML file (`/etc/ferry/gateway.toml` by default), parsed
//! strictly (unknown fields are errors) and validated into [`GatewayConfig`] before anything is
//! applied, with the same conventions as the relay's (docs/config.md). Every problem found is
//! reported at once, each naming its field, so `ferry-gateway check-config` shows them all.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::keys::{GatewayPublicKey, GatewaySigningKey, RelayPublicKey};
pub use ferry_core::problems::Problem;
use ferry_core::problems::{Check, join};
use ferry_core::token::TokenMinter;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde::Deserialize;

use crate::apikey::{self, KeyHash, Scope, Scopes};
use crate::net::{Cidr, TrustedProxies};
use crate::tls;

/// Where the gateway looks for its config unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/gateway.toml";

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown field or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Values are out of range, inconsistent, or name files that cannot be used; every
    /// problem found is listed.
    #[error("{path}: {} problem(s):\n  {}", .problems.len(), join(.problems))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Each problem, naming its field.
        problems: Vec<Problem>,
    },
    /// A reload changes settings that only a restart applies; nothing was applied.
    #[error(
        "{path}: changes settings that need a restart: {}; restart the gateway to apply them \
         (nothing of this file was applied)",
        .fields.join(", ")
    )]
    NeedsRestart {
        /// The config file.
        path: PathBuf,
        /// The fields (or sections) that changed.
        fields: Vec<String>,
    },
}

// ---- The file, as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: ServerSection,
    tls: Option<TlsSection>,
    signing: SigningSection,
    #[serde(default)]
    sessions: SessionsSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    api_keys: Vec<ApiKeyEntry>,
    #[serde(default)]
    relays: Vec<RelayEntry>,
    #[serde(default)]
    relay_health: RelayHealthSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    state: StateSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    log: LogSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerSection {
    listen: String,
    plain_http: bool,
    max_body_bytes: u64,
    request_timeout_ms: u64,
    header_read_timeout_ms: u64,
    tls_handshake_timeout_ms: u64,
    max_connections: u64,
    max_connections_per_address: u64,
    trusted_proxies: Vec<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".into(),
            plain_http: false,
            max_body_bytes: 16 * 1024,
            request_timeout_ms: 10_000,
            header_read_timeout_ms: 5_000,
            tls_handshake_timeout_ms: 5_000,
            max_connections: 10_000,
            max_connections_per_address: 64,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningSection {
    active_kid: u32,
    #[serde(default)]
    keys: Vec<SigningKeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningKeyEntry {
    kid: u32,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SessionsSection {
    token_lifetime_secs: u64,
    join_code_ttl_secs: u64,
    rate_bytes_per_sec: u64,
    max_session_age_secs: u64,
}

impl Default for SessionsSection {
    fn default() -> Self {
        Self {
            token_lifetime_secs: 300,
            join_code_ttl_secs: 120,
            rate_bytes_per_sec: 0,
            max_session_age_secs: 86_400,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AuthSection {
    key_file: Option<PathBuf>,
    revoked_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    id: String,
    hash: String,
    scopes: Vec<String>,
}

/// An API key file: `[[api_keys]]` tables only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    api_keys: Vec<ApiKeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayEntry {
    id: u64,
    address: String,
    /// The key itself; or, with `public_key_file`, the file `ferry-relay keygen` wrote it to.
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    public_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RelayHealthSection {
    probe: bool,
    interval_secs: u64,
    timeout_ms: u64,
    heartbeat_ttl_secs: u64,
}

impl Default for RelayHealthSection {
    fn default() -> Self {
        Self {
            probe: true,
            interval_secs: 5,
            timeout_ms: 1_000,
            heartbeat_ttl_secs: 30,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    per_ip_rate: f64,
    per_ip_burst: u64,
    per_key_rate: f64,
    per_key_burst: u64,
    tracked_clients: u64,
    ipv6_prefix_len: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            per_ip_rate: 20.0,
            per_ip_burst: 40,
            per_key_rate: 100.0,
            per_key_burst: 200,
            tracked_clients: 100_000,
            ipv6_prefix_len: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StateSection {
    backend: String,
    redis_url: String,
    redis_ca_file: String,
    redis_username: String,
    redis_password_file: String,
    key_prefix: String,
    max_sessions: u64,
}

impl Default for StateSection {
    fn default() -> Self {
        Self {
            backend: "memory".into(),
            redis_url: String::new(),
            redis_ca_file: String::new(),
            redis_username: String::new(),
            redis_password_file: String::new(),
            key_prefix: "ferry:gw:".into(),
            max_sessions: 1_000_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdminSection {
    listen: String,
    allow_non_loopback: bool,
    token_hash: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9478".into(),
            allow_non_loopback: false,
            token_hash: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogSection {
    level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

// ---- The validated config ----

/// How the public listener speaks.
#[derive(Clone, Debug)]
pub enum Transport {
    /// HTTPS with this rustls config.
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP: only on a loopback address, only when `server.plain_http = true`.
    PlainLoopback,
}

/// The public listener's settings.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// TLS or plain loopback HTTP.
    pub transport: Transport,
    /// Whether clients must present a certificate (mTLS).
    pub client_auth: bool,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// A request (headers, body and answer) must finish within this.
    pub request_timeout: Duration,
    /// The request head must arrive within this.
    pub header_read_timeout: Duration,
    /// The TLS handshake must finish within this.
    pub tls_handshake_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one client address (IPv4, or IPv6 /64) may hold open at once.
    pub max_connections_per_address: usize,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
}

/// The signing keys: the one that signs, and every key listed (published to relays).
#[derive(Debug)]
pub struct SigningKeys {
    /// Signs every new token.
    pub active: TokenMinter,
    /// Every listed key by kid, active one included, in file order.
    pub published: Vec<(u32, GatewayPublicKey)>,
}

/// Session and token settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSettings {
    /// `exp − nbf` of each token.
    pub token_lifetime_secs: u64,
    /// How long a join code can be used.
    pub join_code_ttl_secs: u64,
    /// The rate claim of each token (0: the relay's default).
    pub rate_bytes_per_sec: u64,
    /// How long after its creation a session's slots can still be renewed.
    pub max_session_age_secs: u64,
}

/// One API key as configured (its hash, never the key).
#[derive(Clone, Debug)]
pub struct ApiKeyConfig {
    /// The key id.
    pub id: String,
    /// Hash of the secret.
    pub hash: KeyHash,
    /// What the key may do.
    pub scopes: Scopes,
}

/// A relay listed in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRelay {
    /// The relay id tokens name.
    pub id: u64,
    /// Its UDP address, given to peers.
    pub address: SocketAddr,
    /// Its static X25519 key; slot secrets are sealed to it.
    pub public_key: RelayPublicKey,
}

/// Relay health checking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayHealth {
    /// Probe listed relays over UDP.
    pub probe: bool,
    /// Time between probes.
    pub interval: Duration,
    /// A probe without answer within this fails.
    pub timeout: Duration,
    /// A self-registered relay without heartbeat for this long is dropped.
    pub heartbeat_ttl: Duration,
}

/// Request rate limits.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    /// Requests per second per client IP.
    pub per_ip_rate: f64,
    /// Burst per client IP.
    pub per_ip_burst: u32,
    /// Requests per second per API key.
    pub per_key_rate: f64,
    /// Burst per API key.
    pub per_key_burst: u32,
    /// IPs and keys tracked at once, each.
    pub tracked_clients: usize,
    /// IPv6 clients share the per-IP limit per prefix of this length.
    pub ipv6_prefix_len: u8,
}

/// Where the state shared by replicas lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateBackend {
    /// In this process: for a single gateway.
    Memory {
        /// Sessions (and join codes) held at once.
        max_sessions: usize,
    },
    /// A Redis server shared by every replica.
    Redis {
        /// `redis://host:port/db` or `rediss://` (TLS).
        url: String,
        /// Prefix of every key the gateway writes.
        key_prefix: String,
        /// With `rediss://`: the CA certificates (PEM) the server's certificate must chain to;
        /// `None`: the system's roots.
        ca_pem: Option<Vec<u8>>,
        /// The ACL user (`AUTH user password`); `None` with a password: the default user.
        username: Option<String>,
        /// The password, from `redis_password_file`.
        password: Option<RedisPassword>,
    },
}

/// The Redis password, erased from memory when dropped and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(pub zeroize::Zeroizing<String>);

impl fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisPassword(<redacted>)")
    }
}

/// The admin listener.
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Hash of the admin bearer token; `None`: the admin API refuses every request.
    pub token_hash: Option<KeyHash>,
}

/// A validated gateway config.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// The public listener.
    pub server: ServerSettings,
    /// Signing keys.
    pub signing: SigningKeys,
    /// Sessions and tokens.
    pub sessions: SessionSettings,
    /// API keys (from the file and `auth.key_file`).
    pub api_keys: Vec<ApiKeyConfig>,
    /// Key ids refused whatever their secret (`auth.revoked_keys`).
    pub revoked_keys: Vec<String>,
    /// Relays listed in the config.
    pub relays: Vec<StaticRelay>,
    /// Relay health checking.
    pub relay_health: RelayHealth,
    /// Rate limits.
    pub limits: RateLimits,
    /// Shared state.
    pub state: StateBackend,
    /// The admin listener.
    pub admin: AdminSettings,
    /// Log level.
    pub log_level: String,
    /// What is legal but likely wrong (an expired TLS certificate): `check-config` prints
    /// these, and the gateway logs them at start and on a reload.
    pub warnings: Vec<String>,
}

/// The settings only a restart changes, as they were when the gateway started. A reload
/// (SIGHUP) that changes any of them is refused as a whole; everything else — API keys and
/// revocations, relays, limits, trusted proxies, session settings, signing keys, the TLS
/// certificate, key and client CA, the admin token — applies live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartSettings(Vec<(&'static str, String)>);

impl GatewayConfig {
    /// The settings of this config that only a restart changes.
    pub fn restart_settings(&self) -> RestartSettings {
        let s = &self.server;
        let transport = match s.transport {
            Transport::Tls(_) => "https",
            Transport::PlainLoopback => "plain",
        };
        RestartSettings(vec![
            ("server.listen", s.listen.to_string()),
            ("server.plain_http / [tls]", transport.to_string()),
            ("server.max_body_bytes", s.max_body_bytes.to_string()),
            (
                "server.request_timeout_ms",
                format!("{:?}", s.request_timeout),
            ),
            (
                "server.header_read_timeout_ms",
                format!("{:?}", s.header_read_timeout),
            ),
            (
                "server.tls_handshake_timeout_ms",
                format!("{:?}", s.tls_handshake_timeout),
            ),
            ("server.max_connections", s.max_connections.to_string()),
            (
                "server.max_connections_per_address",
                s.max_connections_per_address.to_string(),
            ),
            ("[relay_health]", format!("{:?}", self.relay_health)),
            ("[state]", format!("{:?}", self.state)),
            ("admin.listen", self.admin.listen.to_string()),
            ("log.level", self.log_level.clone()),
        ])
    }
}

impl RestartSettings {
    /// `new` if it changes none of these settings, else [`ConfigError::NeedsRestart`] naming
    /// every one it changes.
    pub fn check_reload(&self, new: GatewayConfig) -> Result<GatewayConfig, ConfigError> {
        let theirs = new.restart_settings();
        let changed: Vec<String> = self
            .0
            .iter()
            .zip(&theirs.0)
            .filter(|(a, b)| a != b)
            .map(|((field, _), _)| (*field).to_string())
            .collect();
        match changed.is_empty() {
            true => Ok(new),
            false => Err(ConfigError::NeedsRestart {
                path: new.path,
                fields: changed,
            }),
        }
    }
}

fn clamp(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Reads, parses and validates the config at `path`, and loads every file it names.
pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
    let text = read_text(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_str(&text, path, base)
}

/// Reads the whole text of `path`, which must be a regular file: a FIFO, a directory, a device
/// or a socket is refused at once, naming what it is ([`ferry_keyfile::open_regular_file`]),
/// where the open of a FIFO would wait for a writer forever; so is a file longer than
/// [`ferry_keyfile::MAX_CONFIG_FILE`].
pub fn read_text(path: &Path) -> std::io::Result<zeroize::Zeroizing<String>> {
    ferry_keyfile::read_text_file(path, ferry_keyfile::MAX_CONFIG_FILE)
}

/// Reads the whole of `path`, a regular file, as [`read_text`] does, as bytes.
fn read_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    Ok(read_text(path)?.as_bytes().to_vec())
}

/// Parses and validates config `text` (named `path` in messages); relative paths are
/// resolved against `base_dir`.
pub fn parse_str(text: &str, path: &Path, base_dir: &Path) -> Result<GatewayConfig, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut check = Check::default();
    let mut warnings = Vec::new();
    let server = validate_server(
        &file.server,
        file.tls.as_ref(),
        base_dir,
        &mut check,
        &mut warnings,
    );
    let signing = validate_signing(&file.signing, base_dir, &mut check);
    let sessions = validate_sessions(&file.sessions, &mut check);
    let mut api_keys = validate_api_keys(&file.api_keys, "api_keys", &mut check);
    if let Some(key_file) = &file.auth.key_file {
        let key_path = base_dir.join(key_file);
        match read_text(&key_path) {
            Err(e) => check.fail("auth.key_file", format!("{}: {e}", key_path.display())),
            Ok(text) => match toml::from_str::<KeyFile>(&text) {
                Err(e) => check.fail("auth.key_file", format!("{}: {e}", key_path.display())),
                Ok(keys) => {
                    let prefix = format!("auth.key_file {}: api_keys", key_path.display());
                    for key in validate_api_keys(&keys.api_keys, &prefix, &mut check) {
                        if api_keys.iter().any(|k| k.id == key.id) {
                            check.fail(
                                "auth.key_file",
                                format!("key id {:?} is also in the config file", key.id),
                            );
                        } else {
                            api_keys.push(key);
                        }
                    }
                }
            },
        }
    }
    let revoked_keys = validate_revoked(&file.auth.revoked_keys, &mut check);
    let relays = validate_relays(&file.relays, base_dir, &mut check);
    let relay_health = validate_relay_health(&file.relay_health, &mut check);
    let limits = validate_limits(&file.limits, &mut check);
    let state = validate_state(&file.state, base_dir, &mut check);
    let admin = validate_admin(&file.admin, &mut check);
    // Beyond loopback the admin listener serves HTTPS with the server's certificate: the
    // admin token must not cross a network in clear.
    if !admin.listen.ip().to_canonical().is_loopback()
        && matches!(
            server.as_ref().map(|s| &s.transport),
            Some(Transport::PlainLoopback)
        )
    {
        check.fail(
            "admin.listen",
            format!(
                "{} is not a loopback address, and beyond loopback the admin listener needs \
                 TLS (it serves HTTPS with the [tls] certificate): configure [tls]",
                admin.listen
            ),
        );
    }
    if !["error", "warn", "info", "debug", "trace"].contains(&file.log.level.as_str()) {
        check.fail(
            "log.level",
            format!(
                "must be one of error, warn, info, debug, trace; got {:?}",
                file.log.level
            ),
        );
    }
    match (server, signing) {
        (Some(server), Some(signing)) if check.problems.is_empty() => Ok(GatewayConfig {
            path: path.to_owned(),
            server,
            signing,
            sessions,
            api_keys,
            revoked_keys,
            relays,
            relay_health,
            limits,
            state,
            admin,
            log_level: file.log.level,
            warnings,
        }),
        _ => Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems: check.problems,
        }),
    }
}

fn validate_server(
    s: &ServerSection,
    tls_section: Option<&TlsSection>,
    base_dir: &Path,
    check: &mut Check,
    warnings: &mut Vec<String>,
) -> Option<ServerSettings> {
    let listen = match SocketAddr::from_str(&s.listen) {
        Ok(addr) => Some(addr),
        Err(_) => {
            check.fail(
                "server.listen",
                format!("{:?} is not an address like 0.0.0.0:8443", s.listen),
            );
            None
        }
    };
    check.range("server.max_body_bytes", s.max_body_bytes, 256, 1 << 20);
    check.range(
        "server.request_timeout_ms",
        s.request_timeout_ms,
        100,
        120_000,
    );
    check.range(
        "server.header_read_timeout_ms",
        s.header_read_timeout_ms,
        100,
        60_000,
    );
    check.range(
        "server.tls_handshake_timeout_ms",
        s.tls_handshake_timeout_ms,
        100,
        60_000,
    );
    check.range("server.max_connections", s.max_connections, 1, 1_000_000);
    check.range(
        "server.max_connections_per_address",
        s.max_connections_per_address,
        1,
        1_000_000,
    );
    let trusted_proxies = validate_cidrs(&s.trusted_proxies, "server.trusted_proxies", check);
    let (transport, client_auth) = match (s.plain_http, tls_section) {
        (true, Some(_)) => {
            check.fail(
                "server.plain_http",
                "is true but a [tls] section is given: choose one (plain HTTP serves loopback only)",
            );
            (None, false)
        }
        (true, None) => {
            if let Some(addr) = listen
                && !addr.ip().to_canonical().is_loopback()
            {
                check.fail(
                    "server.plain_http",
                    format!(
                        "plain HTTP is only served on a loopback address, and server.listen is {addr}; \
                         configure [tls] to serve other addresses"
                    ),
                );
            }
            (Some(Transport::PlainLoopback), false)
        }
        (false, None) => {
            check.fail(
                "tls",
                "missing: HTTPS needs [tls] cert and key (plain HTTP only with server.plain_http = true on loopback)",
            );
            (None, false)
        }
        (false, Some(t)) => {
            let ca = t.client_ca.as_ref().map(|p| base_dir.join(p));
            let cert = base_dir.join(&t.cert);
            match tls::server_config(&cert, &base_dir.join(&t.key), ca.as_deref()) {
                Ok(tls) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                    if let Some(warning) = tls.warning(&cert, now) {
                        warnings.push(format!("tls.cert: {warning}"));
                    }
                    (Some(Transport::Tls(tls.config)), ca.is_some())
                }
                Err(e) => {
                    let field = match &e {
                        tls::TlsError::InsecurePermissions { .. }
                        | tls::TlsError::UnsupportedKey { .. } => "tls.key",
                        tls::TlsError::Io { path, .. } | tls::TlsError::Pem { path, .. }
                            if Some(path) == ca.as_ref() =>
                        {
                            "tls.client_ca"
                        }
                        tls::TlsError::Io { path, .. } | tls::TlsError::Pem { path, .. }
                            if *path == base_dir.join(&t.key) =>
                        {
                            "tls.key"
                        }
                        tls::TlsError::Io { .. } | tls::TlsError::Pem { .. } => "tls.cert",
                        _ => "tls",
                    };
                    check.fail(field, e.to_string());
                    (None, false)
                }
            }
        }
    };
    Some(ServerSettings {
        listen: listen?,
        transport: transport?,
        client_auth,
        max_body_bytes: clamp(s.max_body_bytes),
        request_timeout: Duration::from_millis(s.request_timeout_ms),
        header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
        tls_handshake_timeout: Duration::from_millis(s.tls_handshake_timeout_ms),
        max_connections: clamp(s.max_connections),
        max_connections_per_address: clamp(s.max_connections_per_address),
        trusted_proxies: TrustedProxies::new(trusted_proxies),
    })
}

fn validate_signing(s: &SigningSection, base_dir: &Path, check: &mut Check) -> Option<SigningKeys> {
    if s.keys.is_empty() {
        check.fail(
            "signing.keys",
            "needs at least one [[signing.keys]] entry (kid and key_file from `ferry-gateway keygen`)",
        );
    }
    let mut published = Vec::new();
    let mut active = None;
    for (i, entry) in s.keys.iter().enumerate() {
        if published.iter().any(|(kid, _)| *kid == entry.kid) {
            check.fail(
                format!("signing.keys[{i}].kid"),
                format!("kid {} is listed twice", entry.kid),
            );
            continue;
        }
        match ferry_keyfile::load_secret_file::<GatewaySigningKey>(&base_dir.join(&entry.key_file))
        {
            Ok(key) => {
                published.push((entry.kid, key.public()));
                if entry.kid == s.active_kid {
                    active = Some(TokenMinter::new(entry.kid, key));
                }
            }
            Err(e) => check.fail(format!("signing.keys[{i}].key_file"), e.to_string()),
        }
    }
    if !s.keys.is_empty() && !s.keys.iter().any(|k| k.kid == s.active_kid) {
        check.fail(
            "signing.active_kid",
            format!(
                "kid {} is not one of the [[signing.keys]] listed",
                s.active_kid
            ),
        );
    }
    Some(SigningKeys {
        active: active?,
        published,
    })
}

fn validate_sessions(s: &SessionsSection, check: &mut Check) -> SessionSettings {
    check.range(
        "sessions.token_lifetime_secs",
        s.token_lifetime_secs,
        30,
        3600,
    );
    check.range(
        "sessions.join_code_ttl_secs",
        s.join_code_ttl_secs,
        10,
        3600,
    );
    if s.rate_bytes_per_sec != 0 && !(1500..=100_000_000_000).contains(&s.rate_bytes_per_sec) {
        check.fail(
            "sessions.rate_bytes_per_sec",
            format!(
                "must be 0 (the relay's default_session_rate) or between 1500 and \
                 100000000000, got {}",
                s.rate_bytes_per_sec
            ),
        );
    }
    check.range(
        "sessions.max_session_age_secs",
        s.max_session_age_secs,
        1,
        31_536_000,
    );
    SessionSettings {
        token_lifetime_secs: s.token_lifetime_secs,
        join_code_ttl_secs: s.join_code_ttl_secs,
        rate_bytes_per_sec: s.rate_bytes_per_sec,
        max_session_age_secs: s.max_session_age_secs,
    }
}

fn validate_api_keys(
    entries: &[ApiKeyEntry],
    prefix: &str,
    check: &mut Check,
) -> Vec<ApiKeyConfig> {
    let mut out: Vec<ApiKeyConfig> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let field = |name: &str| format!("{prefix}[{i}].{name}");
        let mut ok = true;
        if !apikey::valid_id(&entry.id) {
            check.fail(field("id"), apikey::ApiKeyError::Id.to_string());
            ok = false;
        } else if out.iter().any(|k| k.id == entry.id) {
            check.fail(
                field("id"),
                format!("key id {:?} is listed twice", entry.id),
            );
            ok = false;
        }
        let hash = KeyHash::from_str(&entry.hash);
        if let Err(e) = &hash {
            check.fail(field("hash"), e.to_string());
        }
        if entry.scopes.is_empty() {
            check.fail(field("scopes"), "needs at least one scope");
        }
        let mut scopes = Vec::new();
        for (j, text) in entry.scopes.iter().enumerate() {
            match Scope::from_str(text) {
                Ok(scope) => scopes.push(scope),
                Err(e) => check.fail(format!("{prefix}[{i}].scopes[{j}]"), e.to_string()),
            }
        }
        if let (true, Ok(hash)) = (ok, hash) {
            out.push(ApiKeyConfig {
                id: entry.id.clone(),
                hash,
                scopes: Scopes(scopes),
            });
        }
    }
    out
}

/// Most entries in `server.trusted_proxies`.
pub const MAX_TRUSTED_PROXIES: usize = 1024;

fn validate_cidrs(entries: &[String], field: &str, check: &mut Check) -> Vec<Cidr> {
    if entries.len() > MAX_TRUSTED_PROXIES {
        check.fail(
            field,
            format!(
                "at most {MAX_TRUSTED_PROXIES} entries, got {}",
                entries.len()
            ),
        );
    }
    check.cidrs(field, entries)
}

fn validate_revoked(entries: &[String], check: &mut Check) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, id) in entries.iter().enumerate() {
        if !apikey::valid_id(id) {
            check.fail(
                format!("auth.revoked_keys[{i}]"),
                apikey::ApiKeyError::Id.to_string(),
            );
        } else if out.contains(id) {
            check.fail(
                format!("auth.revoked_keys[{i}]"),
                format!("key id {id:?} is listed twice"),
            );
        } else {
            out.push(id.clone());
        }
    }
    out
}

fn validate_relays(entries: &[RelayEntry], base_dir: &Path, check: &mut Check) -> Vec<StaticRelay> {
    let mut out: Vec<StaticRelay> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if entry.id == 0 {
            check.fail(format!("relays[{i}].id"), "must not be 0");
            continue;
        }
        if out.iter().any(|r| r.id == entry.id) {
            check.fail(
                format!("relays[{i}].id"),
                format!("relay id {} is listed twice", entry.id),
            );
            continue;
        }
        let address = match SocketAddr::from_str(&entry.address) {
            Ok(addr) if addr.port() != 0 && !addr.ip().is_unspecified() => Some(addr),
            _ => {
                check.fail(
                    format!("relays[{i}].address"),
                    format!(
                        "{:?} is not the relay's public UDP address like 198.51.100.7:7000",
                        entry.address
                    ),
                );
                None
            }
        };
        let public_key = match (&entry.public_key, &entry.public_key_file) {
            (Some(text), None) => match RelayPublicKey::from_str(text.trim()) {
                Ok(key) => Some(key),
                Err(e) => {
                    check.fail(format!("relays[{i}].public_key"), e.to_string());
                    None
                }
            },
            (None, Some(file)) => {
                let path = base_dir.join(file);
                match ferry_keyfile::load_public_file::<RelayPublicKey>(&path) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        check.fail(format!("relays[{i}].public_key_file"), e.to_string());
                        None
                    }
                }
            }
            _ => {
                check.fail(
                    format!("relays[{i}]"),
                    "needs exactly one of public_key and public_key_file",
                );
                None
            }
        };
        if let (Some(address), Some(public_key)) = (address, public_key) {
            out.push(StaticRelay {
                id: entry.id,
                address,
                public_key,
            });
        }
    }
    out
}

fn validate_relay_health(s: &RelayHealthSection, check: &mut Check) -> RelayHealth {
    check.range("relay_health.interval_secs", s.interval_secs, 1, 300);
    check.range("relay_health.timeout_ms", s.timeout_ms, 50, 10_000);
    check.range(
        "relay_health.heartbeat_ttl_secs",
        s.heartbeat_ttl_secs,
        5,
        600,
    );
    RelayHealth {
        probe: s.probe,
        interval: Duration::from_secs(s.interval_secs),
        timeout: Duration::from_millis(s.timeout_ms),
        heartbeat_ttl: Duration::from_secs(s.heartbeat_ttl_secs),
    }
}

fn validate_limits(l: &LimitsSection, check: &mut Check) -> RateLimits {
    check.rate("limits.per_ip_rate", l.per_ip_rate);
    check.range("limits.per_ip_burst", l.per_ip_burst, 1, 1_000_000);
    check.rate("limits.per_key_rate", l.per_key_rate);
    check.range("limits.per_key_burst", l.per_key_burst, 1, 1_000_000);
    check.range(
        "limits.tracked_clients",
        l.tracked_clients,
        1000,
        10_000_000,
    );
    check.range("limits.ipv6_prefix_len", l.ipv6_prefix_len, 8, 128);
    RateLimits {
        per_ip_rate: l.per_ip_rate,
        per_ip_burst: u32::try_from(l.per_ip_burst).unwrap_or(u32::MAX),
        per_key_rate: l.per_key_rate,
        per_key_burst: u32::try_from(l.per_key_burst).unwrap_or(u32::MAX),
        tracked_clients: clamp(l.tracked_clients),
        ipv6_prefix_len: u8::try_from(l.ipv6_prefix_len).unwrap_or(128),
    }
}

/// The `user:password@host:port` part of a URL, or empty.
fn url_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

fn validate_state(s: &StateSection, base: &Path, check: &mut Check) -> StateBackend {
    check.range("state.max_sessions", s.max_sessions, 1000, 100_000_000);
    match s.backend.as_str() {
        "memory" => {
            for (field, value) in [
                ("state.redis_url", &s.redis_url),
                ("state.redis_ca_file", &s.redis_ca_file),
                ("state.redis_username", &s.redis_username),
                ("state.redis_password_file", &s.redis_password_file),
            ] {
                if !value.is_empty() {
                    check.fail(
                        field,
                        "is set but state.backend is \"memory\"; set backend = \"redis\" or remove it",
                    );
                }
            }
        }
        "redis" => {
            let url_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|p| s.redis_url.starts_with(p));
            if !url_ok {
                check.fail(
                    "state.redis_url",
                    format!(
                        "{:?} is not a URL like redis://127.0.0.1:6379/0 (needed with backend = \"redis\")",
                        s.redis_url
                    ),
                );
            }
            if url_authority(&s.redis_url).contains('@') {
                check.fail(
                    "state.redis_url",
                    "must not carry a user or password: put them in state.redis_username and \
                     state.redis_password_file (a file only its owner may read)",
                );
            }
            if !s.redis_ca_file.is_empty() && !s.redis_url.starts_with("rediss://") {
                check.fail(
                    "state.redis_ca_file",
                    "is only used with TLS: a redis_url starting with rediss://",
                );
            }
            if !s.redis_username.is_empty() && s.redis_password_file.is_empty() {
                check.fail(
                    "state.redis_username",
                    "needs state.redis_password_file (AUTH takes a user and its password)",
                );
            }
        }
        other => check.fail(
            "state.backend",
            format!("must be \"memory\" or \"redis\", got {other:?}"),
        ),
    }
    if s.key_prefix.is_empty()
        || s.key_prefix.len() > 64
        || !s.key_prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        check.fail(
            "state.key_prefix",
            "must be 1 to 64 printable characters without spaces",
        );
    }
    let (mut ca_pem, mut password) = (None, None);
    if s.backend == "redis" {
        if !s.redis_ca_file.is_empty() {
            let path = base.join(&s.redis_ca_file);
            match read_bytes(&path) {
                Ok(pem) if CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok()) => {
                    ca_pem = Some(pem)
                }
                Ok(_) => check.fail(
                    "state.redis_ca_file",
                    format!("{} holds no PEM certificate", path.display()),
                ),
                Err(e) => check.fail("state.redis_ca_file", format!("{}: {e}", path.display())),
            }
        }
        if !s.redis_password_file.is_empty() {
            match ferry_keyfile::load_secret_text(&base.join(&s.redis_password_file)) {
                Ok(text) if !text.trim().is_empty() => {
                    password = Some(RedisPassword(zeroize::Zeroizing::new(
                        text.trim_end_matches(['\r', '\n']).to_string(),
                    )))
                }
                Ok(_) => check.fail("state.redis_password_file", "the file is empty"),
                Err(e) => check.fail("state.redis_password_file", e.to_string()),
            }
        }
    }
    match s.backend.as_str() {
        "redis" => StateBackend::Redis {
            url: s.redis_url.clone(),
            key_prefix: s.key_prefix.clone(),
            ca_pem,
            username: (!s.redis_username.is_empty()).then(|| s.redis_username.clone()),
            password,
        },
        _ => StateBackend::Memory {
            max_sessions: clamp(s.max_sessions),
        },
    }
}

fn validate_admin(a: &AdminSection, check: &mut Check) -> AdminSettings {
    let fallback = SocketAddr::from(([127, 0, 0, 1], 9478));
    let listen = match SocketAddr::from_str(&a.listen) {
        Ok(addr) if !addr.ip().to_canonical().is_loopback() && !a.allow_non_loopback => {
            check.fail(
                "admin.listen",
                format!(
                    "{addr} is not a loopback address; the admin listener can revoke keys, so set \
                     admin.allow_non_loopback = true to serve it elsewhere"
                ),
            );
            fallback
        }
        Ok(addr) => addr,
        Err(_) => {
            check.fail(
                "admin.listen",
                format!("{:?} is not an address like 127.0.0.1:9478", a.listen),
            );
            fallback
        }
    };
    let token_hash = match a.token_hash.as_str() {
        "" => None,
        text => match KeyHash::from_str(text) {
            Ok(hash) => Some(hash),
            Err(e) => {
                check.fail("admin.token_hash", e.to_string());
                None
            }
        },
    };
    AdminSettings { listen, token_hash }
}

#[cfg(test)]
mod tests;
