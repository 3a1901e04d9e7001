//! The flood of the `flood` scenario: whole Ethernet frames from forged source addresses,
//! sent with a packet socket on the generator's link (qdisc bypassed) as fast as one core
//! can. A third are random bytes, a third well-formed DATA for sessions that do not exist, a
//! third well-formed BIND (far over any source's handshake rate, without a cookie, with a token
//! that does not verify: the relay or its guard answers it with a CHALLENGE); sources
//! cycle over [`SOURCES`] addresses of [`SPOOF_NET`], which the relay host routes back towards
//! the generator so that reverse-path filtering keeps them.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use ferry_common::header::{BIND_BODY_LEN, HEADER_LEN, PacketType, TOKEN_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::load::BATCH;
use crate::udp::{Batch, pin_to};

/// Where the forged sources come from: 198.18.240.0/20, outside every testbed's own /24s
/// (198.18.20.0 to 198.18.219.0).
pub const SPOOF_NET: &str = "198.18.240.0/20";
/// Distinct forged source addresses.
pub const SOURCES: u32 = 4096;

/// An Ethernet frame `src_mac` → `dst_mac` carrying IPv4/UDP `src` → `dst` with `payload`,
/// the IPv4 header checksum filled in and the UDP checksum left 0 (none, allowed on IPv4).
pub fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_at = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let sum: u32 = f[ip_at..ip_at + 20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    f[ip_at + 10..ip_at + 12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// `n` flood frames to the relay at `relay`, from `src_mac` to `dst_mac`.
pub fn frames(
    n: usize,
    relay: SocketAddrV4,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let rng = SystemRandom::new();
    let fail = |_| anyhow::anyhow!("the system RNG failed");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = [0u8; 16];
        rng.fill(&mut r).map_err(fail)?;
        let host = u32::from_be_bytes([r[0], r[1], r[2], r[3]]) % SOURCES;
        let src = SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 240 + (host >> 8) as u8, host as u8),
            1024 + (host as u16 % 50_000),
        );
        let session = u64::from_be_bytes([r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11]]) | 1;
        let payload = match i % 3 {
            0 => {
                let mut garbage = vec![0u8; 64 + usize::from(r[12]) * 4];
                rng.fill(&mut garbage).map_err(fail)?;
                garbage
            }
            1 => super::load::datagram(super::load::Framing::FerryData { session }, 256)?,
            _ => {
                // Well-formed through the body rules too (a token length of 208), so the relay
                // answers it, or its guard does, with a CHALLENGE, as a real flood's would be.
                let mut bind =
                    ferry_relay::xdp::frame::datagram(PacketType::Bind, session, BIND_BODY_LEN);
                bind[HEADER_LEN + 2..HEADER_LEN + 4]
                    .copy_from_slice(&(TOKEN_LEN as u16).to_be_bytes());
                bind
            }
        };
        out.push(frame(src_mac, dst_mac, src, relay, &payload));
    }
    Ok(out)
}

/// Where the XDP flood generator's sources come from: it rewrites the template's source to the
/// next of [`SOURCES`] addresses of 198.19.0.0/16 (198.19.0.0 to 198.19.15.255 here), below
/// every testbed's sink /24 (198.19.20.0 and up).
pub const XDP_SPOOF_NET: &str = "198.19.0.0/20";

/// The flood from an XDP program instead of a packet socket (`--flood-generator xdp`):
/// `ferry_relay::xdp::flood`, the `ferry_flood` program of ebpf/xdp run with
/// `BPF_PROG_TEST_RUN` in live-frames mode on the generator's veth, so the kernel transmits a
/// template frame 65,536 times a call, each with the next spoofed source. About twice what a
/// packet socket sends from one core. While it exists, the relay host's veth towards the
/// generator has GRO on: a frame an XDP program transmits onto a veth is delivered only when
/// the receiving end has NAPI, which GRO (or the relay's guard) brings.
#[derive(Debug)]
pub struct XdpFlooder {
    /// The generator's namespace.
    pub generator_ns: String,
    /// Its veth's index there.
    pub ifindex: u32,
    /// The relay host's namespace and its veth towards the generator, GRO off again on drop.
    pub relay_if: (String, String),
}

impl XdpFlooder {
    /// Sends the templates among `frames` (the first three: garbage, DATA, BIND), sources
    /// rewritten, until `stop`, from the calling thread pinned to `cpu`; returns how many
    /// frames the program handled.
    pub fn send(&self, frames: &[Vec<u8>], cpu: Option<usize>, stop: &AtomicBool) -> u64 {
        let templates: Vec<Vec<u8>> = frames
            .iter()
            .take(3)
            .map(|f| {
                let mut f = f.clone();
                // The program rewrites the low 16 bits of a source in 198.19.0.0/16: start
                // from 198.19.0.1, with the IPv4 header checksum to match.
                if f.len() >= 34 {
                    f[26..30].copy_from_slice(&[198, 19, 0, 1]);
                    f[24..26].copy_from_slice(&[0, 0]);
                    let sum: u32 = f[14..34]
                        .chunks(2)
                        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                        .sum();
                    let folded = (sum & 0xffff) + (sum >> 16);
                    let folded = (folded & 0xffff) + (folded >> 16);
                    f[24..26].copy_from_slice(&(!(folded as u16)).to_be_bytes());
                }
                f
            })
            .collect();
        if templates.is_empty() {
            return 0;
        }
        ferry_testkit::netns::in_ns(&self.generator_ns, || {
            if let Some(cpu) = cpu {
                let _ = pin_to(cpu);
            }
            let Ok(generator) = ferry_relay::xdp::flood::Generator::load(SOURCES) else {
                return 0;
            };
            let (mut sent, mut next) = (0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let template = &templates[next % templates.len()];
                next += 1;
                // 65,536 frames a call: each call sets up a page pool, so smaller calls send
                // far less.
                match generator.run(template, self.ifindex, 65_536, Duration::from_millis(1)) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            sent
        })
        .unwrap_or(0)
    }
}

impl Drop for XdpFlooder {
    fn drop(&mut self) {
        let (ns, interface) = &self.relay_if;
        let _ = std::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "ethtool", "-K", interface, "gro", "off",
            ])
            .output();
    }
}

/// Sends `frames` in turn on the packet socket `raw` until `stop`, from the calling thread
/// pinned to `cpu`; returns how many the kernel took.
pub fn send(raw: &UdpSocket, frames: &[Vec<u8>], cpu: Option<usize>, stop: &AtomicBool) -> u64 {
    if let Some(cpu) = cpu {
        let _ = pin_to(cpu);
    }
    let mut batch = Batch::new(BATCH);
    let (mut sent, mut next) = (0u64, 0usize);
    while !stop.load(Ordering::Relaxed) {
        for slot in 0..batch.len() {
            batch.fill_slot_unaddressed(slot, &frames[next % frames.len()]);
            next += 1;
        }
        if let Ok(n) = batch.send(raw, BATCH) {
            sent += n as u64;
        }
    }
    sent
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    anyhow::ensure!(parts.len() == 6, "{text:?} is not a MAC address");
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text:?}"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_has_a_valid_ipv4_checksum_and_lengths() {
        let f = frame(
            [2; 6],
            [4; 6],
            "198.18.240.7:1234".parse().expect("src"),
            "198.18.30.1:7000".parse().expect("dst"),
            &[9u8; 100],
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 100);
        let sum: u32 = f[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!((folded & 0xffff) + (folded >> 16), 0xffff, "checksum");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 128);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 108);
        assert_eq!(
            parse_mac("02:04:0a:ff:00:01").expect("mac"),
            [2, 4, 10, 255, 0, 1]
        );
        assert!(parse_mac("02:04").is_err());
    }
}
