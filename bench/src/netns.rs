//! Two network namespaces joined by a veth pair, for benchmarks that need a real NIC-like
//! path (the XDP guard runs natively on veth). Addresses come from 198.18.0.0/15 only;
//! names are unique per process; everything is removed on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, bail};

/// The relay's namespace and the peers' namespace, joined by `relay_if` ↔ `peers_if`.
///
/// Relay: 198.18.`net`.1/24. Peers: 198.18.`net`.2–.9. The relay routes 198.19.0.0/16 (the
/// spoofed flood sources) back through the peers' side, so reverse-path filtering keeps
/// them and any reply goes nowhere harmful.
#[derive(Debug)]
pub struct Namespaces {
    /// The relay's namespace.
    pub relay_ns: String,
    /// The peers' namespace.
    pub peers_ns: String,
    /// The veth end in the relay's namespace.
    pub relay_if: String,
    /// The veth end in the peers' namespace.
    pub peers_if: String,
    /// The third octet of the addresses.
    pub net: u8,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Namespaces {
    /// Creates them (needs root).
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let net = (pid % 200) as u8 + 20;
        let ns = Namespaces {
            relay_ns: format!("ferry-{tag}-r-{pid}"),
            peers_ns: format!("ferry-{tag}-p-{pid}"),
            relay_if: format!("fbr{pid}").chars().take(15).collect(),
            peers_if: format!("fbp{pid}").chars().take(15).collect(),
            net,
        };
        ip(&["netns", "add", &ns.relay_ns])?;
        ip(&["netns", "add", &ns.peers_ns])?;
        ip(&[
            "link",
            "add",
            &ns.relay_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.peers_if,
        ])?;
        ip(&["link", "set", &ns.relay_if, "netns", &ns.relay_ns])?;
        ip(&["link", "set", &ns.peers_if, "netns", &ns.peers_ns])?;
        let (r, p) = (ns.relay_ns.as_str(), ns.peers_ns.as_str());
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("198.18.{net}.1/24"),
            "dev",
            &ns.relay_if,
        ])?;
        for host in 2..=9 {
            let addr = format!("198.18.{net}.{host}/24");
            ip(&["-n", p, "addr", "add", &addr, "dev", &ns.peers_if])?;
        }
        for (n, dev) in [(r, &ns.relay_if), (p, &ns.peers_if)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        let via = format!("198.18.{net}.2");
        ip(&["-n", r, "route", "add", "198.19.0.0/16", "via", &via])?;
        Ok(ns)
    }

    /// The relay's address.
    pub fn relay_addr(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(198, 18, self.net, 1)
    }

    /// Peer host `host` (2..=9).
    pub fn peer_addr(&self, host: u8) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(198, 18, self.net, host)
    }
}

/// The index and MAC address of `interface` in namespace `ns`, from `ip -o link show`.
pub fn link_info(ns: &str, interface: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", interface])
        .output()
        .context("running ip (iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let index = text
        .split(':')
        .next()
        .and_then(|i| i.trim().parse::<u32>().ok())
        .with_context(|| format!("no interface index for {interface} in {text:?}"))?;
    let mac_text = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC address for {interface} in {text:?}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = mac_text.split(':').collect();
    if parts.len() != 6 {
        bail!("{mac_text:?} is not a MAC address");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {mac_text:?}"))?;
    }
    Ok((index, mac))
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.relay_ns, &self.peers_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a scratch thread that has joined namespace `ns`: sockets it opens stay in
/// that namespace wherever they are used later.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            set_netns(&file)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a namespace thread panicked"))?
    })
}

#[allow(unsafe_code)]
fn set_netns(file: &File) -> anyhow::Result<()> {
    // SAFETY: setns only changes the calling (scratch) thread's network namespace; the fd is a
    // valid open namespace file for the duration of the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
