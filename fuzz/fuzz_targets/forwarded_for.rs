//! Fuzzes the gateway's reading of `X-Forwarded-For` (`ferry_gateway::net`,
//! `TrustedProxies::client_ip`) against the rule its module doc states.
//!
//! The input is split at its first NUL byte: the part after it is the header written by the
//! trusted proxies (one header value per line), the part before it a value the *client* wrote
//! in front of it. The first input byte also picks the TCP peer and the trusted prefixes.
//! Nothing may panic, and:
//! - a peer that is not a trusted proxy is taken as the client, whatever the header says;
//! - a forwarded request names the peer as `via`, and its client is the peer or an address
//!   the header names;
//! - when the proxies' part alone names an untrusted client, whatever the client put in front
//!   of it (a header before theirs, or text before theirs in the same value, as
//!   `proxy_add_x_forwarded_for` writes it) changes nothing: the client cannot choose whom it
//!   is counted as.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use ferry_gateway::net::{Cidr, ClientIp, TrustedProxies};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const PEERS: [&str; 4] = [
    "10.0.0.1:443",
    "198.18.0.1:443",
    "[2001:db8::1]:443",
    "[::ffff:10.0.0.2]:443",
];

fn proxies(pick: u8) -> TrustedProxies {
    let lists: [&[&str]; 4] = [
        &["10.0.0.0/8"],
        &["10.0.0.0/8", "2001:db8::/64"],
        &["10.0.0.1/32", "198.18.0.0/15"],
        &[],
    ];
    let cidrs = lists[usize::from(pick) % lists.len()]
        .iter()
        .map(|c| c.parse::<Cidr>().expect("fixed prefix"))
        .collect();
    TrustedProxies::new(cidrs)
}

/// `lines` as header values, in order; `None` if one is not a valid header value.
fn headers(lines: &[&[u8]]) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    for line in lines {
        map.append("x-forwarded-for", HeaderValue::from_bytes(line).ok()?);
    }
    Some(map)
}

/// Whether some entry of the header reads as `ip` (an address, with a port or in brackets).
fn named(map: &HeaderMap, ip: IpAddr) -> bool {
    map.get_all("x-forwarded-for").iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|entry| {
            let Ok(text) = std::str::from_utf8(entry) else {
                return false;
            };
            let text = text.trim();
            let bare = text
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .unwrap_or(text);
            bare.parse::<IpAddr>().ok().map(|i| i.to_canonical()) == Some(ip)
                || text
                    .parse::<SocketAddr>()
                    .ok()
                    .map(|a| a.ip().to_canonical())
                    == Some(ip)
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let trusted = proxies(pick >> 2);
    let peer: SocketAddr = PEERS[usize::from(pick & 3)].parse().expect("fixed address");
    let (client_part, proxy_part) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    let proxy_lines: Vec<&[u8]> = proxy_part.split(|&b| b == b'\n').collect();
    let Some(map) = headers(&proxy_lines) else {
        return;
    };

    let got = trusted.client_ip(peer, &map);
    let direct = ClientIp::direct(peer);
    if !trusted.trusts(direct.ip) {
        assert_eq!(got, direct, "an untrusted peer's header was believed");
        return;
    }
    if got.via.is_some() {
        assert_eq!(got.via, Some(direct.ip));
        assert!(
            got.ip == direct.ip || named(&map, got.ip),
            "client {} is neither the peer nor in the header",
            got.ip
        );
    } else {
        assert_eq!(got, direct);
    }
    if client_part.is_empty() || trusted.trusts(got.ip) {
        return;
    }
    // The client's part as a header of its own before the proxies' ones.
    let mut before: Vec<&[u8]> = vec![client_part];
    before.extend(&proxy_lines);
    if let Some(map) = headers(&before) {
        assert_eq!(
            trusted.client_ip(peer, &map),
            got,
            "a header before the proxies' mattered"
        );
    }
    // The client's part prepended to the first value, as a proxy appends to what it got.
    let mut joined = client_part.to_vec();
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(proxy_lines[0]);
    let mut lines: Vec<&[u8]> = vec![&joined];
    lines.extend(&proxy_lines[1..]);
    if let Some(map) = headers(&lines) {
        assert_eq!(
            trusted.client_ip(peer, &map),
            got,
            "text before the proxies' mattered"
        );
    }
});
