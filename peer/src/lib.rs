//! `ferry-peer`: the endpoint library, built on `ferry-core`. The protocol parts are sans-IO
//! like the core (the caller owns sockets and clocks); the gateway client is async (tokio).
//!
//! - [`bind::BindClient`] claims a slot on a relay with a gateway token and keeps it
//!   (retransmissions, CHALLENGE cookies, keepalives, REBIND after a NAT change, CLOSE).
//! - [`channel::Channel`] runs the end-to-end Noise handshake and transport inside DATA
//!   datagrams, which the relay forwards without being able to read them; its own timers
//!   retransmit the handshake, confirm the keys and re-handshake without dropping the session.
//! - [`gateway::GatewayClient`] asks the gateway over HTTPS (rustls) for a session: create,
//!   join with a join code, renew a slot; its [`gateway::Grant`] holds what binding needs.
//! - [`link::DatagramLink`] is what the file transfer and the tunnel need from a session: an
//!   unreliable message link to the other peer ([`link::memory_pair`] for tests).
//! - [`session::Session`] is the async (tokio) peer an application embeds: it binds, waits for
//!   the other peer, runs the handshake, then renews, recovers, rebinds and closes by itself in
//!   a driver task, and is a [`link::DatagramLink`].
//! - [`transfer::send_file`] and [`transfer::receive_file`] move one file reliably over a
//!   [`link::DatagramLink`]: QUIC (quinn-proto) for retransmission and congestion control, an
//!   end-to-end SHA-256, and a receiver that never overwrites and never leaves a partial file.
//! - [`tunnel`] carries a local UDP application's datagrams over a link, both ways.
//! - [`sizes`] says how large a datagram to the relay may be: by the relay address's family
//!   (IPv6's header is 20 bytes longer than IPv4's), so how large a session's messages are.
//! - [`udp::UdpPeer`] drives a bind client and a channel over a blocking
//!   `std::net::UdpSocket`, for the CLI and tests.

pub mod bind;
pub mod channel;
pub mod gateway;
pub mod link;
pub mod session;
pub mod sizes;
pub mod transfer;
pub mod tunnel;
pub mod udp;
mod udp_batch;
