use super::*;
use proptest::prelude::*;

/// A stand-in for `MAC(K, ·)`: any function of the whole input will do for the codec.
fn test_mac(input: &[u8]) -> Mac {
    let mut mac = [0u8; MAC_LEN];
    for (i, byte) in input.iter().enumerate() {
        let at = i % MAC_LEN;
        mac[at] = mac[at].rotate_left(3) ^ byte ^ (i as u8);
    }
    mac
}

const SESSION: u64 = 0x0123_4567_89ab_cdef;
const TOKEN: [u8; TOKEN_LEN] = [0x5a; TOKEN_LEN];

fn bind_fields() -> BindFields<'static> {
    BindFields {
        slot: Slot::B,
        bind_seq: 1_700_000_000_000_000,
        cookie: [7; COOKIE_LEN],
        token: &TOKEN,
    }
}

fn bind_ack_fields() -> BindAckFields {
    BindAckFields {
        slot: Slot::A,
        peer_present: true,
        idle_timeout_secs: 60,
        bind_seq: 42,
        expires_at: 1_800_000_000,
    }
}

fn reject_fields() -> RejectFields {
    RejectFields {
        reason: RejectReason::SessionFull,
        slot: Slot::B,
        bind_seq: 43,
    }
}

fn rebind_fields() -> RebindFields {
    RebindFields {
        slot: Slot::A,
        bind_seq: 44,
        cookie: [9; COOKIE_LEN],
    }
}

fn close_fields() -> CloseFields {
    CloseFields {
        slot: Slot::B,
        reason: CloseReason::Idle,
        seq: 45,
    }
}

/// Encodes with `encode` into a fresh buffer and returns exactly the datagram.
fn encoded(encode: impl FnOnce(&mut [u8]) -> Result<usize, WireError>) -> Vec<u8> {
    let mut buf = [0xeeu8; MAX_DATAGRAM];
    let len = encode(&mut buf).unwrap();
    buf[..len].to_vec()
}

/// One valid datagram of every packet type (REJECT both ways).
fn samples() -> Vec<Vec<u8>> {
    vec![
        encoded(|b| encode_bind(b, SESSION, &bind_fields(), test_mac)),
        encoded(|b| {
            encode_challenge(
                b,
                SESSION,
                &ChallengeFields {
                    bind_seq: 41,
                    cookie: [3; COOKIE_LEN],
                },
            )
        }),
        encoded(|b| encode_bind_ack(b, SESSION, &bind_ack_fields(), test_mac)),
        encoded(|b| encode_reject(b, SESSION, &reject_fields(), test_mac)),
        encoded(|b| encode_reject_unauthenticated(b, SESSION, &reject_fields())),
        encoded(|b| encode_data(b, SESSION, b"\x04hello")),
        encoded(|b| encode_data(b, SESSION, &[0xab; MAX_DATA_BODY])),
        encoded(|b| encode_keepalive(b, SESSION)),
        encoded(|b| encode_rebind(b, SESSION, &rebind_fields(), test_mac)),
        encoded(|b| encode_close(b, SESSION, &close_fields(), test_mac)),
    ]
}

/// The MAC input and MAC of a MAC'd packet (an unauthenticated REJECT included).
fn mac_parts<'a>(packet: &Packet<'a>) -> Option<(&'a [u8], &'a Mac)> {
    match packet {
        Packet::Bind(p) => Some((p.mac_input(), p.mac())),
        Packet::BindAck(p) => Some((p.mac_input(), p.mac())),
        Packet::Reject(p) => Some((p.mac_input(), p.mac())),
        Packet::Rebind(p) => Some((p.mac_input(), p.mac())),
        Packet::Close(p) => Some((p.mac_input(), p.mac())),
        Packet::Challenge(_) | Packet::Data(_) | Packet::Keepalive(_) => None,
    }
}

#[test]
fn datagram_lengths_match_section_7() {
    let lengths: Vec<usize> = samples().iter().map(Vec::len).collect();
    assert_eq!(lengths, [268, 40, 56, 44, 44, 22, 1472, 16, 60, 44]);
}

#[test]
fn samples_parse_to_their_fields() {
    let samples = samples();
    let packets: Vec<Packet<'_>> = samples.iter().map(|s| parse(s).unwrap()).collect();
    let Packet::Bind(bind) = packets[0] else {
        panic!("{:?}", packets[0])
    };
    assert_eq!(bind.fields(), bind_fields());
    assert_eq!(bind.session_id(), SESSION);
    assert_eq!(bind.mac_input().len(), HEADER_LEN + 236);
    assert_eq!(*bind.mac(), test_mac(bind.mac_input()));
    let Packet::Reject(reject) = packets[4] else {
        panic!("{:?}", packets[4])
    };
    assert!(!reject.authenticated());
    assert_eq!(reject.mac(), &[0; MAC_LEN]);
    let Packet::Data(data) = packets[5] else {
        panic!("{:?}", packets[5])
    };
    assert_eq!(data.payload(), b"\x04hello");
    assert_eq!(data.as_bytes(), &samples[5][..]);
    for (packet, sample) in packets.iter().zip(&samples) {
        assert_eq!(packet.header(), parse_header(sample).unwrap());
        if let Some((input, mac)) = mac_parts(packet) {
            assert_eq!(input.len() + MAC_LEN, sample.len());
            assert_eq!(&sample[..input.len()], input);
            assert_eq!(&sample[input.len()..], mac);
        }
    }
}

#[test]
fn bind_layout_matches_section_3_1() {
    let bytes = &samples()[0];
    assert_eq!(&bytes[..4], &[0x46, 0x52, 1, 1]);
    assert_eq!(&bytes[4..12], &SESSION.to_be_bytes());
    assert_eq!(&bytes[12..16], &[0, 252, 0, 0]);
    let body = &bytes[HEADER_LEN..];
    assert_eq!(&body[..4], &[1, 0, 0, 208]);
    assert_eq!(&body[4..12], &1_700_000_000_000_000u64.to_be_bytes());
    assert_eq!(&body[12..28], &[7; 16]);
    assert_eq!(&body[28..236], &TOKEN);
}

#[test]
fn every_truncation_or_extension_is_rejected() {
    for sample in samples() {
        for len in 0..sample.len() {
            assert!(parse(&sample[..len]).is_err(), "{:?}", &sample[..len]);
        }
        let mut longer = sample.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());
    }
}

#[test]
fn every_bit_flip_is_rejected_or_detectable() {
    for sample in samples() {
        let original = parse(&sample).unwrap();
        for bit in 0..sample.len() * 8 {
            let mut flipped = sample.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let Ok(packet) = parse(&flipped) else {
                continue;
            };
            assert_ne!(packet, original, "bit {bit}");
            if let Some(parts) = mac_parts(&original) {
                assert_ne!(mac_parts(&packet), Some(parts), "bit {bit}");
            }
        }
    }
}

/// Writes `value` at body offset `at` of `sample` and expects `error` from `parse`.
fn assert_body_error(sample: &[u8], at: usize, value: u8, error: WireError) {
    let mut bytes = sample.to_vec();
    bytes[HEADER_LEN + at] = value;
    assert_eq!(parse(&bytes), Err(error), "body[{at}] = {value}");
}

#[test]
fn each_body_rule_has_its_error() {
    let s = samples();
    let (bind, ack, reject, unauth, rebind, close) = (&s[0], &s[2], &s[3], &s[4], &s[8], &s[9]);
    // Slots.
    for sample in [bind, ack, rebind, close] {
        assert_body_error(sample, 0, 2, WireError::BadSlot(2));
    }
    assert_body_error(reject, 1, 0xff, WireError::BadSlot(0xff));
    // Reserved bytes.
    assert_body_error(bind, 1, 1, WireError::ReservedNonZero);
    for at in [2, 3] {
        assert_body_error(ack, at, 1, WireError::ReservedNonZero);
    }
    assert_body_error(reject, 3, 0x80, WireError::ReservedNonZero);
    for at in 1..4 {
        assert_body_error(rebind, at, 1, WireError::ReservedNonZero);
    }
    for at in 2..4 {
        assert_body_error(close, at, 1, WireError::ReservedNonZero);
    }
    // BIND token length.
    assert_body_error(bind, 3, 207, WireError::BadTokenLength(207));
    assert_body_error(bind, 2, 1, WireError::BadTokenLength(256 + 208));
    // REJECT reason and flags.
    assert_body_error(reject, 0, 0, WireError::UnknownRejectReason(0));
    assert_body_error(reject, 0, 10, WireError::UnknownRejectReason(10));
    // CLOSE reason.
    assert_body_error(close, 1, 3, WireError::UnknownCloseReason(3));
    assert_body_error(close, 1, 0xff, WireError::UnknownCloseReason(0xff));
    assert_body_error(reject, 2, 2, WireError::BadFlag(2));
    assert_body_error(ack, 1, 2, WireError::BadFlag(2));
    // Unauthenticated REJECT: the MAC field must be zero.
    assert_body_error(unauth, 27, 1, WireError::UnauthenticatedMacNonZero);
}

#[test]
fn header_errors_pass_through() {
    let mut bytes = samples()[7].clone();
    bytes[2] = 2;
    assert_eq!(
        parse(&bytes),
        Err(WireError::Header(HeaderError::BadVersion))
    );
    assert_eq!(parse(&[]), Err(WireError::Header(HeaderError::TooShort)));
}

#[test]
fn encoders_refuse_malformed_packets() {
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    let zero_session = WireError::Header(HeaderError::ZeroSession);
    let bad_len = WireError::Header(HeaderError::BodyLengthOutOfRange);
    assert_eq!(encode_keepalive(&mut buf, 0), Err(zero_session));
    assert_eq!(
        encode_bind(&mut buf, 0, &bind_fields(), test_mac),
        Err(zero_session)
    );
    assert_eq!(encode_data(&mut buf, SESSION, &[]), Err(bad_len));
    assert_eq!(
        encode_data(&mut buf, SESSION, &[0; MAX_DATA_BODY + 1]),
        Err(bad_len)
    );
    assert_eq!(encode_data_header(&mut buf, SESSION, 0), Err(bad_len));
    assert_eq!(
        encode_data_header(&mut buf, SESSION, MAX_DATA_BODY + 1),
        Err(bad_len)
    );
    assert_eq!(encode_data_header(&mut buf, SESSION, 1 << 20), Err(bad_len));
}

#[test]
fn data_header_lets_the_payload_be_written_in_place() {
    let payload = [0x42u8; 100];
    let mut buf = [0u8; HEADER_LEN + 100];
    assert_eq!(encode_data_header(&mut buf, SESSION, 100), Ok(HEADER_LEN));
    buf[HEADER_LEN..].copy_from_slice(&payload);
    assert_eq!(buf.to_vec(), encoded(|b| encode_data(b, SESSION, &payload)));
    // Only the header needs room.
    let mut header_only = [0u8; HEADER_LEN];
    assert_eq!(
        encode_data_header(&mut header_only, SESSION, 100),
        Ok(HEADER_LEN)
    );
    assert_eq!(header_only, buf[..HEADER_LEN]);
}

#[test]
fn small_buffers_give_buffer_too_small() {
    type Encoder = Box<dyn Fn(&mut [u8]) -> Result<usize, WireError>>;
    let encoders: Vec<(usize, Encoder)> = vec![
        (
            268,
            Box::new(|b| encode_bind(b, SESSION, &bind_fields(), test_mac)),
        ),
        (
            40,
            Box::new(|b| {
                encode_challenge(
                    b,
                    SESSION,
                    &ChallengeFields {
                        bind_seq: 1,
                        cookie: [0; 16],
                    },
                )
            }),
        ),
        (
            56,
            Box::new(|b| encode_bind_ack(b, SESSION, &bind_ack_fields(), test_mac)),
        ),
        (
            44,
            Box::new(|b| encode_reject(b, SESSION, &reject_fields(), test_mac)),
        ),
        (
            44,
            Box::new(|b| encode_reject_unauthenticated(b, SESSION, &reject_fields())),
        ),
        (21, Box::new(|b| encode_data(b, SESSION, b"hello"))),
        (16, Box::new(|b| encode_data_header(b, SESSION, 5))),
        (16, Box::new(|b| encode_keepalive(b, SESSION))),
        (
            60,
            Box::new(|b| encode_rebind(b, SESSION, &rebind_fields(), test_mac)),
        ),
        (
            44,
            Box::new(|b| encode_close(b, SESSION, &close_fields(), test_mac)),
        ),
    ];
    for (needed, encode) in encoders {
        let mut buf = vec![0u8; needed];
        assert_eq!(encode(&mut buf), Ok(needed));
        for available in 0..needed {
            assert_eq!(
                encode(&mut buf[..available]),
                Err(WireError::BufferTooSmall { needed, available })
            );
        }
    }
}

#[test]
fn encoders_write_only_their_datagram() {
    let mut buf = [0xeeu8; 100];
    let len = encode_close(&mut buf, SESSION, &close_fields(), test_mac).unwrap();
    assert!(buf[len..].iter().all(|&b| b == 0xee));
}

#[test]
fn reject_reasons_and_slots_round_trip() {
    for reason in RejectReason::ALL {
        assert_eq!(RejectReason::from_u8(reason.as_u8()), Some(reason));
    }
    assert_eq!(RejectReason::from_u8(0), None);
    assert_eq!(RejectReason::from_u8(10), None);
    for slot in [Slot::A, Slot::B] {
        assert_eq!(Slot::from_u8(slot.as_u8()), Some(slot));
        assert_eq!(slot.other().other(), slot);
    }
    assert_eq!(Slot::from_u8(2), None);
    for (value, reason) in CloseReason::ALL.into_iter().enumerate() {
        assert_eq!(usize::from(reason.as_u8()), value);
        assert_eq!(CloseReason::from_u8(reason.as_u8()), Some(reason));
    }
    assert_eq!(CloseReason::from_u8(3), None);
}

fn any_slot() -> impl Strategy<Value = Slot> {
    prop_oneof![Just(Slot::A), Just(Slot::B)]
}

fn any_reason() -> impl Strategy<Value = RejectReason> {
    prop::sample::select(RejectReason::ALL.to_vec())
}

fn any_session() -> impl Strategy<Value = u64> {
    1..=u64::MAX
}

/// Parses `bytes`, checks the MAC'd parts against [`test_mac`], and returns the packet.
fn parse_checked(bytes: &[u8]) -> Packet<'_> {
    let packet = parse(bytes).unwrap();
    if let Some((input, mac)) = mac_parts(&packet) {
        let authenticated = !matches!(packet, Packet::Reject(r) if !r.authenticated());
        if authenticated {
            assert_eq!(*mac, test_mac(input));
        }
    }
    packet
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1600)) {
        let wire = parse(&bytes);
        let header = parse_header(&bytes);
        match (&wire, header) {
            (Err(WireError::Header(w)), Err(h)) => prop_assert_eq!(*w, h),
            (Err(WireError::Header(_)), Ok(_)) | (_, Err(_)) => {
                prop_assert!(false, "disagree: {:?} {:?}", wire, header)
            }
            (Ok(packet), Ok(h)) => prop_assert_eq!(packet.header(), h),
            (Err(_), Ok(_)) => {}
        }
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        ty in prop::sample::select(PacketType::ALL.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = vec![0u8; HEADER_LEN];
        let header = Header {
            packet_type: ty,
            session_id: SESSION,
            body_len: body.len() as u16,
        };
        header.write((&mut bytes[..HEADER_LEN]).try_into().unwrap());
        bytes.extend_from_slice(&body);
        if let Ok(packet) = parse(&bytes) {
            prop_assert_eq!(packet.header(), header);
        }
    }

    #[test]
    fn bind_round_trips(
        session in any_session(),
        slot in any_slot(),
        bind_seq in any::<u64>(),
        cookie in any::<Cookie>(),
        token in proptest::array::uniform::<_, TOKEN_LEN>(any::<u8>()),
    ) {
        let fields = BindFields { slot, bind_seq, cookie, token: &token };
        let bytes = encoded(|b| encode_bind(b, session, &fields, test_mac));
        let Packet::Bind(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.fields(), fields);
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn challenge_round_trips(
        session in any_session(),
        bind_seq in any::<u64>(),
        cookie in any::<Cookie>(),
    ) {
        let fields = ChallengeFields { bind_seq, cookie };
        let bytes = encoded(|b| encode_challenge(b, session, &fields));
        let Packet::Challenge(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.fields(), fields);
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn bind_ack_round_trips(
        session in any_session(),
        slot in any_slot(),
        peer_present in any::<bool>(),
        idle_timeout_secs in any::<u32>(),
        bind_seq in any::<u64>(),
        expires_at in any::<u64>(),
    ) {
        let fields = BindAckFields { slot, peer_present, idle_timeout_secs, bind_seq, expires_at };
        let bytes = encoded(|b| encode_bind_ack(b, session, &fields, test_mac));
        let Packet::BindAck(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.fields(), fields);
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn reject_round_trips(
        session in any_session(),
        reason in any_reason(),
        slot in any_slot(),
        bind_seq in any::<u64>(),
        authenticated in any::<bool>(),
    ) {
        let fields = RejectFields { reason, slot, bind_seq };
        let bytes = if authenticated {
            encoded(|b| encode_reject(b, session, &fields, test_mac))
        } else {
            encoded(|b| encode_reject_unauthenticated(b, session, &fields))
        };
        let Packet::Reject(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.fields(), fields);
        prop_assert_eq!(p.authenticated(), authenticated);
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn data_round_trips(
        session in any_session(),
        payload in prop::collection::vec(any::<u8>(), 1..=MAX_DATA_BODY),
    ) {
        let bytes = encoded(|b| encode_data(b, session, &payload));
        let Packet::Data(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.payload(), &payload[..]);
        prop_assert_eq!(p.as_bytes(), &bytes[..]);
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn keepalive_round_trips(session in any_session()) {
        let bytes = encoded(|b| encode_keepalive(b, session));
        let Packet::Keepalive(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn rebind_round_trips(
        session in any_session(),
        slot in any_slot(),
        bind_seq in any::<u64>(),
        cookie in any::<Cookie>(),
    ) {
        let fields = RebindFields { slot, bind_seq, cookie };
        let bytes = encoded(|b| encode_rebind(b, session, &fields, test_mac));
        let Packet::Rebind(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.fields(), fields);
        prop_assert_eq!(p.session_id(), session);
    }

    #[test]
    fn close_round_trips(
        session in any_session(),
        slot in any_slot(),
        reason in prop::sample::select(CloseReason::ALL.to_vec()),
        seq in any::<u64>(),
    ) {
        let fields = CloseFields { slot, reason, seq };
        let bytes = encoded(|b| encode_close(b, session, &fields, test_mac));
        let Packet::Close(p) = parse_checked(&bytes) else { panic!() };
        prop_assert_eq!(p.fields(), fields);
        prop_assert_eq!(p.session_id(), session);
    }
}

proptest! {
    /// The XDP guard answers a cookie-less BIND or REBIND itself only if
    /// `ferry_common::header::handshake_body_ok` accepts its first four body bytes, and must
    /// then answer exactly what this parser accepts: for any first four body bytes (the other
    /// fields take any value), the two agree.
    #[test]
    fn the_guards_handshake_body_check_agrees_with_the_parser(
        first4 in prop_oneof![
            any::<[u8; 4]>(),
            (0u8..4, 0u8..2, any::<bool>()).prop_map(|(slot, reserved, exact)| {
                let len = if exact { TOKEN_LEN as u16 } else { TOKEN_LEN as u16 + 1 };
                let [hi, lo] = len.to_be_bytes();
                [slot, reserved, hi, lo]
            }),
            (0u8..4, 0u8..2, 0u8..2, 0u8..2).prop_map(|(a, b, c, d)| [a, b, c, d]),
        ],
        rest in any::<u8>(),
    ) {
        for packet_type in [PacketType::Bind, PacketType::Rebind] {
            let body_len = match packet_type {
                PacketType::Bind => BIND_BODY_LEN,
                _ => REBIND_BODY_LEN,
            };
            let mut datagram = vec![rest; HEADER_LEN + body_len];
            let mut header = [0u8; HEADER_LEN];
            Header {
                packet_type,
                session_id: SESSION,
                body_len: body_len as u16,
            }
            .write(&mut header);
            datagram[..HEADER_LEN].copy_from_slice(&header);
            datagram[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&first4);
            prop_assert_eq!(
                parse(&datagram).is_ok(),
                ferry_common::header::handshake_body_ok(packet_type, first4),
                "{:?} with body {:?}",
                packet_type,
                first4
            );
        }
    }
}
