//! Client addresses: CIDR prefixes, the client's IP behind trusted proxies
//! (`X-Forwarded-For`), and the key the per-IP rate limit counts under (an IPv6 client by its
//! prefix, since one host usually owns a whole /64).
//!
//! `X-Forwarded-For` is believed only when the TCP peer is a trusted proxy, and then read from
//! the right: each trusted proxy appends the address it received the request from, so the
//! rightmost address that is *not* a trusted proxy is the first hop nobody trusted vouches
//! past — the client. Everything left of it was written by the client (or by proxies it
//! chose) and may be forged. If every address is a trusted proxy, the leftmost one is the
//! client; if an entry cannot be parsed, the hop that wrote it (the last trusted address
//! read) is taken as the client, so a garbled header costs that proxy's budget, not a
//! stranger's.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// The most `X-Forwarded-For` entries looked at (from the right): a chain of proxies is short.
pub const MAX_FORWARDED_HOPS: usize = 32;

// `limit_key` is the key the per-IP rate limit counts a client under; the relay's per-IP
// bind limits use the same function.
pub use ferry_core::cidr::{Cidr, limit_key, mask};

/// Where a request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp {
    /// The client: the TCP peer, or the address a trusted proxy forwarded for.
    pub ip: IpAddr,
    /// The trusted proxy the request came through (the TCP peer), if it was forwarded.
    pub via: Option<IpAddr>,
}

impl ClientIp {
    /// A client that connected directly.
    pub fn direct(peer: SocketAddr) -> Self {
        Self {
            ip: peer.ip().to_canonical(),
            via: None,
        }
    }

    /// The proxy for the audit log: its address, or `-`.
    pub fn via_display(&self) -> ViaDisplay {
        ViaDisplay(self.via)
    }
}

/// Displays a proxy address or `-`.
#[derive(Clone, Copy, Debug)]
pub struct ViaDisplay(Option<IpAddr>);

impl fmt::Display for ViaDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("-"),
        }
    }
}

/// The proxies whose `X-Forwarded-For` is believed (`server.trusted_proxies`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Trusts the given prefixes.
    pub fn new(prefixes: Vec<Cidr>) -> Self {
        Self(prefixes)
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client of a request that came from `peer` with `headers` (see the module doc).
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> ClientIp {
        let direct = ClientIp::direct(peer);
        if self.0.is_empty() || !self.trusts(direct.ip) {
            return direct;
        }
        let mut values = headers.get_all("x-forwarded-for").iter().peekable();
        if values.peek().is_none() {
            return direct;
        }
        // Several headers are one list, in order. Entries are split as bytes: one that is not
        // text is garbage when it is reached, like any other, and left of the client it is
        // never read (the client may have written it).
        let mut entries: Vec<&[u8]> = Vec::new();
        for value in values {
            entries.extend(value.as_bytes().split(|&b| b == b','));
        }
        let mut client = direct.ip;
        for entry in entries.iter().rev().take(MAX_FORWARDED_HOPS) {
            let hop = std::str::from_utf8(entry)
                .ok()
                .and_then(|e| parse_hop(e.trim()));
            let Some(ip) = hop else {
                return forwarded(client, direct.ip);
            };
            client = ip;
            if !self.trusts(ip) {
                return forwarded(ip, direct.ip);
            }
        }
        forwarded(client, direct.ip)
    }
}

fn forwarded(ip: IpAddr, via: IpAddr) -> ClientIp {
    ClientIp { ip, via: Some(via) }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`203.0.113.7:4711`,
/// `[2001:db8::7]:4711`) or in brackets.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = IpAddr::from_str(entry) {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = SocketAddr::from_str(entry) {
        return Some(addr.ip().to_canonical());
    }
    let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cidrs(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|c| c.parse().unwrap()).collect())
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_limited_by_prefix() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            limit_key(ip("2001:db8:1:2:ffff::9"), 64),
            limit_key(ip("2001:db8:1:2::1"), 64)
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:3::1"), 64),
            limit_key(ip("2001:db8:1:2::1"), 64)
        );
        assert_eq!(limit_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(limit_key(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        // IPv4, also mapped into IPv6, is one address per client.
        assert_eq!(limit_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies_rightmost_untrusted_first() {
        let trusted = cidrs(&["127.0.0.1", "10.0.0.0/8"]);
        let direct = |p: &str| ClientIp::direct(peer(p));
        // Not from a trusted proxy: the header is ignored.
        assert_eq!(
            trusted.client_ip(peer("192.0.2.1"), &headers(&["203.0.113.9"])),
            direct("192.0.2.1")
        );
        // Nobody trusted: ignored too.
        assert_eq!(
            TrustedProxies::default().client_ip(peer("127.0.0.1"), &headers(&["203.0.113.9"])),
            direct("127.0.0.1")
        );
        // From a trusted proxy without the header: the proxy is the client.
        assert_eq!(
            trusted.client_ip(peer("127.0.0.1"), &HeaderMap::new()),
            direct("127.0.0.1")
        );
        let via = |client: &str, proxy: &str| ClientIp {
            ip: ip(client),
            via: Some(ip(proxy)),
        };
        // The client forged an entry on the left; the rightmost untrusted one counts.
        assert_eq!(
            trusted.client_ip(
                peer("127.0.0.1"),
                &headers(&["198.51.100.66, 203.0.113.9, 10.0.0.5"])
            ),
            via("203.0.113.9", "127.0.0.1")
        );
        // Several headers are one list; ports and brackets are understood.
        assert_eq!(
            trusted.client_ip(
                peer("10.0.0.1"),
                &headers(&["198.51.100.66", "[2001:db8::9]:4711", "10.0.0.2:80"])
            ),
            via("2001:db8::9", "10.0.0.1")
        );
        assert_eq!(
            trusted.client_ip(peer("10.0.0.1"), &headers(&["[2001:db8::9]"])),
            via("2001:db8::9", "10.0.0.1")
        );
        // Only trusted hops: the leftmost.
        assert_eq!(
            trusted.client_ip(peer("127.0.0.1"), &headers(&["10.0.0.7, 10.0.0.5"])),
            via("10.0.0.7", "127.0.0.1")
        );
        // Garbage: the hop that wrote it answers for it.
        assert_eq!(
            trusted.client_ip(peer("127.0.0.1"), &headers(&["203.0.113.9, unknown"])),
            via("127.0.0.1", "127.0.0.1")
        );
        assert_eq!(
            trusted.client_ip(
                peer("127.0.0.1"),
                &headers(&["203.0.113.9, nonsense, 10.0.0.5"])
            ),
            via("10.0.0.5", "127.0.0.1")
        );
        // Bytes that are not text in the client's own part of a value (the proxy appended
        // to what it got) are never read: the client cannot make itself count as the proxy.
        let mut joined = HeaderMap::new();
        joined.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9, 10.0.0.5").unwrap(),
        );
        assert_eq!(
            trusted.client_ip(peer("127.0.0.1"), &joined),
            via("203.0.113.9", "127.0.0.1")
        );
        // Nor in a value of its own before the proxies' ones; reached, such an entry is
        // garbage like any other.
        let mut separate = HeaderMap::new();
        for value in [&b"\xff"[..], b"203.0.113.9", b"10.0.0.5"] {
            separate.append("x-forwarded-for", HeaderValue::from_bytes(value).unwrap());
        }
        assert_eq!(
            trusted.client_ip(peer("127.0.0.1"), &separate),
            via("203.0.113.9", "127.0.0.1")
        );
        let mut garbled = headers(&["203.0.113.9", "10.0.0.7"]);
        garbled.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(
            trusted.client_ip(peer("127.0.0.1"), &garbled),
            via("127.0.0.1", "127.0.0.1")
        );
        // An IPv4-mapped entry is the IPv4 address, however it is written.
        for entry in [
            "::ffff:203.0.113.9",
            "[::ffff:203.0.113.9]",
            "[::ffff:203.0.113.9]:80",
        ] {
            assert_eq!(
                trusted.client_ip(peer("127.0.0.1"), &headers(&["198.51.100.66", entry])),
                via("203.0.113.9", "127.0.0.1"),
                "{entry}"
            );
        }
        // An IPv4-mapped peer is the same proxy.
        assert_eq!(
            trusted.client_ip(peer("::ffff:127.0.0.1"), &headers(&["203.0.113.9"])),
            via("203.0.113.9", "127.0.0.1")
        );
    }
}
