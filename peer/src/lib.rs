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
//! - [`tunnel`] carries a local UDP application's datagrams over a link, both ways.
//! - [`udp::UdpPeer`] drives a bind client and a channel over a blocking `std::net::UdpSocket`, for the CLI and tests.

pub mod bind;
pub mod channel;
pub mod gateway;
pub mod link;
pub mod tunnel;
pub mod udp;
