//! The application the handlers share ([`App`]) and the settings a config reload swaps
//! whole.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_core::token::TokenMinter;
use ring::rand::SystemRandom;

use crate::apikey::{self, KeyHash};
use crate::config::{ApiKeyConfig, GatewayConfig, SessionSettings};
use crate::metrics::Metrics;
use crate::net::TrustedProxies;
use crate::ratelimit::RateLimiter;
use crate::registry::Registry;
use crate::state::State;

/// What a config reload replaces. It is swapped whole, so a request sees the old settings or
/// the new ones, never a mix.
#[derive(Debug)]
pub(super) struct Live {
    pub(super) minter: TokenMinter,
    pub(super) sessions: SessionSettings,
    pub(super) api_keys: HashMap<String, ApiKeyConfig>,
    pub(super) revoked: HashSet<String>,
    pub(super) admin_token: Option<KeyHash>,
    pub(super) trusted_proxies: TrustedProxies,
    pub(super) ipv6_prefix_len: u8,
}

impl Live {
    fn of(config: GatewayConfig) -> Self {
        Self {
            minter: config.signing.active,
            sessions: config.sessions,
            api_keys: config
                .api_keys
                .into_iter()
                .map(|k| (k.id.clone(), k))
                .collect(),
            revoked: config.revoked_keys.into_iter().collect(),
            admin_token: config.admin.token_hash,
            trusted_proxies: config.server.trusted_proxies,
            ipv6_prefix_len: config.limits.ipv6_prefix_len,
        }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    live: RwLock<Arc<Live>>,
    pub(super) heartbeat_ttl: Duration,
    pub(super) max_body_bytes: usize,
    pub(super) request_timeout: Duration,
    pub(super) state: Arc<dyn State>,
    pub(super) registry: Arc<Registry>,
    pub(super) ip_limiter: RateLimiter<IpAddr>,
    pub(super) key_limiter: RateLimiter<String>,
    /// The gateway's counters.
    pub metrics: Arc<Metrics>,
    pub(super) rng: SystemRandom,
    /// Hash compared against when a key id is unknown, so that both failures take as long.
    pub(super) dummy_hash: KeyHash,
}

impl App {
    /// The application for `config`, sharing `state`, `registry` and `metrics`. Takes the
    /// signing key out of the config.
    pub fn new(
        config: GatewayConfig,
        state: Arc<dyn State>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, apikey::ApiKeyError> {
        let rng = SystemRandom::new();
        let dummy_hash = apikey::generate(&rng, "unknown")?.hash;
        let limits = config.limits.clone();
        Ok(Self {
            heartbeat_ttl: config.relay_health.heartbeat_ttl,
            max_body_bytes: config.server.max_body_bytes,
            request_timeout: config.server.request_timeout,
            live: RwLock::new(Arc::new(Live::of(config))),
            state,
            registry,
            ip_limiter: RateLimiter::new(
                limits.per_ip_rate,
                limits.per_ip_burst,
                limits.tracked_clients,
            ),
            key_limiter: RateLimiter::new(
                limits.per_key_rate,
                limits.per_key_burst,
                limits.tracked_clients,
            ),
            metrics,
            rng,
            dummy_hash,
        })
    }

    /// The settings in force now.
    /// Probes every relay once with the active signing key ([`Registry::probe_round`]).
    pub async fn probe_relays(
        &self,
        lines: &mut crate::registry::ProbeLines,
        timeout: Duration,
    ) -> usize {
        let live = self.live();
        let now = super::handlers::now();
        self.registry
            .probe_round(&*self.state, &self.rng, &live.minter, lines, now, timeout)
            .await
    }

    pub(super) fn live(&self) -> Arc<Live> {
        Arc::clone(
            &self
                .live
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Applies a reloaded config: API keys and revocations, the admin token, signing keys,
    /// session settings, trusted proxies, rate limits and the listed relays. `config` must
    /// have passed [`crate::config::RestartSettings::check_reload`]: what only a restart
    /// changes is not looked at here.
    pub fn reload(&self, config: GatewayConfig) {
        let limits = &config.limits;
        self.ip_limiter.set_limits(
            limits.per_ip_rate,
            limits.per_ip_burst,
            limits.tracked_clients,
        );
        self.key_limiter.set_limits(
            limits.per_key_rate,
            limits.per_key_burst,
            limits.tracked_clients,
        );
        self.registry.set_listed(&config.relays);
        let live = Arc::new(Live::of(config));
        *self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = live;
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<dyn State> {
        &self.state
    }
}

/// The handlers' state: the application, shared.
pub(super) type Shared = Arc<App>;
