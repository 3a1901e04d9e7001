//! `ferry-gateway` (gateway-lite): the internet-facing control plane of Ferry. It
//! authenticates clients by API key, picks a healthy relay, and mints relay tokens with
//! [`ferry_core::token::TokenMinter`]. It keeps no state of its own that replicas must agree
//! on beyond what lives behind [`state::State`], so several replicas can run side by side
//! behind any load balancer.
//!
//! From `main.rs`, a request travels [`server`] (listeners, TLS, timeouts) → [`api`] (routes,
//! authentication, handlers, audit log) → [`state`] and [`registry`].
//!
//! - [`config`]: the strict TOML config (`ferry-gateway check-config`).
//! - [`apikey`]: API keys, their stored hashes and scopes.
//! - [`tls`]: the rustls server configuration (ring provider only).
//! - [`state`]: what replicas share (join codes, revocations, relay reports), in memory or
//!   in Redis ([`redis_state`]).
//! - [`registry`]: listed and self-registered relays, their health and load.
//! - [`ratelimit`], [`metrics`]: token buckets; the Prometheus page.
//! - [`net`]: CIDR prefixes, the client IP behind trusted proxies, per-IPv6-prefix limit keys.
#![forbid(unsafe_code)]

pub mod api;
pub mod apikey;
pub mod config;
pub mod linger;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod redis_state;
pub mod registry;
pub mod server;
pub mod state;
pub mod tls;
