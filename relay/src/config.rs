//! The relay's config file: one TOML file (`/etc/ferry/relay.toml` by default), parsed
//! strictly (unknown fields are errors) and validated into [`RelayConfig`] before anything is
//! applied. Every field is documented in docs/config.md.
//!
//! - `schema`: the file as written, its sections and defaults.
//! - `validate`: from the file to a [`RelayConfig`], collecting every problem, each naming its
//!   field, so `ferry-relay check-config` shows them all at once ([`parse_str`]).
//! - `reload`: which settings a SIGHUP may change ([`RelayConfig::reload_from`]), as a table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_core::keys::{GatewayPublicKey, RelayStaticKey};
pub use ferry_core::problems::Problem;
use ferry_core::problems::join;
use ferry_core::token::VerifierConfig;
use ferry_keyfile::KeyFileError;

use crate::limits::IpLimits;
use crate::session::SessionLimits;
use crate::worker::SocketBuffers;
use crate::xdp::XdpSettings;

mod reload;
mod schema;
#[cfg(test)]
mod tests;
mod validate;

pub use validate::parse_str;

/// Where the relay looks for its config unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/relay.toml";

/// Why a config could not be loaded or applied.
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
        /// The config file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Values are out of range or inconsistent; every problem found is listed.
    #[error("{path}: {} problem(s):\n  {}", .problems.len(), join(.problems))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Each problem, naming its field.
        problems: Vec<Problem>,
    },
    /// The relay's static key file could not be loaded, and nothing else is wrong (otherwise
    /// its problem is one of [`ConfigError::Invalid`]'s, under `relay.static_key`).
    // Not `#[from]`/`#[source]`: the message already carries the key file's error, and a
    // reporter that prints the source chain (anyhow's `{:#}`) would print it twice.
    #[error("relay.static_key: {0}")]
    Key(KeyFileError),
    /// A reload changed something that only a restart can apply.
    #[error("these changes need a restart of the relay: {}", .0.join(", "))]
    NeedsRestart(Vec<String>),
}

impl From<KeyFileError> for ConfigError {
    fn from(e: KeyFileError) -> Self {
        ConfigError::Key(e)
    }
}

/// The limits an admin tunes; all but three reload on SIGHUP (see `reload`).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Sessions held at once.
    pub max_sessions: usize,
    /// Slots one source IP may hold.
    pub max_bindings_per_ip: u32,
    /// BIND/REBIND per second per source IP.
    pub bind_rate_per_ip: f64,
    /// BIND/REBIND burst per source IP.
    pub bind_burst_per_ip: u32,
    /// Bytes per second a slot gets when its token claims 0.
    pub default_session_rate: u64,
    /// The most bytes per second any slot gets.
    pub max_session_rate: u64,
    /// A slot silent this long is unbound.
    pub idle_timeout: Duration,
    /// Tolerated clock skew on token validity, seconds.
    pub max_clock_skew_secs: u64,
    /// Longest token lifetime accepted, seconds.
    pub max_token_lifetime_secs: u64,
    /// Token ids remembered against replay.
    pub replay_cache_capacity: usize,
    /// Sources tracked by the per-source limits.
    pub tracked_ips: usize,
    /// IPv6 sources share the per-source limits per prefix of this length.
    pub ipv6_prefix_len: u8,
}

/// A validated relay config, ready to apply.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The config file it came from.
    pub path: PathBuf,
    /// The relay id tokens must name.
    pub relay_id: u64,
    /// UDP addresses to serve.
    pub listen: Vec<SocketAddr>,
    /// The static key file.
    pub static_key_path: PathBuf,
    /// The static key (opens slot secrets sealed in tokens).
    pub static_key: RelayStaticKey,
    /// Worker threads (resolved: never 0).
    pub workers: usize,
    /// CPUs to pin workers to, in worker order; empty = one per CPU in order.
    pub cpus: Vec<usize>,
    /// Forward bursts for one peer as UDP GSO sends.
    pub udp_gso: bool,
    /// Receive consecutive datagrams of one sender as one coalesced receive (UDP GRO).
    pub udp_gro: bool,
    /// Forwards of at least this many bytes use SEND_ZC; `None`: off.
    pub send_zc_min_bytes: Option<usize>,
    /// The kernel buffer sizes of each socket.
    pub socket_buffers: SocketBuffers,
    /// Trusted gateway keys by `kid`.
    pub gateway_keys: Vec<(u32, GatewayPublicKey)>,
    /// The limits.
    pub limits: Limits,
    /// The admin listener.
    pub admin_listen: SocketAddr,
    /// The log level.
    pub log_level: String,
    /// The XDP guard.
    pub xdp: XdpSettings,
    /// Heartbeats to a gateway, if `[heartbeat]` is present.
    pub heartbeat: Option<crate::heartbeat::HeartbeatSettings>,
}

pub use ferry_keyfile::MAX_CONFIG_FILE;

/// Reads, parses and validates the config at `path`, and loads its key file. The file must be
/// a regular file of at most [`MAX_CONFIG_FILE`] bytes: a FIFO or a device is refused at once
/// rather than blocking `check-config`, a start or a reload.
pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
    let text =
        ferry_keyfile::read_text_file(path, MAX_CONFIG_FILE).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_str(&text, path, base)
}

/// Most worker threads a relay runs; `workers = 0` on a larger machine means this many.
pub const MAX_WORKERS: usize = 256;

/// Smallest `relay.udp_recv_buffer_bytes` / `udp_send_buffer_bytes`: 64 KiB.
pub const MIN_SOCKET_BUFFER: u64 = 64 << 10;
/// Largest `relay.udp_recv_buffer_bytes` / `udp_send_buffer_bytes`: 1 GiB (the kernel takes
/// at most `INT_MAX / 2`).
pub const MAX_SOCKET_BUFFER: u64 = 1 << 30;

/// Most sources the XDP guard's LRU map may track (about 100 bytes each in the kernel).
pub const MAX_XDP_SOURCES: u64 = 1 << 24;

impl RelayConfig {
    /// The distinct UDP ports the relay listens on: the ports the XDP guard protects.
    pub fn xdp_ports(&self) -> Vec<u16> {
        validate::distinct_ports(&self.listen)
    }

    /// The token verifier's settings.
    pub fn verifier_config(&self) -> VerifierConfig {
        VerifierConfig {
            relay_id: self.relay_id,
            max_skew_secs: self.limits.max_clock_skew_secs,
            max_lifetime_secs: self.limits.max_token_lifetime_secs,
        }
    }

    /// The session tables' limits.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            idle_timeout: self.limits.idle_timeout,
            max_sessions: self.limits.max_sessions,
            replay_cache_capacity: self.limits.replay_cache_capacity,
            default_session_rate: self.limits.default_session_rate,
            max_session_rate: self.limits.max_session_rate,
        }
    }

    /// The per-source-IP limits.
    pub fn ip_limits(&self) -> IpLimits {
        IpLimits {
            bind_rate: self.limits.bind_rate_per_ip,
            bind_burst: self.limits.bind_burst_per_ip,
            max_bindings: self.limits.max_bindings_per_ip,
            capacity: self.limits.tracked_ips,
            ipv6_prefix_len: self.limits.ipv6_prefix_len,
        }
    }

    /// The CPU worker `index` is pinned to: the configured list, else CPU `index` modulo the
    /// CPUs this process may use.
    pub fn cpu_for_worker(&self, index: usize) -> Option<usize> {
        match self.cpus.get(index) {
            Some(&cpu) => Some(cpu),
            None => {
                let online = std::thread::available_parallelism().map_or(1, usize::from);
                Some(index % online)
            }
        }
    }
}
