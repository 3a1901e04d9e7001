//! Network namespaces for integration tests: two namespaces joined by a veth pair, addresses
//! from 198.18.0.0/15 and 2001:db8::/32 only, unique names, removed on drop.
//!
//! Sockets are opened *inside* a namespace by a short-lived thread that joins it with
//! `setns(2)`; a socket stays in the namespace it was created in, so the test can then use it
//! from any thread. Processes run in a namespace with `ip netns exec`.
#![allow(unsafe_code)] // setns(2) on a scratch thread; see the SAFETY notes

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether the tests may skip privileged work: false when `FERRY_REQUIRE_PRIVILEGED=1`.
pub fn may_skip() -> bool {
    std::env::var("FERRY_REQUIRE_PRIVILEGED").as_deref() != Ok("1")
}

/// Whether this process can create network namespaces (root with iproute2).
pub fn available() -> Result<(), String> {
    let uid = unsafe_geteuid();
    if uid != 0 {
        return Err(format!("needs root (euid {uid})"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("needs iproute2 (`ip`)".into()),
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Skips (returning `None`) or fails the calling test when namespaces are unavailable.
pub fn require(test: &str) -> Option<()> {
    match available() {
        Ok(()) => Some(()),
        Err(why) if may_skip() => {
            eprintln!("SKIP {test}: network namespaces unavailable: {why}");
            None
        }
        Err(why) => {
            panic!("{test}: network namespaces unavailable ({why}) and FERRY_REQUIRE_PRIVILEGED=1")
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `relay` and `peers`, joined by a veth pair.
///
/// Relay side: 198.18.N.1/24 and 2001:db8:N::1/64. Peers side: 198.18.N.2 … .9 and
/// 2001:db8:N::2 … ::9, so a test can play several hosts and a spoofer.
#[derive(Debug)]
pub struct Topology {
    /// The relay's namespace.
    pub relay_ns: String,
    /// The peers' namespace.
    pub peers_ns: String,
    /// The third octet used in every address of this topology.
    pub net: u8,
    /// The veth end in the relay's namespace (where the XDP guard attaches).
    pub relay_if: String,
    /// The veth end in the peers' namespace.
    pub peers_if: String,
}

impl Topology {
    /// Creates the namespaces and links; panics with the `ip` error if that fails.
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The third octet must differ between concurrently running tests of this process; the
        // namespaces are private to each topology anyway.
        let net = (pid.wrapping_mul(31).wrapping_add(n) % 200) as u8 + 10;
        let tag = format!("{}-{}", pid, n);
        let (vr, vp) = (format!("fr{pid}x{n}"), format!("fp{pid}x{n}"));
        let (vr, vp) = (truncate(&vr), truncate(&vp));
        let topo = Self {
            relay_ns: format!("ferry-r-{tag}"),
            peers_ns: format!("ferry-p-{tag}"),
            net,
            relay_if: vr.clone(),
            peers_if: vp.clone(),
        };
        ip(&["netns", "add", &topo.relay_ns]);
        ip(&["netns", "add", &topo.peers_ns]);
        ip(&["link", "add", &vr, "type", "veth", "peer", "name", &vp]);
        ip(&["link", "set", &vr, "netns", &topo.relay_ns]);
        ip(&["link", "set", &vp, "netns", &topo.peers_ns]);
        let r = |args: &[&str]| {
            let mut all = vec!["-n", topo.relay_ns.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        let p = |args: &[&str]| {
            let mut all = vec!["-n", topo.peers_ns.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        r(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &vr]);
        r(&[
            "addr",
            "add",
            &format!("2001:db8:{net}::1/64"),
            "dev",
            &vr,
            "nodad",
        ]);
        for host in 2..=9 {
            p(&[
                "addr",
                "add",
                &format!("198.18.{net}.{host}/24"),
                "dev",
                &vp,
            ]);
            p(&[
                "addr",
                "add",
                &format!("2001:db8:{net}::{host}/64"),
                "dev",
                &vp,
                "nodad",
            ]);
        }
        for (run, dev) in [(&r as &dyn Fn(&[&str]), &vr), (&p, &vp)] {
            run(&["link", "set", "lo", "up"]);
            run(&["link", "set", dev, "up"]);
        }
        topo
    }

    /// The relay's IPv4 address.
    pub fn relay_v4(&self) -> IpAddr {
        format!("198.18.{}.1", self.net).parse().expect("valid")
    }

    /// The relay's IPv6 address.
    pub fn relay_v6(&self) -> IpAddr {
        format!("2001:db8:{}::1", self.net).parse().expect("valid")
    }

    /// Peer host `host` (2..=9), IPv4.
    pub fn peer_v4(&self, host: u8) -> IpAddr {
        format!("198.18.{}.{host}", self.net)
            .parse()
            .expect("valid")
    }

    /// Peer host `host` (2..=9), IPv6.
    pub fn peer_v6(&self, host: u8) -> IpAddr {
        format!("2001:db8:{}::{host}", self.net)
            .parse()
            .expect("valid")
    }

    /// A command that runs in the relay's namespace.
    pub fn in_relay_ns(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.relay_ns, program])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `f` on a thread that has joined namespace `ns`, and returns its result.
    pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{ns}");
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns only changes this scratch thread's network namespace; the fd is
                // a valid open namespace file for the duration of the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread")
        })
    }

    /// A UDP socket bound to `addr` inside the peers' namespace.
    pub fn peer_socket(&self, addr: SocketAddr) -> UdpSocket {
        Self::in_ns(&self.peers_ns, || {
            UdpSocket::bind(addr).expect("bind in namespace")
        })
    }
}

/// Interface names are at most 15 bytes.
fn truncate(name: &str) -> String {
    name.chars().take(15).collect()
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth, which removes the pair.
        for ns in [&self.relay_ns, &self.peers_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Sends one UDP datagram over IPv4 with a forged source address, from a raw socket in
/// namespace `ns` (the kernel fills in the IP checksum; the UDP checksum is left out, which
/// IPv4 allows).
pub fn send_spoofed_v4(
    ns: &str,
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) {
    // The XDP tests' frame builder, without its Ethernet header.
    let mut frame = ferry_relay::xdp::frame::Frame::udp(
        IpAddr::V4(*src.ip()),
        IpAddr::V4(*dst.ip()),
        dst.port(),
    );
    frame.src_port = src.port();
    let packet = frame.build(payload).split_off(14);
    Topology::in_ns(ns, || {
        // SAFETY: plain socket(2) call; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `addr` are valid for the lengths given; IPPROTO_RAW implies
        // IP_HDRINCL, so the buffer is the whole IP packet.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the descriptor opened above, once.
        unsafe { libc::close(fd) };
        assert_eq!(sent, packet.len() as isize, "raw send: {err}");
    });
}
