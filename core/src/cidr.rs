//! IP prefixes as operators write them in config files: `198.18.0.0/15`, `2001:db8::/32`, or a
//! bare address (a /32 or /128). The relay's XDP deny/allow lists and the gateway's trusted
//! proxies both use this one type, so the two files accept exactly the same spellings.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix with its host bits zero. An IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) is taken as the IPv4 address it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is inside the prefix. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let written = IpAddr::from_str(addr)
            .map_err(|_| format!("{s:?} is not an IP address or CIDR prefix"))?;
        let addr = written.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // An IPv4-mapped IPv6 address (`::ffff:198.18.0.0`) is taken as the IPv4 one, with an
        // IPv4 prefix length.
        let mapped = if written.is_ipv6() && addr.is_ipv4() {
            format!(" (an IPv4-mapped address is taken as IPv4: {addr}/N)")
        } else {
            String::new()
        };
        let prefix_len = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => {
                    return Err(format!(
                        "{s:?}: the prefix length must be 0 to {max}{mapped}"
                    ));
                }
            },
        };
        let network = mask(addr, prefix_len);
        if network != addr {
            return Err(format!(
                "{s:?} has host bits set; the prefix is {network}/{prefix_len}"
            ));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// `ip` with every bit past the first `prefix_len` cleared.
pub fn mask(ip: IpAddr, prefix_len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let keep = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(a) & keep).into())
        }
        IpAddr::V6(a) => {
            let keep = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & keep).into())
        }
    }
}

/// The key a per-source limit counts `ip` under: an IPv4 address (IPv4-mapped IPv6 included)
/// as it is, an IPv6 address by its first `ipv6_prefix_len` bits, since one host usually owns
/// a whole /64 and could otherwise take a fresh address for every request.
pub fn limit_key(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        v6 @ IpAddr::V6(_) => mask(v6, ipv6_prefix_len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn prefixes_parse_strictly_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().expect("valid");
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(
            c.contains(ip("::ffff:10.1.0.9")),
            "IPv4-mapped counts as IPv4"
        );
        assert!(!c.contains(ip("::1")));
        let c: Cidr = "198.18.0.0/15".parse().expect("valid");
        assert_eq!(c.prefix_len(), 15);
        assert!(c.contains(ip("198.19.255.1")));
        assert!(!c.contains(ip("198.20.0.1")));
        assert!(!c.contains(ip("2001:db8::1")));
        assert_eq!(
            "2001:db8::7".parse::<Cidr>().expect("valid").prefix_len(),
            128
        );
        let err = "198.18.0.1/24".parse::<Cidr>().unwrap_err();
        assert!(err.contains("198.18.0.0/24"), "{err}");
        let host: Cidr = "2001:db8::1".parse().expect("valid");
        assert_eq!(host.prefix_len(), 128);
        assert!(host.contains(ip("2001:db8::1")));
        assert!(!host.contains(ip("2001:db8::2")));
        assert_eq!("::/0".parse::<Cidr>().expect("valid").to_string(), "::/0");
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .expect("valid")
                .contains(ip("8.8.8.8"))
        );
        let mapped: Cidr = "::ffff:198.18.0.0/16".parse().expect("valid");
        assert_eq!(mapped.to_string(), "198.18.0.0/16");
        let err = "::ffff:198.18.0.0/111".parse::<Cidr>().unwrap_err();
        assert!(err.contains("taken as IPv4: 198.18.0.0/N"), "{err}");
        for bad in [
            "10.1.0.1/16",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "2001:db8::/129",
            "host",
            "eth0",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(limit_key(ip("::ffff:198.18.0.7"), 64), ip("198.18.0.7"));
        assert_eq!(limit_key(ip("198.18.0.7"), 8), ip("198.18.0.7"));
        assert_eq!(
            "10.1.0.1/16".parse::<Cidr>().unwrap_err(),
            "\"10.1.0.1/16\" has host bits set; the prefix is 10.1.0.0/16"
        );
    }
}
