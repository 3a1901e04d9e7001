//! `ferry-gateway` (gateway-lite): the internet-facing control plane of Ferry. It
//! authenticates clients by API key, picks a healthy relay, and mints relay tokens with
//! [`ferry_core::token::TokenMinter`]. It keeps no state of its own that replicas must agree
//! on beyond what lives behind [`state::State`], so several replicas can run side by side.
//!
//! - [`config`]: the strict TOML config (`ferry-gateway check-config`).
//! - [`apikey`]: API keys, their stored hashes and scopes.
//! - [`tls`]: the rustls server configuration (ring provider only).
//! - [`state`]: what replicas share (join codes, revocations, relay reports), in memory or Redis.
#![forbid(unsafe_code)]

pub mod apikey;
pub mod config;
pub mod state;
pub mod tls;
