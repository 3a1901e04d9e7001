//! `ferry-core`: the sans-IO heart of Ferry, shared by the relay, the gateway, the peers and the
//! bench.
//!
//! What it does **not** do: open sockets or files, spawn threads, or read the clock. Time is
//! always a parameter (`now`), and randomness for keys, token ids and slot secrets comes from
//! the caller's [`ring::rand::SecureRandom`], so every state machine here runs the same way in a
//! unit test as in production. (One exception: `snow` draws the Noise handshake's ephemeral keys
//! from the operating system itself.) Key files and the known-peers file are read and written
//! by the `ferry-keyfile` crate; this crate only parses and formats their text.
//!
//! The modules, most of them the implementation of a section of `docs/protocol.md`:
//!
//! - [`wire`]: parse relay-layer datagrams by `(type, len)` into borrowed views; encode into
//!   caller buffers. The stateless header rules live in [`ferry_common::header`], shared with XDP.
//! - [`token`]: relay tokens minted by a gateway ([`token::TokenMinter`]) and verified by a relay
//!   ([`token::TokenVerifier`]), with [`seal`] sealing each slot secret to the relay's key.
//! - [`proof`]: slot proofs, relay MACs and stateless address cookies.
//! - [`noise`]: the peers' end-to-end `Noise_XX_25519_ChaChaPoly_BLAKE2s` handshake and transport
//!   with explicit counters, a replay window and rekeying; [`known_peers`]: the names and keys
//!   a peer trusts on first use, and the text of the file that holds them.
//! - [`keys`]: the key types of relays, gateways and peers, and the text of their key files.
//! - [`time`]: [`time::UnixTime`], wall-clock time as a value passed in by the caller.
//! - [`problems`] and [`cidr`]: config validation that names every bad field, and IP prefixes,
//!   shared by the relay's and the gateway's config files.
//! - [`ratelimit`]: token buckets and a bounded table of them keyed by client, shared by the
//!   relay's per-source bind limits and the gateway's request limits.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod error_line;
pub mod keys;
pub mod known_peers;
pub mod noise;
pub mod problems;
pub mod proof;
pub mod ratelimit;
pub mod seal;
pub mod time;
pub mod token;
pub mod wire;
