//! `ferry-peer`: the endpoint library, built on `ferry-core`. Sans-IO like the core: the
//! caller owns sockets and clocks.
//!
//! - [`bind::BindClient`] claims a slot on a relay with a gateway token and keeps it
//!   (retransmissions, CHALLENGE cookies, keepalives, REBIND after a NAT change, CLOSE).
//! - [`channel::Channel`] runs the end-to-end Noise handshake and transport inside DATA
//!   datagrams, which the relay forwards without being able to read them; its own timers
//!   retransmit the handshake, confirm the keys and re-handshake without dropping the session.
//! - [`udp::UdpPeer`] drives both over a blocking `std::net::UdpSocket`, for the CLI and tests.

pub mod bind;
pub mod channel;
pub mod udp;
