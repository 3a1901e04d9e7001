//! Which settings a reload (SIGHUP) may change: everything but the rows of [`RESTART_ONLY`].

use super::{ConfigError, RelayConfig};

/// A setting only a restart applies: the name a refused reload gives it, and its value as
/// compared (two configs differ in the setting when the strings differ).
type RestartOnly = (&'static str, fn(&RelayConfig) -> String);

/// The settings only a restart changes. Everything else reloads live: `[[gateway_keys]]`, the
/// `[limits]` not listed here, and the XDP guard's rates, lists and fragment policy.
const RESTART_ONLY: &[RestartOnly] = &[
    ("relay.id", |c| c.relay_id.to_string()),
    // The same addresses in another order are no change.
    ("relay.listen", |c| {
        let mut listen = c.listen.clone();
        listen.sort_unstable();
        format!("{listen:?}")
    }),
    ("relay.static_key", |c| c.static_key.public().to_string()),
    ("relay.workers / relay.cpus", |c| {
        format!("{} {:?}", c.workers, c.cpus)
    }),
    (
        "relay.udp_gso / relay.udp_gro / relay.send_zc_min_bytes",
        |c| format!("{} {} {:?}", c.udp_gso, c.udp_gro, c.send_zc_min_bytes),
    ),
    (
        "relay.udp_recv_buffer_bytes / relay.udp_send_buffer_bytes",
        |c| format!("{:?}", c.socket_buffers),
    ),
    // The token verifier's settings, fixed when the session tables are built.
    ("limits.max_clock_skew_secs", |c| {
        c.limits.max_clock_skew_secs.to_string()
    }),
    ("limits.max_token_lifetime_secs", |c| {
        c.limits.max_token_lifetime_secs.to_string()
    }),
    // The per-source binding counts are keyed by it.
    ("limits.ipv6_prefix_len", |c| {
        c.limits.ipv6_prefix_len.to_string()
    }),
    ("admin.listen", |c| c.admin_listen.to_string()),
    ("log.level", |c| c.log_level.clone()),
    // The heartbeat thread is started once, with its client.
    (
        "heartbeat.gateway_url / heartbeat.api_key_file / heartbeat.ca_file / \
         heartbeat.address / heartbeat.interval_secs",
        |c| format!("{:?}", c.heartbeat),
    ),
    ("xdp.mode / xdp.interfaces / xdp.max_sources", |c| {
        format!(
            "{:?} {:?} {}",
            c.xdp.mode, c.xdp.interfaces, c.xdp.max_sources
        )
    }),
];

impl RelayConfig {
    /// Checks that `new` (a freshly loaded file) changes only what SIGHUP can apply —
    /// `[[gateway_keys]]`, the `[limits]` that [`Self::session_limits`] and
    /// [`Self::ip_limits`] carry, and the XDP guard's rates, lists and fragment policy — and
    /// returns it; otherwise lists every restart-only setting it changes, and the
    /// running config stays in force.
    ///
    /// A new `replay_cache_capacity` is accepted (it still bounds `max_sessions`) but the
    /// running cache keeps its size until the relay restarts.
    pub fn reload_from(&self, new: RelayConfig) -> Result<RelayConfig, ConfigError> {
        let restart: Vec<String> = RESTART_ONLY
            .iter()
            .filter(|(_, value)| value(self) != value(&new))
            .map(|(name, _)| (*name).to_string())
            .collect();
        match restart.is_empty() {
            true => Ok(new),
            false => Err(ConfigError::NeedsRestart(restart)),
        }
    }
}

#[cfg(test)]
pub(super) fn restart_only_names() -> impl Iterator<Item = &'static str> {
    RESTART_ONLY.iter().map(|(name, _)| *name)
}
