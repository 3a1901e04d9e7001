//! Two network namespaces joined by a veth pair, for tests and benchmarks that need a real
//! NIC-like path (the XDP guard runs natively on veth). Addresses come from 198.18.0.0/15 and
//! 2001:db8::/32 only; names are unique per process and topology; both namespaces (and with
//! them the veth pair) are removed on drop. Needs root and iproute2.
//!
//! Sockets are opened *inside* a namespace by a short-lived thread that joins it with
//! `setns(2)` ([`in_ns`]); a socket stays in the namespace it was created in, so it can then
//! be used from any thread. Processes run in a namespace with `ip netns exec`.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, Socket, Type};

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

static NEXT: AtomicU32 = AtomicU32::new(0);

/// This process's id, the topology's number in it, and the third octet (and third IPv6
/// group) of its addresses, which differs between the topologies of one process (the
/// namespaces are private to each topology anyway).
fn next_topology() -> (u32, u32, u8) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let net = (pid.wrapping_mul(31).wrapping_add(n) % 200) as u8 + 10;
    (pid, n, net)
}

/// An interface name for topology `n` of process `pid`: at most 15 bytes, the kernel's limit.
fn interface_name(prefix: &str, pid: u32, n: u32) -> String {
    format!("{prefix}{pid}x{n}").chars().take(15).collect()
}

/// Two namespaces, `relay_ns` and `peers_ns`, joined by `relay_if` ↔ `peers_if`.
///
/// Relay side: 198.18.`net`.1/24 and 2001:db8:`net`::1/64. Peers side: 198.18.`net`.2 … .9
/// and 2001:db8:`net`::2 … ::9, so one test can play several hosts and a spoofer.
#[derive(Debug)]
pub struct Topology {
    /// The relay's namespace.
    pub relay_ns: String,
    /// The peers' namespace.
    pub peers_ns: String,
    /// The third octet (and third IPv6 group) of every address of this topology.
    pub net: u8,
    /// The veth end in the relay's namespace (where the XDP guard attaches).
    pub relay_if: String,
    /// The veth end in the peers' namespace.
    pub peers_if: String,
}

impl Topology {
    /// Creates the namespaces, the veth pair and the addresses.
    pub fn new() -> anyhow::Result<Self> {
        let (pid, n, net) = next_topology();
        let name = |prefix: &str| interface_name(prefix, pid, n);
        let topo = Self {
            relay_ns: format!("ferry-r-{pid}-{n}"),
            peers_ns: format!("ferry-p-{pid}-{n}"),
            net,
            relay_if: name("fr"),
            peers_if: name("fp"),
        };
        // From here on, dropping `topo` removes whatever was created.
        ip(&["netns", "add", &topo.relay_ns])?;
        ip(&["netns", "add", &topo.peers_ns])?;
        let (vr, vp) = (topo.relay_if.as_str(), topo.peers_if.as_str());
        ip(&["link", "add", vr, "type", "veth", "peer", "name", vp])?;
        ip(&["link", "set", vr, "netns", &topo.relay_ns])?;
        ip(&["link", "set", vp, "netns", &topo.peers_ns])?;
        let (r, p) = (topo.relay_ns.as_str(), topo.peers_ns.as_str());
        let v4 = format!("{}/24", topo.relay_v4());
        ip(&["-n", r, "addr", "add", &v4, "dev", vr])?;
        let v6 = format!("{}/64", topo.relay_v6());
        ip(&["-n", r, "addr", "add", &v6, "dev", vr, "nodad"])?;
        for host in 2..=9 {
            let v4 = format!("{}/24", topo.peer_v4(host));
            ip(&["-n", p, "addr", "add", &v4, "dev", vp])?;
            let v6 = format!("{}/64", topo.peer_v6(host));
            ip(&["-n", p, "addr", "add", &v6, "dev", vp, "nodad"])?;
        }
        for (ns, dev) in [(r, vr), (p, vp)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(topo)
    }

    /// Routes `cidr` (from 198.18.0.0/15) from the relay's namespace through peer host 2, so
    /// that reverse-path filtering keeps datagrams spoofed from it and any reply goes back to
    /// the peers' side.
    pub fn route_via_peers(&self, cidr: &str) -> anyhow::Result<()> {
        let via = self.peer_v4(2).to_string();
        ip(&["-n", &self.relay_ns, "route", "add", cidr, "via", &via])
    }

    /// Turns GRO on at the peers' end of the veth. A veth hands the frames XDP sends out of it
    /// (the fast path's, the guard's CHALLENGEs) to its peer only if the peer polls with NAPI,
    /// which GRO turns on; the relay checks that when it attaches.
    pub fn gro_on_peers(&self) -> anyhow::Result<()> {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.peers_ns, "ethtool", "-K"])
            .args([&self.peers_if, "gro", "on"])
            .stdout(Stdio::null())
            .status()
            .context("running ethtool")?;
        if !status.success() {
            bail!("ethtool -K {} gro on: {status}", self.peers_if);
        }
        Ok(())
    }

    /// The relay's IPv4 address.
    pub fn relay_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.net, 1)
    }

    /// The relay's IPv6 address.
    pub fn relay_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.net.into(), 0, 0, 0, 0, 1)
    }

    /// Peer host `host` (2..=9), IPv4.
    pub fn peer_v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.net, host)
    }

    /// Peer host `host` (2..=9), IPv6.
    pub fn peer_v6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.net.into(), 0, 0, 0, 0, host.into())
    }

    /// A command that runs `program` in the relay's namespace.
    pub fn in_relay_ns(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.relay_ns, program])
            .stdin(Stdio::null());
        cmd
    }

    /// A UDP socket bound to `addr` inside the peers' namespace.
    pub fn peer_socket(&self, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
        in_ns(&self.peers_ns, || UdpSocket::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", self.peers_ns))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, which removes the pair.
        for ns in [&self.relay_ns, &self.peers_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Three namespaces in a row, the relay's host between two networks, as a router: a
/// *generator* side and a *sink* side, each joined to the relay's namespace by a veth pair,
/// with forwarding on in the relay's namespace and a default route through the relay on
/// either side. The relay's host thus has two addresses per family, one on each side, and a
/// peer on either side can reach both: sent to the far one, a datagram crosses to it through
/// the relay's near interface, and the kernel's route back leaves from the near address.
///
/// Generator side: relay 198.18.`net`.1/24 and 2001:db8:`net`::1/64, hosts .2 … .9.
/// Sink side: relay 198.19.`net`.1/24 and 2001:db8:`net`:1::1/64, hosts .2 … .9.
/// Every namespace (and with them the veth pairs) is removed on drop.
#[derive(Debug)]
pub struct TwoSided {
    /// The relay's namespace.
    pub relay_ns: String,
    /// The generator side's namespace.
    pub gen_ns: String,
    /// The sink side's namespace.
    pub sink_ns: String,
    /// The third octet (and third IPv6 group) of every address of this topology.
    pub net: u8,
    /// The relay's veth toward the generator side.
    pub relay_gen_if: String,
    /// The generator side's veth.
    pub gen_if: String,
    /// The relay's veth toward the sink side.
    pub relay_sink_if: String,
    /// The sink side's veth.
    pub sink_if: String,
}

/// A side of a [`TwoSided`] topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// 198.18.`net`.0/24, 2001:db8:`net`::/64.
    Gen,
    /// 198.19.`net`.0/24, 2001:db8:`net`:1::/64.
    Sink,
}

impl TwoSided {
    /// Creates the namespaces, the veth pairs, the addresses and routes, and turns forwarding
    /// on in the relay's namespace.
    pub fn new() -> anyhow::Result<Self> {
        let (pid, n, net) = next_topology();
        let name = |prefix: &str| interface_name(prefix, pid, n);
        let topo = Self {
            relay_ns: format!("ferry-w-{pid}-{n}"),
            gen_ns: format!("ferry-g-{pid}-{n}"),
            sink_ns: format!("ferry-s-{pid}-{n}"),
            net,
            relay_gen_if: name("wg"),
            gen_if: name("gw"),
            relay_sink_if: name("ws"),
            sink_if: name("sw"),
        };
        // From here on, dropping `topo` removes whatever was created.
        for ns in [&topo.relay_ns, &topo.gen_ns, &topo.sink_ns] {
            ip(&["netns", "add", ns])?;
        }
        let r = topo.relay_ns.as_str();
        for side in [Side::Gen, Side::Sink] {
            let (ns, relay_if, host_if) = topo.side(side);
            ip(&[
                "link", "add", relay_if, "type", "veth", "peer", "name", host_if,
            ])?;
            ip(&["link", "set", relay_if, "netns", r])?;
            ip(&["link", "set", host_if, "netns", ns])?;
            let v4 = format!("{}/24", topo.relay_v4(side));
            ip(&["-n", r, "addr", "add", &v4, "dev", relay_if])?;
            let v6 = format!("{}/64", topo.relay_v6(side));
            ip(&["-n", r, "addr", "add", &v6, "dev", relay_if, "nodad"])?;
            for host in 2..=9 {
                let v4 = format!("{}/24", topo.host_v4(side, host));
                ip(&["-n", ns, "addr", "add", &v4, "dev", host_if])?;
                let v6 = format!("{}/64", topo.host_v6(side, host));
                ip(&["-n", ns, "addr", "add", &v6, "dev", host_if, "nodad"])?;
            }
            for (ns, dev) in [(r, relay_if), (ns, host_if)] {
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
            let via4 = topo.relay_v4(side).to_string();
            ip(&["-n", ns, "route", "add", "default", "via", &via4])?;
            let via6 = topo.relay_v6(side).to_string();
            ip(&["-n", ns, "-6", "route", "add", "default", "via", &via6])?;
        }
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            &format!("net.ipv4.conf.{}.forwarding=1", topo.relay_gen_if),
            &format!("net.ipv4.conf.{}.forwarding=1", topo.relay_sink_if),
        ] {
            let out = Command::new("ip")
                .args(["netns", "exec", r, "sysctl", "-qw", key])
                .output()
                .context("running sysctl")?;
            if !out.status.success() {
                bail!(
                    "sysctl {key}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(topo)
    }

    /// The namespace of `side`, the relay's veth toward it and that side's veth.
    pub fn side(&self, side: Side) -> (&str, &str, &str) {
        match side {
            Side::Gen => (&self.gen_ns, &self.relay_gen_if, &self.gen_if),
            Side::Sink => (&self.sink_ns, &self.relay_sink_if, &self.sink_if),
        }
    }

    fn octets(&self, side: Side) -> (u8, u16) {
        match side {
            Side::Gen => (18, 0),
            Side::Sink => (19, 1),
        }
    }

    /// The relay's IPv4 address on `side`.
    pub fn relay_v4(&self, side: Side) -> Ipv4Addr {
        self.host_v4(side, 1)
    }

    /// The relay's IPv6 address on `side`.
    pub fn relay_v6(&self, side: Side) -> Ipv6Addr {
        self.host_v6(side, 1)
    }

    /// Host `host` (1 is the relay, 2..=9 the side's) on `side`, IPv4.
    pub fn host_v4(&self, side: Side, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, self.octets(side).0, self.net, host)
    }

    /// Host `host` (1 is the relay, 2..=9 the side's) on `side`, IPv6.
    pub fn host_v6(&self, side: Side, host: u8) -> Ipv6Addr {
        let group = self.octets(side).1;
        Ipv6Addr::new(0x2001, 0xdb8, self.net.into(), group, 0, 0, 0, host.into())
    }

    /// A UDP socket bound to `addr` inside the namespace of `side`.
    pub fn socket(&self, side: Side, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
        let ns = self.side(side).0;
        in_ns(ns, || UdpSocket::bind(addr))?.with_context(|| format!("binding {addr} in {ns}"))
    }
}

impl Drop for TwoSided {
    fn drop(&mut self) {
        for ns in [&self.gen_ns, &self.sink_ns, &self.relay_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a scratch thread that has joined namespace `ns`, and returns its result:
/// sockets it opens stay in that namespace wherever they are used later.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            set_netns(&file)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace {ns} panicked"))?
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

/// Sends `packet`, a whole IPv4 packet (header included, its source address possibly forged),
/// to `dst` from a raw socket in namespace `ns`. The kernel fills in the IP checksum.
pub fn send_raw_ipv4(ns: &str, dst: Ipv4Addr, packet: &[u8]) -> anyhow::Result<()> {
    let sent = in_ns(ns, || -> anyhow::Result<usize> {
        // IPPROTO_RAW implies IP_HDRINCL: the buffer is the whole IP packet.
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context("a raw socket")?;
        Ok(socket.send_to(packet, &SocketAddrV4::new(dst, 0).into())?)
    })??;
    if sent != packet.len() {
        bail!("raw send: {sent} of {} bytes", packet.len());
    }
    Ok(())
}
