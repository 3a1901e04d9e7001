//! Fuzz target for the relay-layer codec (docs/protocol.md §2–§3).
//!
//! For any bytes: `ferry_core::wire::parse` and `ferry_common::header::parse_header` (the code
//! the XDP guard runs) must agree on the header, neither may panic, and every packet `parse`
//! accepts must re-encode to exactly the same bytes (the encoding is canonical).
//!
//! Random bytes rarely carry a valid header, so each input is also checked a second time with
//! its header repaired (magic, version, type, session id, length), which sends the fuzzer
//! straight into the body rules of every packet type.
#![no_main]

use ferry_common::header::parse_header;
use ferry_core::wire::{
    self, Mac, Packet, WireError, encode_bind, encode_bind_ack, encode_challenge, encode_close,
    encode_data, encode_data_header, encode_keepalive, encode_rebind, encode_reject,
    encode_reject_unauthenticated,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(repaired) = with_valid_header(data) {
        check(&repaired);
    }
});

/// `data` with the stateless header rules made to hold, keeping the type (mod 8) and session
/// id bits; `None` when `data` cannot hold a header or is longer than a datagram.
fn with_valid_header(data: &[u8]) -> Option<Vec<u8>> {
    let body_len = u16::try_from(data.len().checked_sub(wire::HEADER_LEN)?).ok()?;
    if data.len() > wire::MAX_DATAGRAM {
        return None;
    }
    let mut bytes = data.to_vec();
    let first16: &mut [u8; wire::HEADER_LEN] = bytes.first_chunk_mut()?;
    let [m0, m1] = ferry_common::header::MAGIC;
    first16[..3].copy_from_slice(&[m0, m1, ferry_common::header::VERSION]);
    first16[3] = first16[3] % 8 + 1;
    if first16[4..12].iter().all(|&b| b == 0) {
        first16[11] = 1;
    }
    first16[12..14].copy_from_slice(&body_len.to_be_bytes());
    first16[14..16].fill(0);
    Some(bytes)
}

/// Parses `data` both ways and checks agreement and the round trip.
fn check(data: &[u8]) {
    let packet = wire::parse(data);
    let header = parse_header(data);
    match (&packet, header) {
        (Err(WireError::Header(w)), Err(h)) => assert_eq!(*w, h),
        (Err(WireError::Header(w)), Ok(h)) => panic!("wire says {w}, header says {h:?}"),
        (_, Err(h)) => panic!("header says {h}, wire says {packet:?}"),
        (Err(_), Ok(_)) => {}
        (Ok(p), Ok(h)) => {
            assert_eq!(p.header(), h);
            assert_eq!(reencode(p), data);
        }
    }
}

/// A MAC closure that checks it is handed the parsed MAC input and returns the parsed MAC.
fn same_mac<'a>(input: &'a [u8], mac: &'a Mac) -> impl FnOnce(&[u8]) -> Mac + 'a {
    move |given| {
        assert_eq!(
            given, input,
            "encoder MAC input differs from parsed mac_input"
        );
        *mac
    }
}

/// Encodes `packet` again from its fields.
fn reencode(packet: &Packet<'_>) -> Vec<u8> {
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let session = packet.session_id();
    let len = match packet {
        Packet::Bind(p) => encode_bind(
            &mut buf,
            session,
            &p.fields(),
            same_mac(p.mac_input(), p.mac()),
        ),
        Packet::Challenge(p) => encode_challenge(&mut buf, session, &p.fields()),
        Packet::BindAck(p) => encode_bind_ack(
            &mut buf,
            session,
            &p.fields(),
            same_mac(p.mac_input(), p.mac()),
        ),
        Packet::Reject(p) if p.authenticated() => encode_reject(
            &mut buf,
            session,
            &p.fields(),
            same_mac(p.mac_input(), p.mac()),
        ),
        Packet::Reject(p) => encode_reject_unauthenticated(&mut buf, session, &p.fields()),
        Packet::Data(p) => {
            let mut header_only = [0u8; wire::HEADER_LEN];
            let header_len = encode_data_header(&mut header_only, session, p.payload().len());
            assert_eq!(header_len, Ok(wire::HEADER_LEN));
            assert_eq!(header_only[..], p.as_bytes()[..wire::HEADER_LEN]);
            encode_data(&mut buf, session, p.payload())
        }
        Packet::Keepalive(_) => encode_keepalive(&mut buf, session),
        Packet::Rebind(p) => encode_rebind(
            &mut buf,
            session,
            &p.fields(),
            same_mac(p.mac_input(), p.mac()),
        ),
        Packet::Close(p) => encode_close(
            &mut buf,
            session,
            &p.fields(),
            same_mac(p.mac_input(), p.mac()),
        ),
    };
    let len = len.expect("a parsed packet re-encodes");
    buf[..len].to_vec()
}
