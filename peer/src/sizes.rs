//! How large the datagrams a peer sends to its relay may be, by the relay address's family.
//!
//! IP fragments are not part of the protocol (docs/protocol.md §1), and the peer's sockets
//! set the don't-fragment bit, so a datagram that does not fit the path is not sent at all
//! (the kernel refuses it with `EMSGSIZE`). The protocol's `MAX_DATAGRAM` of 1472 bytes is a
//! 1500-byte path's room after an IPv4 header (20 bytes) and a UDP header (8); an IPv6 header
//! takes 40, which leaves 1452. A peer that talks to its relay over IPv6 therefore sends DATA
//! bodies of at most 1436 bytes, and Noise transport plaintexts (the messages of a
//! [`DatagramLink`](crate::link::DatagramLink)) of at most 1407, against 1456 and 1427 over
//! IPv4. The peer assumes a 1500-byte path (Ethernet's, and what the protocol is sized for);
//! it does not discover a smaller one.

use std::fmt;
use std::net::SocketAddr;

use ferry_core::noise::MAX_PLAINTEXT;
use ferry_core::noise::frame::TRANSPORT_OVERHEAD;
use ferry_core::wire::{HEADER_LEN, MAX_DATA_BODY, MAX_DATAGRAM};

/// The path MTU the sizes are made for.
pub const PATH_MTU: usize = 1500;
/// An IPv4 header without options and a UDP header.
pub const IPV4_UDP_HEADERS: usize = 20 + 8;
/// An IPv6 header without extension headers and a UDP header.
pub const IPV6_UDP_HEADERS: usize = 40 + 8;

/// The IP version a peer's datagrams to its relay travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (a relay address that is IPv4, or IPv4-mapped IPv6, which goes out as IPv4).
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl Family {
    /// The family datagrams to `relay` travel in: an IPv4-mapped IPv6 address
    /// (`[::ffff:a.b.c.d]`) is reached over IPv4.
    pub fn of(relay: SocketAddr) -> Self {
        if relay.ip().to_canonical().is_ipv4() {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }

    /// The largest UDP payload that fits a [`PATH_MTU`] path: 1472 (IPv4) or 1452 (IPv6).
    pub const fn max_datagram(self) -> usize {
        match self {
            Self::Ipv4 => PATH_MTU - IPV4_UDP_HEADERS,
            Self::Ipv6 => PATH_MTU - IPV6_UDP_HEADERS,
        }
    }

    /// The largest DATA body: 1456 (IPv4) or 1436 (IPv6).
    pub const fn max_data_body(self) -> usize {
        self.max_datagram() - HEADER_LEN
    }

    /// The largest Noise transport plaintext, so the largest message of a session: 1427
    /// (IPv4) or 1407 (IPv6).
    pub const fn max_plaintext(self) -> usize {
        self.max_data_body() - TRANSPORT_OVERHEAD
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        })
    }
}

// IPv4's sizes are the protocol's own constants.
const _: () = assert!(Family::Ipv4.max_datagram() == MAX_DATAGRAM);
const _: () = assert!(Family::Ipv4.max_data_body() == MAX_DATA_BODY);
const _: () = assert!(Family::Ipv4.max_plaintext() == MAX_PLAINTEXT);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_has_the_sizes_of_a_1500_byte_path() {
        for (family, datagram, body, plaintext) in [
            (Family::Ipv4, 1472, 1456, 1427),
            (Family::Ipv6, 1452, 1436, 1407),
        ] {
            assert_eq!(family.max_datagram(), datagram, "{family}");
            assert_eq!(family.max_data_body(), body, "{family}");
            assert_eq!(family.max_plaintext(), plaintext, "{family}");
            let headers = match family {
                Family::Ipv4 => 20,
                Family::Ipv6 => 40,
            };
            assert_eq!(headers + 8 + datagram, PATH_MTU, "{family}");
        }
    }

    #[test]
    fn the_family_is_the_one_the_datagrams_travel_in() {
        let cases = [
            ("198.18.1.1:7000", Family::Ipv4),
            ("[2001:db8:1::1]:7000", Family::Ipv6),
            ("[::1]:7000", Family::Ipv6),
            // An IPv4-mapped address goes out as IPv4 from a dual-stack socket.
            ("[::ffff:198.18.1.1]:7000", Family::Ipv4),
        ];
        for (addr, family) in cases {
            assert_eq!(Family::of(addr.parse().unwrap()), family, "{addr}");
        }
    }
}
