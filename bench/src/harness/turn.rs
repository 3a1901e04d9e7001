//! Just enough of TURN (RFC 8656) over UDP to drive coturn as a baseline: an Allocate and a
//! ChannelBind without credentials (coturn runs with `no-auth` on the test addresses), then
//! ChannelData. Not a TURN client for anything else.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// The STUN magic cookie.
const MAGIC: u32 = 0x2112_a442;
const ALLOCATE: u16 = 0x0003;
const CHANNEL_BIND: u16 = 0x0009;
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;
const ATTR_CHANNEL_NUMBER: u16 = 0x000c;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
const ATTR_ERROR_CODE: u16 = 0x0009;
/// The first channel number a client may bind.
pub const FIRST_CHANNEL: u16 = 0x4000;

/// A ChannelData message: `channel`, length, `data` (no padding, which UDP does not need).
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn request(kind: u16, txid: [u8; 12], attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (t, v) in attrs {
        body.extend_from_slice(&t.to_be_bytes());
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
        while body.len() % 4 != 0 {
            body.push(0);
        }
    }
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&txid);
    out.extend_from_slice(&body);
    out
}

fn xor_address(addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let IpAddr::V4(ip) = addr.ip() else {
        bail!("the TURN baseline drives IPv4 only");
    };
    let mut v = vec![0, 0x01];
    v.extend_from_slice(&(addr.port() ^ (MAGIC >> 16) as u16).to_be_bytes());
    v.extend_from_slice(&(u32::from(ip) ^ MAGIC).to_be_bytes());
    Ok(v)
}

fn parse_xor_address(v: &[u8]) -> anyhow::Result<SocketAddr> {
    if v.len() < 8 || v[1] != 0x01 {
        bail!("an XOR address that is not IPv4");
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC;
    Ok(SocketAddr::new(IpAddr::V4(ip.into()), port))
}

/// The attributes of a success response to the request `txid` of `kind`.
fn response(buf: &[u8], kind: u16, txid: [u8; 12]) -> anyhow::Result<Vec<(u16, Vec<u8>)>> {
    if buf.len() < 20 || buf[4..8] != MAGIC.to_be_bytes() || buf[8..20] != txid {
        bail!("not the STUN response expected");
    }
    let t = u16::from_be_bytes([buf[0], buf[1]]);
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let body = buf.get(20..20 + len).context("a truncated STUN message")?;
    let mut attrs = Vec::new();
    let mut at = 0;
    while at + 4 <= body.len() {
        let at_type = u16::from_be_bytes([body[at], body[at + 1]]);
        let at_len = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body
            .get(at + 4..at + 4 + at_len)
            .context("a truncated STUN attribute")?;
        attrs.push((at_type, value.to_vec()));
        at += 4 + at_len.div_ceil(4) * 4;
    }
    if t == kind | ERROR {
        let reason = attrs
            .iter()
            .find(|(a, _)| *a == ATTR_ERROR_CODE)
            .map(|(_, v)| {
                let code = v.get(2).map_or(0, |c| u16::from(*c) * 100)
                    + v.get(3).map_or(0, |c| u16::from(*c));
                format!(
                    "{code} {}",
                    String::from_utf8_lossy(v.get(4..).unwrap_or_default())
                )
            })
            .unwrap_or_default();
        bail!("TURN error response: {reason}");
    }
    if t != kind | SUCCESS {
        bail!("unexpected STUN message type {t:#06x}");
    }
    Ok(attrs)
}

fn transact(
    sock: &UdpSocket,
    server: SocketAddr,
    kind: u16,
    attrs: &[(u16, Vec<u8>)],
    txid: [u8; 12],
) -> anyhow::Result<Vec<(u16, Vec<u8>)>> {
    let msg = request(kind, txid, attrs);
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 1500];
    for _ in 0..6 {
        sock.send_to(&msg, server)?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return response(&buf[..n], kind, txid),
            Err(e) if ferry_testkit::is_read_timeout(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    bail!("no answer from the TURN server at {server}")
}

/// Allocates a relayed address on `server` for `sock` and binds `channel` to `peer`;
/// returns the relayed address (where `peer` sees the data come from).
pub fn allocate_and_bind(
    sock: &UdpSocket,
    server: SocketAddr,
    peer: SocketAddr,
    channel: u16,
    txid_seed: u64,
) -> anyhow::Result<SocketAddr> {
    let txid = |n: u32| {
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&txid_seed.to_be_bytes());
        t[8..].copy_from_slice(&n.to_be_bytes());
        t
    };
    // REQUESTED-TRANSPORT: UDP (17), then three reserved bytes.
    let attrs = transact(
        sock,
        server,
        ALLOCATE,
        &[(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        txid(1),
    )
    .context("TURN Allocate")?;
    let relayed = attrs
        .iter()
        .find(|(t, _)| *t == ATTR_XOR_RELAYED_ADDRESS)
        .context("no XOR-RELAYED-ADDRESS in the Allocate response")
        .and_then(|(_, v)| parse_xor_address(v))?;
    let mut number = channel.to_be_bytes().to_vec();
    number.extend_from_slice(&[0, 0]);
    transact(
        sock,
        server,
        CHANNEL_BIND,
        &[
            (ATTR_CHANNEL_NUMBER, number),
            (ATTR_XOR_PEER_ADDRESS, xor_address(peer)?),
        ],
        txid(2),
    )
    .context("TURN ChannelBind")?;
    Ok(relayed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_xor_address_round_trip() {
        let addr: SocketAddr = "198.19.5.2:40000".parse().expect("addr");
        let v = xor_address(addr).expect("v4");
        assert_eq!(parse_xor_address(&v).expect("parse"), addr);
        let txid = [7u8; 12];
        let mut msg = request(ALLOCATE | SUCCESS, txid, &[(ATTR_XOR_RELAYED_ADDRESS, v)]);
        let attrs = response(&msg, ALLOCATE, txid).expect("a success response");
        assert_eq!(attrs.len(), 1);
        assert!(response(&msg, ALLOCATE, [8u8; 12]).is_err(), "another txid");
        msg[0..2].copy_from_slice(&(ALLOCATE | ERROR).to_be_bytes());
        assert!(response(&msg, ALLOCATE, txid).is_err(), "an error response");
        assert!(response(&msg[..10], ALLOCATE, txid).is_err(), "truncated");
    }
}
