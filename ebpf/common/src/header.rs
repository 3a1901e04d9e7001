//! The fixed 16-byte header of every relay-layer datagram and its stateless rules
//! (docs/protocol.md §2 and §3).
//!
//! [`check_header`] needs only the first [`HEADER_LEN`] bytes and the datagram length, so the XDP
//! guard copies those bytes to its stack after one bounds check and runs the *same* function the
//! relay and the peers run through [`parse_header`]. Nothing here allocates, loops or panics:
//! every index is a constant into a fixed-size array.

use core::fmt;

/// The two magic bytes that open every datagram: ASCII `FR` (§2).
pub const MAGIC: [u8; 2] = [0x46, 0x52];
/// The protocol version this code speaks (§2).
pub const VERSION: u8 = 1;
/// Length of the fixed header (§2).
pub const HEADER_LEN: usize = 16;
/// Largest datagram of the protocol: a 1500-byte IPv4 MTU minus IP and UDP headers (§1).
pub const MAX_DATAGRAM: usize = 1472;
/// Largest DATA body: [`MAX_DATAGRAM`] − [`HEADER_LEN`] (§3.5).
pub const MAX_DATA_BODY: usize = MAX_DATAGRAM - HEADER_LEN;
/// Smallest DATA body (§3).
pub const MIN_DATA_BODY: usize = 1;
/// Size of a relay token (§4); a BIND carries one, so it fixes the BIND body length.
pub const TOKEN_LEN: usize = 208;

/// Body length of a BIND (§3.1): 28 bytes of fields, the token and a 16-byte proof.
pub const BIND_BODY_LEN: usize = 28 + TOKEN_LEN + 16;
/// Body length of a CHALLENGE (§3.2).
pub const CHALLENGE_BODY_LEN: usize = 24;
/// Body length of a BIND-ACK (§3.3).
pub const BIND_ACK_BODY_LEN: usize = 40;
/// Body length of a REJECT (§3.4).
pub const REJECT_BODY_LEN: usize = 28;
/// Body length of a KEEPALIVE (§3.6).
pub const KEEPALIVE_BODY_LEN: usize = 0;
/// Body length of a REBIND (§3.7).
pub const REBIND_BODY_LEN: usize = 44;
/// Body length of a CLOSE (§3.8).
pub const CLOSE_BODY_LEN: usize = 28;

// The spec's table (§3) states these numbers; keep the derivations honest.
const _: () = assert!(BIND_BODY_LEN == 252);
const _: () = assert!(MAX_DATA_BODY == 1456);
// Every length fits the u16 body-length field, so the `as u16` casts below are lossless.
const _: () = assert!(MAX_DATAGRAM <= u16::MAX as usize);

/// The packet types of §3, with their wire values.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// BIND (0x01), peer → relay: claim a slot with a token and a slot proof.
    Bind = 1,
    /// CHALLENGE (0x02), relay → peer: an address cookie to repeat the request with.
    Challenge = 2,
    /// BIND-ACK (0x03), relay → peer: the slot is bound.
    BindAck = 3,
    /// REJECT (0x04), relay → peer: a BIND or REBIND failed, with a reason.
    Reject = 4,
    /// DATA (0x05), peer → relay → peer: an opaque end-to-end payload.
    Data = 5,
    /// KEEPALIVE (0x06), both ways: refresh the binding, empty body.
    Keepalive = 6,
    /// REBIND (0x07), peer → relay: move a binding to a new source address.
    Rebind = 7,
    /// CLOSE (0x08), both ways: end the session.
    Close = 8,
}

impl PacketType {
    /// Every packet type, in wire-value order.
    pub const ALL: [PacketType; 8] = [
        PacketType::Bind,
        PacketType::Challenge,
        PacketType::BindAck,
        PacketType::Reject,
        PacketType::Data,
        PacketType::Keepalive,
        PacketType::Rebind,
        PacketType::Close,
    ];

    /// The type with wire value `value`, or `None` when §3 defines no such type.
    pub const fn from_u8(value: u8) -> Option<PacketType> {
        match value {
            1 => Some(PacketType::Bind),
            2 => Some(PacketType::Challenge),
            3 => Some(PacketType::BindAck),
            4 => Some(PacketType::Reject),
            5 => Some(PacketType::Data),
            6 => Some(PacketType::Keepalive),
            7 => Some(PacketType::Rebind),
            8 => Some(PacketType::Close),
            _ => None,
        }
    }

    /// The wire value of the type.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The inclusive range `(min, max)` of body lengths the type allows (§3 table).
    pub const fn body_len_range(self) -> (u16, u16) {
        let (min, max) = match self {
            PacketType::Bind => (BIND_BODY_LEN, BIND_BODY_LEN),
            PacketType::Challenge => (CHALLENGE_BODY_LEN, CHALLENGE_BODY_LEN),
            PacketType::BindAck => (BIND_ACK_BODY_LEN, BIND_ACK_BODY_LEN),
            PacketType::Reject => (REJECT_BODY_LEN, REJECT_BODY_LEN),
            PacketType::Data => (MIN_DATA_BODY, MAX_DATA_BODY),
            PacketType::Keepalive => (KEEPALIVE_BODY_LEN, KEEPALIVE_BODY_LEN),
            PacketType::Rebind => (REBIND_BODY_LEN, REBIND_BODY_LEN),
            PacketType::Close => (CLOSE_BODY_LEN, CLOSE_BODY_LEN),
        };
        (min as u16, max as u16)
    }

    /// Whether a peer may send this type to the relay (BIND, DATA, KEEPALIVE, REBIND, CLOSE).
    ///
    /// The relay drops the relay-only types (CHALLENGE, BIND-ACK, REJECT) and counts them as
    /// `unexpected_type` (§7); they are well-formed, so [`check_header`] accepts them.
    pub const fn sent_by_peer(self) -> bool {
        match self {
            PacketType::Bind
            | PacketType::Data
            | PacketType::Keepalive
            | PacketType::Rebind
            | PacketType::Close => true,
            PacketType::Challenge | PacketType::BindAck | PacketType::Reject => false,
        }
    }
}

/// Which rule of §2.1 a datagram breaks. The variants are in the order the rules are checked.
///
/// The discriminants are stable and dense (`0..COUNT`), so per-CPU counter arrays in the XDP
/// program and the relay index by [`HeaderError::as_index`].
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderError {
    /// Rule 1: the datagram is shorter than [`HEADER_LEN`].
    TooShort = 0,
    /// Rule 1: the datagram is longer than [`MAX_DATAGRAM`].
    TooLong = 1,
    /// Rule 2: the magic is not [`MAGIC`].
    BadMagic = 2,
    /// Rule 3: the version is not [`VERSION`].
    BadVersion = 3,
    /// Rule 4: the type is not one of §3.
    UnknownType = 4,
    /// Rule 5: the session id is zero.
    ZeroSession = 5,
    /// Rule 6: the reserved header field is not zero.
    ReservedNonZero = 6,
    /// Rule 7: the body length field differs from the datagram length − [`HEADER_LEN`].
    LengthMismatch = 7,
    /// Rule 8: the body length is outside the range of the type ([`PacketType::body_len_range`]).
    BodyLengthOutOfRange = 8,
}

impl HeaderError {
    /// Number of variants: the length of a counter array indexed by [`HeaderError::as_index`].
    pub const COUNT: usize = 9;

    /// Every variant, in index order.
    pub const ALL: [HeaderError; HeaderError::COUNT] = [
        HeaderError::TooShort,
        HeaderError::TooLong,
        HeaderError::BadMagic,
        HeaderError::BadVersion,
        HeaderError::UnknownType,
        HeaderError::ZeroSession,
        HeaderError::ReservedNonZero,
        HeaderError::LengthMismatch,
        HeaderError::BodyLengthOutOfRange,
    ];

    /// A stable index in `0..COUNT`, for counter arrays.
    pub const fn as_index(self) -> usize {
        self as usize
    }

    /// A stable snake_case name; the drop counter for this rule is `malformed_<name>` (§7).
    pub const fn name(self) -> &'static str {
        match self {
            HeaderError::TooShort => "too_short",
            HeaderError::TooLong => "too_long",
            HeaderError::BadMagic => "bad_magic",
            HeaderError::BadVersion => "bad_version",
            HeaderError::UnknownType => "unknown_type",
            HeaderError::ZeroSession => "zero_session",
            HeaderError::ReservedNonZero => "reserved_non_zero",
            HeaderError::LengthMismatch => "length_mismatch",
            HeaderError::BodyLengthOutOfRange => "body_length_out_of_range",
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            HeaderError::TooShort => "datagram shorter than the 16-byte header",
            HeaderError::TooLong => "datagram longer than 1472 bytes",
            HeaderError::BadMagic => "bad magic",
            HeaderError::BadVersion => "unsupported version",
            HeaderError::UnknownType => "unknown packet type",
            HeaderError::ZeroSession => "session id is zero",
            HeaderError::ReservedNonZero => "reserved header field is not zero",
            HeaderError::LengthMismatch => "body length does not match the datagram length",
            HeaderError::BodyLengthOutOfRange => "body length not allowed for the packet type",
        };
        f.write_str(what)
    }
}

impl core::error::Error for HeaderError {}

/// A well-formed header: the fields left once the rules of §2.1 hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The packet type (§3).
    pub packet_type: PacketType,
    /// The session id, never zero in a checked header.
    pub session_id: u64,
    /// The body length, equal to the datagram length − [`HEADER_LEN`] in a checked header.
    pub body_len: u16,
}

impl Header {
    /// The length of the datagram this header opens: [`HEADER_LEN`] + body length.
    pub const fn datagram_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    /// Writes the header's 16 bytes (magic, version, type, session id, body length, reserved 0).
    ///
    /// It writes the fields as they are; [`check_header`] on the result accepts it only when
    /// the session id is not zero and the body length fits the type.
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        let [m0, m1] = MAGIC;
        let [s0, s1, s2, s3, s4, s5, s6, s7] = self.session_id.to_be_bytes();
        let [l0, l1] = self.body_len.to_be_bytes();
        let t = self.packet_type.as_u8();
        *out = [
            m0, m1, VERSION, t, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, 0, 0,
        ];
    }
}

/// Checks the rules of §2.1, in order, on the first [`HEADER_LEN`] bytes of a datagram of
/// `datagram_len` bytes, and returns the header or the first rule broken.
///
/// When `datagram_len` < [`HEADER_LEN`] the contents of `first16` do not matter: rule 1 fails
/// first.
///
/// Always inlined: the XDP program calls it, and BPF functions cannot return a value this
/// large.
#[inline(always)]
pub fn check_header(
    first16: &[u8; HEADER_LEN],
    datagram_len: usize,
) -> Result<Header, HeaderError> {
    // Rule 1.
    if datagram_len < HEADER_LEN {
        return Err(HeaderError::TooShort);
    }
    if datagram_len > MAX_DATAGRAM {
        return Err(HeaderError::TooLong);
    }
    let [
        m0,
        m1,
        version,
        ty,
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
        l0,
        l1,
        r0,
        r1,
    ] = *first16;
    // Rules 2–6.
    if [m0, m1] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if version != VERSION {
        return Err(HeaderError::BadVersion);
    }
    let Some(packet_type) = PacketType::from_u8(ty) else {
        return Err(HeaderError::UnknownType);
    };
    let session_id = u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    if session_id == 0 {
        return Err(HeaderError::ZeroSession);
    }
    if r0 != 0 || r1 != 0 {
        return Err(HeaderError::ReservedNonZero);
    }
    // Rule 7. `datagram_len` ≤ MAX_DATAGRAM here, so the subtraction cannot wrap.
    let body_len = u16::from_be_bytes([l0, l1]);
    if usize::from(body_len) != datagram_len - HEADER_LEN {
        return Err(HeaderError::LengthMismatch);
    }
    // Rule 8.
    let (min, max) = packet_type.body_len_range();
    if body_len < min || body_len > max {
        return Err(HeaderError::BodyLengthOutOfRange);
    }
    Ok(Header {
        packet_type,
        session_id,
        body_len,
    })
}

/// Checks the header of a whole datagram: [`check_header`] on its first [`HEADER_LEN`] bytes.
pub fn parse_header(datagram: &[u8]) -> Result<Header, HeaderError> {
    match datagram.first_chunk::<HEADER_LEN>() {
        Some(first16) => check_header(first16, datagram.len()),
        None => Err(HeaderError::TooShort),
    }
}

/// Whether the first four body bytes of a BIND or REBIND keep the body rules of §3 that
/// concern them: the slot is 0 or 1, the reserved bytes are zero (BIND byte 1, REBIND bytes
/// 1–3), and a BIND's token length is `TOKEN_LEN`. These are all of the two types' body rules
/// (their other fields take any value); the relay's parser (`ferry_core::wire`) checks the
/// same, and the XDP guard checks them before it answers a request with a CHALLENGE itself,
/// since the relay answers a request that breaks one with nothing. `false` for other types.
#[inline(always)]
pub fn handshake_body_ok(packet_type: PacketType, first4: [u8; 4]) -> bool {
    let slot_ok = first4[0] <= 1;
    match packet_type {
        PacketType::Bind => {
            slot_ok
                && first4[1] == 0
                && u16::from_be_bytes([first4[2], first4[3]]) == TOKEN_LEN as u16
        }
        PacketType::Rebind => slot_ok && first4[1] == 0 && first4[2] == 0 && first4[3] == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// A datagram with a valid header for `packet_type` and a zero body of `body_len` bytes.
    fn datagram(packet_type: PacketType, session_id: u64, body_len: u16) -> Vec<u8> {
        let mut bytes = std::vec![0u8; HEADER_LEN + usize::from(body_len)];
        let mut first16 = [0u8; HEADER_LEN];
        Header {
            packet_type,
            session_id,
            body_len,
        }
        .write(&mut first16);
        bytes[..HEADER_LEN].copy_from_slice(&first16);
        bytes
    }

    fn keepalive() -> Vec<u8> {
        datagram(PacketType::Keepalive, 7, 0)
    }

    #[test]
    fn body_lengths_match_the_spec_table() {
        let expected = [
            (PacketType::Bind, (252, 252)),
            (PacketType::Challenge, (24, 24)),
            (PacketType::BindAck, (40, 40)),
            (PacketType::Reject, (28, 28)),
            (PacketType::Data, (1, 1456)),
            (PacketType::Keepalive, (0, 0)),
            (PacketType::Rebind, (44, 44)),
            (PacketType::Close, (28, 28)),
        ];
        for (ty, range) in expected {
            assert_eq!(ty.body_len_range(), range, "{ty:?}");
        }
    }

    #[test]
    fn type_values_round_trip_and_others_are_unknown() {
        for ty in PacketType::ALL {
            assert_eq!(PacketType::from_u8(ty.as_u8()), Some(ty));
        }
        for value in (0..=u8::MAX).filter(|v| !(1..=8).contains(v)) {
            assert_eq!(PacketType::from_u8(value), None);
        }
    }

    #[test]
    fn only_bind_data_keepalive_rebind_close_come_from_peers() {
        let from_peers: Vec<_> = PacketType::ALL
            .into_iter()
            .filter(|t| t.sent_by_peer())
            .collect();
        assert_eq!(
            from_peers,
            [
                PacketType::Bind,
                PacketType::Data,
                PacketType::Keepalive,
                PacketType::Rebind,
                PacketType::Close
            ]
        );
    }

    #[test]
    fn error_indices_are_dense_and_names_unique() {
        for (i, e) in HeaderError::ALL.into_iter().enumerate() {
            assert_eq!(e.as_index(), i);
            assert!(
                e.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
        let mut names: Vec<_> = HeaderError::ALL.iter().map(|e| e.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HeaderError::COUNT);
    }

    #[test]
    fn too_short() {
        assert_eq!(parse_header(&[]), Err(HeaderError::TooShort));
        assert_eq!(parse_header(&keepalive()[..15]), Err(HeaderError::TooShort));
        // check_header with a short length ignores the bytes.
        let first16: [u8; HEADER_LEN] = keepalive()[..].try_into().unwrap();
        assert_eq!(check_header(&first16, 15), Err(HeaderError::TooShort));
    }

    #[test]
    fn too_long() {
        let mut bytes = datagram(PacketType::Data, 7, 1456);
        assert!(parse_header(&bytes).is_ok());
        bytes.push(0);
        assert_eq!(parse_header(&bytes), Err(HeaderError::TooLong));
    }

    #[test]
    fn bad_magic() {
        for at in [0, 1] {
            let mut bytes = keepalive();
            bytes[at] ^= 0x20;
            assert_eq!(parse_header(&bytes), Err(HeaderError::BadMagic));
        }
    }

    #[test]
    fn bad_version() {
        for version in [0, 2, 0xff] {
            let mut bytes = keepalive();
            bytes[2] = version;
            assert_eq!(parse_header(&bytes), Err(HeaderError::BadVersion));
        }
    }

    #[test]
    fn unknown_type() {
        for ty in [0, 9, 0xff] {
            let mut bytes = keepalive();
            bytes[3] = ty;
            assert_eq!(parse_header(&bytes), Err(HeaderError::UnknownType));
        }
    }

    #[test]
    fn zero_session() {
        let bytes = datagram(PacketType::Keepalive, 0, 0);
        assert_eq!(parse_header(&bytes), Err(HeaderError::ZeroSession));
    }

    #[test]
    fn reserved_non_zero() {
        for at in [14, 15] {
            let mut bytes = keepalive();
            bytes[at] = 1;
            assert_eq!(parse_header(&bytes), Err(HeaderError::ReservedNonZero));
        }
    }

    #[test]
    fn length_mismatch() {
        let mut bytes = datagram(PacketType::Data, 7, 10);
        bytes.pop();
        assert_eq!(parse_header(&bytes), Err(HeaderError::LengthMismatch));
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(parse_header(&bytes), Err(HeaderError::LengthMismatch));
    }

    #[test]
    fn body_length_out_of_range() {
        for (ty, len) in [
            (PacketType::Data, 0),
            (PacketType::Keepalive, 1),
            (PacketType::Bind, 251),
            (PacketType::Bind, 253),
            (PacketType::Close, 44),
        ] {
            let bytes = datagram(ty, 7, len);
            assert_eq!(
                parse_header(&bytes),
                Err(HeaderError::BodyLengthOutOfRange),
                "{ty:?} {len}"
            );
        }
    }

    #[test]
    fn rules_are_checked_in_order() {
        // Everything wrong at once: rule 2 is the first to report.
        let bytes = [0xffu8; 20];
        assert_eq!(parse_header(&bytes), Err(HeaderError::BadMagic));
        let mut bytes = datagram(PacketType::Data, 0, 4);
        bytes[14] = 1;
        bytes[12] = 9;
        assert_eq!(parse_header(&bytes), Err(HeaderError::ZeroSession));
    }

    fn any_type() -> impl Strategy<Value = PacketType> {
        prop::sample::select(PacketType::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1600)) {
            let parsed = parse_header(&bytes);
            if let Ok(header) = parsed {
                prop_assert_eq!(header.datagram_len(), bytes.len());
            }
        }

        #[test]
        fn arbitrary_first16_and_length_never_panic(
            first16 in any::<[u8; HEADER_LEN]>(),
            len in any::<usize>(),
        ) {
            let _ = check_header(&first16, len);
        }

        #[test]
        fn valid_header_round_trips(
            ty in any_type(),
            session_id in 1..=u64::MAX,
            fill in any::<u8>(),
            len_seed in any::<u16>(),
        ) {
            let (min, max) = ty.body_len_range();
            let body_len = min + len_seed % (max - min + 1);
            let header = Header { packet_type: ty, session_id, body_len };
            let mut bytes = std::vec![fill; header.datagram_len()];
            let mut first16 = [0u8; HEADER_LEN];
            header.write(&mut first16);
            bytes[..HEADER_LEN].copy_from_slice(&first16);
            prop_assert_eq!(parse_header(&bytes), Ok(header));
            prop_assert_eq!(check_header(&first16, bytes.len()), Ok(header));
        }
    }
}
