//! The relay-layer packet codec: docs/protocol.md §2 (the fixed header) and §3 (the packet
//! types and their bodies).
//!
//! [`parse`] first applies the stateless header rules of §2.1, with the very code the XDP guard
//! runs ([`ferry_common::header::parse_header`]), then matches `(type, body length)` once and
//! returns a [`Packet`] whose views borrow the caller's datagram: nothing is copied or allocated
//! per packet. The views check the body rules the header cannot see (reserved bytes zero, slot
//! 0 or 1, token length, known REJECT and CLOSE reasons, 0/1 flags) and expose typed accessors; the
//! MAC'd packets (BIND, BIND-ACK, REJECT, REBIND, CLOSE) also expose `mac_input()`, the header
//! and body up to the MAC field (§6), and `mac()`. This module does not verify MACs, tokens or
//! cookies: it only says what the bytes are; `proof` and `token` decide whether to believe them.
//!
//! The `encode_*` functions write one datagram into a caller's buffer and return its length.
//! The encoders of MAC'd packets take the MAC as a closure over the MAC input, so the caller's
//! key never enters this module. Encoders refuse to produce a datagram that [`parse`] would
//! reject.

use ferry_common::header::parse_header;
pub use ferry_common::header::{
    BIND_ACK_BODY_LEN, BIND_BODY_LEN, CHALLENGE_BODY_LEN, CLOSE_BODY_LEN, HEADER_LEN, Header,
    HeaderError, KEEPALIVE_BODY_LEN, MAX_DATA_BODY, MAX_DATAGRAM, MIN_DATA_BODY, PacketType,
    REBIND_BODY_LEN, REJECT_BODY_LEN, TOKEN_LEN,
};

/// Length of a slot proof or relay MAC (§6).
pub const MAC_LEN: usize = 16;
/// Length of an address cookie (§5).
pub const COOKIE_LEN: usize = 16;

/// A slot proof or relay MAC: `HMAC-SHA256(K, header ‖ body up to the MAC)[0..16]` (§6).
pub type Mac = [u8; MAC_LEN];
/// An address cookie (§5); all zero in a first BIND.
pub type Cookie = [u8; COOKIE_LEN];

/// The error for a body that is shorter or longer than its fields; [`parse`] never returns it
/// because the header rules already fixed the body length, but the field readers stay total.
const BODY_LENGTH: WireError = WireError::Header(HeaderError::BodyLengthOutOfRange);

/// Why a datagram is not a valid relay-layer packet, or why an encoder refused to write one.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The datagram breaks a stateless header rule of §2.1 (the sender's fault). Encoders return
    /// it too when asked for a packet that would break one: a zero session id
    /// ([`HeaderError::ZeroSession`]) or a DATA body outside `1..=MAX_DATA_BODY`
    /// ([`HeaderError::BodyLengthOutOfRange`]).
    #[error("malformed header: {0}")]
    Header(#[from] HeaderError),
    /// A reserved body field is not zero (§2: receivers drop such packets).
    #[error("reserved body field is not zero")]
    ReservedNonZero,
    /// A slot field is neither 0 (A) nor 1 (B).
    #[error("slot {0} is neither 0 (A) nor 1 (B)")]
    BadSlot(u8),
    /// A BIND's token length field is not `TOKEN_LEN` (§3.1).
    #[error("BIND token length {0} is not 208")]
    BadTokenLength(u16),
    /// A REJECT's reason is not in the table of §3.4.
    #[error("unknown REJECT reason {0}")]
    UnknownRejectReason(u8),
    /// A CLOSE's reason is not in the table of §3.8.
    #[error("unknown CLOSE reason {0}")]
    UnknownCloseReason(u8),
    /// A boolean field (BIND-ACK peer present, REJECT authenticated) is neither 0 nor 1.
    #[error("flag value {0} is neither 0 nor 1")]
    BadFlag(u8),
    /// A REJECT marked unauthenticated carries a MAC field that is not zero (§3.4).
    #[error("unauthenticated REJECT has a non-zero MAC field")]
    UnauthenticatedMacNonZero,
    /// The caller's buffer cannot hold the packet being encoded (the caller's fault).
    #[error("buffer of {available} bytes is too small for {needed} bytes")]
    BufferTooSmall {
        /// Bytes the packet needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
}

/// One of the two slots of a session (§3.1): the slot field of BIND, REBIND and their
/// answers, and the slot a token is for (§4).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Slot A (wire value 0); its peer is the Noise initiator (§9.1).
    A = 0,
    /// Slot B (wire value 1).
    B = 1,
}

impl Slot {
    /// The slot with wire value `value`, or `None` for anything but 0 and 1.
    pub const fn from_u8(value: u8) -> Option<Slot> {
        match value {
            0 => Some(Slot::A),
            1 => Some(Slot::B),
            _ => None,
        }
    }

    /// The wire value of the slot.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The other slot of the session.
    pub const fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// Why the relay rejected a BIND or REBIND (§3.4).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// 1: bad signature, unknown `kid`, wrong relay, malformed token.
    TokenInvalid = 1,
    /// 2: the token's `exp` has passed; the peer should fetch a new token.
    TokenExpired = 2,
    /// 3: the token's `nbf` is in the future beyond the allowed skew.
    TokenNotYetValid = 3,
    /// 4: the token is for another session or slot.
    WrongSession = 4,
    /// 5: token id already used from another place, or stale sequence number.
    Replayed = 5,
    /// 6: the proof MAC does not verify.
    BadProof = 6,
    /// 7: the slot is held by another token.
    SessionFull = 7,
    /// 8: relay session cap or rate limit reached; retry later.
    Overloaded = 8,
    /// 9: REBIND for a session or slot the relay does not hold.
    UnknownSession = 9,
}

impl RejectReason {
    /// Every reason, in wire-value order.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::TokenInvalid,
        RejectReason::TokenExpired,
        RejectReason::TokenNotYetValid,
        RejectReason::WrongSession,
        RejectReason::Replayed,
        RejectReason::BadProof,
        RejectReason::SessionFull,
        RejectReason::Overloaded,
        RejectReason::UnknownSession,
    ];

    /// The reason with wire value `value`, or `None` when §3.4 defines none.
    pub const fn from_u8(value: u8) -> Option<RejectReason> {
        match value {
            1 => Some(RejectReason::TokenInvalid),
            2 => Some(RejectReason::TokenExpired),
            3 => Some(RejectReason::TokenNotYetValid),
            4 => Some(RejectReason::WrongSession),
            5 => Some(RejectReason::Replayed),
            6 => Some(RejectReason::BadProof),
            7 => Some(RejectReason::SessionFull),
            8 => Some(RejectReason::Overloaded),
            9 => Some(RejectReason::UnknownSession),
            _ => None,
        }
    }

    /// The wire value of the reason.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The snake_case name of §3.4, used as the `reason` label of `bind_rejected` (§7).
    pub const fn name(self) -> &'static str {
        match self {
            RejectReason::TokenInvalid => "token_invalid",
            RejectReason::TokenExpired => "token_expired",
            RejectReason::TokenNotYetValid => "token_not_yet_valid",
            RejectReason::WrongSession => "wrong_session",
            RejectReason::Replayed => "replayed",
            RejectReason::BadProof => "bad_proof",
            RejectReason::SessionFull => "session_full",
            RejectReason::Overloaded => "overloaded",
            RejectReason::UnknownSession => "unknown_session",
        }
    }
}

/// Why a binding ended, as a relay → peer CLOSE says (§3.8, body byte 1). A peer → relay CLOSE
/// always carries [`CloseReason::PeerClosed`] (wire value 0).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// 0: the other peer sent CLOSE (relay → peer), or this peer closes (peer → relay).
    PeerClosed = 0,
    /// 1: the slot's token passed its `exp` plus the relay's clock skew.
    Expired = 1,
    /// 2: the slot's peer sent nothing that refreshes its idle timer for the idle timeout.
    Idle = 2,
}

impl CloseReason {
    /// Every reason, in wire-value order.
    pub const ALL: [CloseReason; 3] = [
        CloseReason::PeerClosed,
        CloseReason::Expired,
        CloseReason::Idle,
    ];

    /// The reason with wire value `value`, or `None` when §3.8 defines none.
    pub const fn from_u8(value: u8) -> Option<CloseReason> {
        match value {
            0 => Some(CloseReason::PeerClosed),
            1 => Some(CloseReason::Expired),
            2 => Some(CloseReason::Idle),
            _ => None,
        }
    }

    /// The wire value of the reason.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The snake_case name of §3.8.
    pub const fn name(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Expired => "expired",
            CloseReason::Idle => "idle",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// A well-formed relay-layer packet, borrowing the datagram it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// BIND (§3.1).
    Bind(Bind<'a>),
    /// CHALLENGE (§3.2).
    Challenge(Challenge<'a>),
    /// BIND-ACK (§3.3).
    BindAck(BindAck<'a>),
    /// REJECT (§3.4).
    Reject(Reject<'a>),
    /// DATA (§3.5).
    Data(Data<'a>),
    /// KEEPALIVE (§3.6).
    Keepalive(Keepalive),
    /// REBIND (§3.7).
    Rebind(Rebind<'a>),
    /// CLOSE (§3.8).
    Close(Close<'a>),
}

impl Packet<'_> {
    /// The checked header of the packet.
    pub fn header(&self) -> Header {
        match self {
            Packet::Bind(p) => p.header,
            Packet::Challenge(p) => p.header,
            Packet::BindAck(p) => p.header,
            Packet::Reject(p) => p.header,
            Packet::Data(p) => p.header,
            Packet::Keepalive(p) => p.header,
            Packet::Rebind(p) => p.header,
            Packet::Close(p) => p.header,
        }
    }

    /// The packet type.
    pub fn packet_type(&self) -> PacketType {
        self.header().packet_type
    }

    /// The session id of the header, never zero.
    pub fn session_id(&self) -> u64 {
        self.header().session_id
    }
}

/// Parses one datagram: the header rules of §2.1, then the body rules of the packet type (§3).
pub fn parse(datagram: &[u8]) -> Result<Packet<'_>, WireError> {
    let header = parse_header(datagram)?;
    let body = datagram.get(HEADER_LEN..).ok_or(BODY_LENGTH)?;
    match (header.packet_type, body.len()) {
        (PacketType::Bind, BIND_BODY_LEN) => Bind::parse(header, datagram).map(Packet::Bind),
        (PacketType::Challenge, CHALLENGE_BODY_LEN) => {
            Challenge::parse(header, body).map(Packet::Challenge)
        }
        (PacketType::BindAck, BIND_ACK_BODY_LEN) => {
            BindAck::parse(header, datagram).map(Packet::BindAck)
        }
        (PacketType::Reject, REJECT_BODY_LEN) => {
            Reject::parse(header, datagram).map(Packet::Reject)
        }
        (PacketType::Data, MIN_DATA_BODY..=MAX_DATA_BODY) => Ok(Packet::Data(Data {
            header,
            datagram,
            payload: body,
        })),
        (PacketType::Keepalive, KEEPALIVE_BODY_LEN) => Ok(Packet::Keepalive(Keepalive { header })),
        (PacketType::Rebind, REBIND_BODY_LEN) => {
            Rebind::parse(header, datagram).map(Packet::Rebind)
        }
        (PacketType::Close, CLOSE_BODY_LEN) => Close::parse(header, datagram).map(Packet::Close),
        _ => Err(BODY_LENGTH),
    }
}

/// Reads fixed-size big-endian fields off the front of a body.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> Result<&'a [u8; N], WireError> {
        let (field, rest) = self.rest.split_first_chunk::<N>().ok_or(BODY_LENGTH)?;
        self.rest = rest;
        Ok(field)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        self.array::<1>().map(|[byte]| *byte)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(|b| u16::from_be_bytes(*b))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(|b| u32::from_be_bytes(*b))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(|b| u64::from_be_bytes(*b))
    }

    fn slot(&mut self) -> Result<Slot, WireError> {
        let value = self.u8()?;
        Slot::from_u8(value).ok_or(WireError::BadSlot(value))
    }

    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(WireError::BadFlag(other)),
        }
    }

    fn reserved<const N: usize>(&mut self) -> Result<(), WireError> {
        if self.array::<N>()?.iter().all(|&b| b == 0) {
            Ok(())
        } else {
            Err(WireError::ReservedNonZero)
        }
    }

    /// Checks that every byte was read.
    fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(BODY_LENGTH)
        }
    }
}

/// Splits a MAC'd datagram into a reader over the body fields before the MAC, the MAC input
/// (header ‖ those fields, §6) and the MAC (always the last 16 bytes).
fn split_mac(datagram: &[u8]) -> Result<(Reader<'_>, &[u8], &Mac), WireError> {
    let (mac_input, mac) = datagram.split_last_chunk::<MAC_LEN>().ok_or(BODY_LENGTH)?;
    let (_header, fields) = mac_input.split_at_checked(HEADER_LEN).ok_or(BODY_LENGTH)?;
    Ok((Reader { rest: fields }, mac_input, mac))
}

/// A BIND (§3.1): a peer claims its slot with a token and a slot proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    header: Header,
    slot: Slot,
    bind_seq: u64,
    cookie: &'a Cookie,
    token: &'a [u8; TOKEN_LEN],
    mac_input: &'a [u8],
    mac: &'a Mac,
}

impl<'a> Bind<'a> {
    fn parse(header: Header, datagram: &'a [u8]) -> Result<Self, WireError> {
        let (mut fields, mac_input, mac) = split_mac(datagram)?;
        let slot = fields.slot()?;
        fields.reserved::<1>()?;
        let token_len = fields.u16()?;
        if usize::from(token_len) != TOKEN_LEN {
            return Err(WireError::BadTokenLength(token_len));
        }
        let bind_seq = fields.u64()?;
        let cookie = fields.array()?;
        let token = fields.array()?;
        fields.finish()?;
        Ok(Bind {
            header,
            slot,
            bind_seq,
            cookie,
            token,
            mac_input,
            mac,
        })
    }

    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session being joined.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// The slot claimed; it must equal the token's slot (§4.2 step 6).
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The bind sequence number.
    pub fn bind_seq(&self) -> u64 {
        self.bind_seq
    }

    /// The address cookie, all zero on a first attempt (§5).
    pub fn cookie(&self) -> &'a Cookie {
        self.cookie
    }

    /// The relay token (§4), not yet verified.
    pub fn token(&self) -> &'a [u8; TOKEN_LEN] {
        self.token
    }

    /// The bytes the proof covers: header ‖ body\[0..236\].
    pub fn mac_input(&self) -> &'a [u8] {
        self.mac_input
    }

    /// The slot proof under `K_peer`, not yet verified.
    pub fn mac(&self) -> &'a Mac {
        self.mac
    }

    /// The fields, as [`encode_bind`] takes them.
    pub fn fields(&self) -> BindFields<'a> {
        BindFields {
            slot: self.slot,
            bind_seq: self.bind_seq,
            cookie: *self.cookie,
            token: self.token,
        }
    }
}

/// A CHALLENGE (§3.2): the relay's address cookie for a BIND or REBIND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge<'a> {
    header: Header,
    bind_seq: u64,
    cookie: &'a Cookie,
}

impl<'a> Challenge<'a> {
    fn parse(header: Header, body: &'a [u8]) -> Result<Self, WireError> {
        let mut fields = Reader { rest: body };
        let bind_seq = fields.u64()?;
        let cookie = fields.array()?;
        fields.finish()?;
        Ok(Challenge {
            header,
            bind_seq,
            cookie,
        })
    }

    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id of the request.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// The bind sequence number copied from the request.
    pub fn bind_seq(&self) -> u64 {
        self.bind_seq
    }

    /// The cookie for the request's source address.
    pub fn cookie(&self) -> &'a Cookie {
        self.cookie
    }

    /// The fields, as [`encode_challenge`] takes them.
    pub fn fields(&self) -> ChallengeFields {
        ChallengeFields {
            bind_seq: self.bind_seq,
            cookie: *self.cookie,
        }
    }
}

/// A BIND-ACK (§3.3): the relay bound (or moved) the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAck<'a> {
    header: Header,
    slot: Slot,
    peer_present: bool,
    idle_timeout_secs: u32,
    bind_seq: u64,
    expires_at: u64,
    mac_input: &'a [u8],
    mac: &'a Mac,
}

impl<'a> BindAck<'a> {
    fn parse(header: Header, datagram: &'a [u8]) -> Result<Self, WireError> {
        let (mut fields, mac_input, mac) = split_mac(datagram)?;
        let slot = fields.slot()?;
        let peer_present = fields.flag()?;
        fields.reserved::<2>()?;
        let idle_timeout_secs = fields.u32()?;
        let bind_seq = fields.u64()?;
        let expires_at = fields.u64()?;
        fields.finish()?;
        Ok(BindAck {
            header,
            slot,
            peer_present,
            idle_timeout_secs,
            bind_seq,
            expires_at,
            mac_input,
            mac,
        })
    }

    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// The slot that was bound.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Whether the other slot is bound.
    pub fn peer_present(&self) -> bool {
        self.peer_present
    }

    /// The relay's idle timeout in seconds; peers send KEEPALIVE every third of it (§8).
    pub fn idle_timeout_secs(&self) -> u32 {
        self.idle_timeout_secs
    }

    /// The bind sequence number being acknowledged.
    pub fn bind_seq(&self) -> u64 {
        self.bind_seq
    }

    /// When the binding expires: the token's `exp`, Unix seconds.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// The bytes the relay MAC covers: header ‖ body\[0..24\].
    pub fn mac_input(&self) -> &'a [u8] {
        self.mac_input
    }

    /// The relay MAC under `K_relay`, not yet verified.
    pub fn mac(&self) -> &'a Mac {
        self.mac
    }

    /// The fields, as [`encode_bind_ack`] takes them.
    pub fn fields(&self) -> BindAckFields {
        BindAckFields {
            slot: self.slot,
            peer_present: self.peer_present,
            idle_timeout_secs: self.idle_timeout_secs,
            bind_seq: self.bind_seq,
            expires_at: self.expires_at,
        }
    }
}

/// A REJECT (§3.4): the relay refused a BIND or REBIND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject<'a> {
    header: Header,
    reason: RejectReason,
    slot: Slot,
    authenticated: bool,
    bind_seq: u64,
    mac_input: &'a [u8],
    mac: &'a Mac,
}

impl<'a> Reject<'a> {
    fn parse(header: Header, datagram: &'a [u8]) -> Result<Self, WireError> {
        let (mut fields, mac_input, mac) = split_mac(datagram)?;
        let reason_value = fields.u8()?;
        let reason = RejectReason::from_u8(reason_value)
            .ok_or(WireError::UnknownRejectReason(reason_value))?;
        let slot = fields.slot()?;
        let authenticated = fields.flag()?;
        fields.reserved::<1>()?;
        let bind_seq = fields.u64()?;
        fields.finish()?;
        if !authenticated && mac.iter().any(|&b| b != 0) {
            return Err(WireError::UnauthenticatedMacNonZero);
        }
        Ok(Reject {
            header,
            reason,
            slot,
            authenticated,
            bind_seq,
            mac_input,
            mac,
        })
    }

    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id of the request.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// Why the request was refused.
    pub fn reason(&self) -> RejectReason {
        self.reason
    }

    /// The slot of the request.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Whether the relay claims a valid MAC. An unauthenticated REJECT is only a hint (§3.4);
    /// an authenticated one counts only once [`Reject::mac`] verifies.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The bind sequence number of the request.
    pub fn bind_seq(&self) -> u64 {
        self.bind_seq
    }

    /// The bytes the relay MAC covers: header ‖ body\[0..12\].
    pub fn mac_input(&self) -> &'a [u8] {
        self.mac_input
    }

    /// The relay MAC under `K_relay`, not yet verified; all zero when not authenticated.
    pub fn mac(&self) -> &'a Mac {
        self.mac
    }

    /// The fields, as [`encode_reject`] and [`encode_reject_unauthenticated`] take them.
    pub fn fields(&self) -> RejectFields {
        RejectFields {
            reason: self.reason,
            slot: self.slot,
            bind_seq: self.bind_seq,
        }
    }
}

/// A DATA packet (§3.5): an opaque end-to-end payload the relay forwards unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    header: Header,
    datagram: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Data<'a> {
    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// The body: 1 to [`MAX_DATA_BODY`] opaque bytes (an end-to-end frame, §9).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The whole datagram, header included: what the relay forwards.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.datagram
    }
}

/// A KEEPALIVE (§3.6): a header with an empty body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    header: Header,
}

impl Keepalive {
    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }
}

/// A REBIND (§3.7): a peer moves its binding to a new source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebind<'a> {
    header: Header,
    slot: Slot,
    bind_seq: u64,
    cookie: &'a Cookie,
    mac_input: &'a [u8],
    mac: &'a Mac,
}

impl<'a> Rebind<'a> {
    fn parse(header: Header, datagram: &'a [u8]) -> Result<Self, WireError> {
        let (mut fields, mac_input, mac) = split_mac(datagram)?;
        let slot = fields.slot()?;
        fields.reserved::<3>()?;
        let bind_seq = fields.u64()?;
        let cookie = fields.array()?;
        fields.finish()?;
        Ok(Rebind {
            header,
            slot,
            bind_seq,
            cookie,
            mac_input,
            mac,
        })
    }

    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// The slot being moved.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The bind sequence number, greater than any accepted before.
    pub fn bind_seq(&self) -> u64 {
        self.bind_seq
    }

    /// The cookie for the new source address.
    pub fn cookie(&self) -> &'a Cookie {
        self.cookie
    }

    /// The bytes the proof covers: header ‖ body\[0..28\].
    pub fn mac_input(&self) -> &'a [u8] {
        self.mac_input
    }

    /// The slot proof under `K_peer`, not yet verified.
    pub fn mac(&self) -> &'a Mac {
        self.mac
    }

    /// The fields, as [`encode_rebind`] takes them.
    pub fn fields(&self) -> RebindFields {
        RebindFields {
            slot: self.slot,
            bind_seq: self.bind_seq,
            cookie: *self.cookie,
        }
    }
}

/// A CLOSE (§3.8): the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close<'a> {
    header: Header,
    slot: Slot,
    reason: CloseReason,
    seq: u64,
    mac_input: &'a [u8],
    mac: &'a Mac,
}

impl<'a> Close<'a> {
    fn parse(header: Header, datagram: &'a [u8]) -> Result<Self, WireError> {
        let (mut fields, mac_input, mac) = split_mac(datagram)?;
        let slot = fields.slot()?;
        let reason = fields.u8()?;
        let reason = CloseReason::from_u8(reason).ok_or(WireError::UnknownCloseReason(reason))?;
        fields.reserved::<2>()?;
        let seq = fields.u64()?;
        fields.finish()?;
        Ok(Close {
            header,
            slot,
            reason,
            seq,
            mac_input,
            mac,
        })
    }

    /// The checked header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.header.session_id
    }

    /// The sender's slot (peer → relay) or the receiver's (relay → peer).
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Why the binding ended (relay → peer); [`CloseReason::PeerClosed`] in a peer's CLOSE,
    /// where any other value is malformed for the relay (§3, body rules).
    pub fn reason(&self) -> CloseReason {
        self.reason
    }

    /// The sequence number: the peer's next bind sequence number, or the receiver's last
    /// accepted one when the relay sends it.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The bytes the MAC covers: header ‖ body\[0..12\].
    pub fn mac_input(&self) -> &'a [u8] {
        self.mac_input
    }

    /// The slot proof (`K_peer`) or relay MAC (`K_relay`), not yet verified.
    pub fn mac(&self) -> &'a Mac {
        self.mac
    }

    /// The fields, as [`encode_close`] takes them.
    pub fn fields(&self) -> CloseFields {
        CloseFields {
            slot: self.slot,
            reason: self.reason,
            seq: self.seq,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// The fields of a BIND (§3.1) besides the session id and the proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindFields<'t> {
    /// The slot claimed; must equal the token's slot.
    pub slot: Slot,
    /// The bind sequence number (strictly increasing per slot).
    pub bind_seq: u64,
    /// The address cookie from a CHALLENGE, or all zero on a first attempt.
    pub cookie: Cookie,
    /// The token from the gateway.
    pub token: &'t [u8; TOKEN_LEN],
}

/// The fields of a CHALLENGE (§3.2) besides the session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChallengeFields {
    /// The bind sequence number copied from the request.
    pub bind_seq: u64,
    /// The cookie for the request's source address.
    pub cookie: Cookie,
}

/// The fields of a BIND-ACK (§3.3) besides the session id and the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAckFields {
    /// The slot that was bound.
    pub slot: Slot,
    /// Whether the other slot is bound.
    pub peer_present: bool,
    /// The relay's idle timeout, seconds.
    pub idle_timeout_secs: u32,
    /// The bind sequence number being acknowledged.
    pub bind_seq: u64,
    /// The token's `exp`, Unix seconds.
    pub expires_at: u64,
}

/// The fields of a REJECT (§3.4) besides the session id, the authenticated flag and the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectFields {
    /// Why the request was refused.
    pub reason: RejectReason,
    /// The slot of the request.
    pub slot: Slot,
    /// The bind sequence number of the request.
    pub bind_seq: u64,
}

/// The fields of a REBIND (§3.7) besides the session id and the proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebindFields {
    /// The slot being moved.
    pub slot: Slot,
    /// The bind sequence number.
    pub bind_seq: u64,
    /// The cookie for the new source address.
    pub cookie: Cookie,
}

/// The fields of a CLOSE (§3.8) besides the session id and the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFields {
    /// The sender's slot (peer → relay) or the receiver's (relay → peer).
    pub slot: Slot,
    /// Why the binding ended; always [`CloseReason::PeerClosed`] from a peer.
    pub reason: CloseReason,
    /// The sequence number (§3.8).
    pub seq: u64,
}

/// Writes big-endian fields one after another into a buffer.
struct Writer<'b> {
    rest: &'b mut [u8],
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let rest = core::mem::take(&mut self.rest);
        let available = rest.len();
        let (field, rest) =
            rest.split_at_mut_checked(bytes.len())
                .ok_or(WireError::BufferTooSmall {
                    needed: bytes.len(),
                    available,
                })?;
        field.copy_from_slice(bytes);
        self.rest = rest;
        Ok(())
    }

    fn u8(&mut self, value: u8) -> Result<(), WireError> {
        self.put(&[value])
    }

    fn u16(&mut self, value: u16) -> Result<(), WireError> {
        self.put(&value.to_be_bytes())
    }

    fn u32(&mut self, value: u32) -> Result<(), WireError> {
        self.put(&value.to_be_bytes())
    }

    fn u64(&mut self, value: u64) -> Result<(), WireError> {
        self.put(&value.to_be_bytes())
    }

    fn zeros<const N: usize>(&mut self) -> Result<(), WireError> {
        self.put(&[0; N])
    }
}

/// Builds the header of a packet the caller asks for, refusing what would break §2.1: a zero
/// session id or a body length outside the type's range.
fn new_header(
    packet_type: PacketType,
    session_id: u64,
    body_len: usize,
) -> Result<Header, WireError> {
    if session_id == 0 {
        return Err(HeaderError::ZeroSession.into());
    }
    let (min, max) = packet_type.body_len_range();
    let body_len = u16::try_from(body_len)
        .ok()
        .filter(|len| (min..=max).contains(len))
        .ok_or(HeaderError::BodyLengthOutOfRange)?;
    Ok(Header {
        packet_type,
        session_id,
        body_len,
    })
}

/// The first `needed` bytes of `buf`, split into the header and the rest.
fn take_buf(
    buf: &mut [u8],
    needed: usize,
) -> Result<(&mut [u8; HEADER_LEN], &mut [u8]), WireError> {
    let available = buf.len();
    let too_small = WireError::BufferTooSmall { needed, available };
    buf.get_mut(..needed)
        .ok_or(too_small)?
        .split_first_chunk_mut::<HEADER_LEN>()
        .ok_or(too_small)
}

/// Encodes a packet without a MAC: header, then the body fields from `write_fields`.
fn encode_plain(
    buf: &mut [u8],
    packet_type: PacketType,
    session_id: u64,
    body_len: usize,
    write_fields: impl FnOnce(&mut Writer<'_>) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    let header = new_header(packet_type, session_id, body_len)?;
    let (first16, body) = take_buf(buf, header.datagram_len())?;
    header.write(first16);
    body.fill(0);
    write_fields(&mut Writer { rest: body })?;
    Ok(header.datagram_len())
}

/// Encodes a MAC'd packet: header, body fields from `write_fields`, then `mac` of everything
/// before the MAC field (§6) in the last 16 bytes.
fn encode_authenticated(
    buf: &mut [u8],
    packet_type: PacketType,
    session_id: u64,
    body_len: usize,
    write_fields: impl FnOnce(&mut Writer<'_>) -> Result<(), WireError>,
    mac: impl FnOnce(&[u8]) -> Mac,
) -> Result<usize, WireError> {
    let header = new_header(packet_type, session_id, body_len)?;
    let len = header.datagram_len();
    let (first16, body) = take_buf(buf, len)?;
    header.write(first16);
    let (fields, _mac_field) = body.split_last_chunk_mut::<MAC_LEN>().ok_or(BODY_LENGTH)?;
    fields.fill(0);
    write_fields(&mut Writer { rest: fields })?;
    // Borrow the whole datagram again to hand the MAC input over in one piece.
    let datagram = buf.get_mut(..len).ok_or(BODY_LENGTH)?;
    let (mac_input, mac_field) = datagram
        .split_last_chunk_mut::<MAC_LEN>()
        .ok_or(BODY_LENGTH)?;
    *mac_field = mac(mac_input);
    Ok(len)
}

/// Encodes a BIND (§3.1) into `buf` and returns its length (268). `proof` computes
/// `MAC(K_peer, ·)` over the MAC input it is given (header ‖ body\[0..236\]).
pub fn encode_bind(
    buf: &mut [u8],
    session_id: u64,
    fields: &BindFields<'_>,
    proof: impl FnOnce(&[u8]) -> Mac,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| {
        w.u8(fields.slot.as_u8())?;
        w.zeros::<1>()?;
        w.u16(TOKEN_LEN as u16)?;
        w.u64(fields.bind_seq)?;
        w.put(&fields.cookie)?;
        w.put(fields.token)
    };
    encode_authenticated(
        buf,
        PacketType::Bind,
        session_id,
        BIND_BODY_LEN,
        write,
        proof,
    )
}

/// Encodes a CHALLENGE (§3.2) into `buf` and returns its length (40).
pub fn encode_challenge(
    buf: &mut [u8],
    session_id: u64,
    fields: &ChallengeFields,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| {
        w.u64(fields.bind_seq)?;
        w.put(&fields.cookie)
    };
    encode_plain(
        buf,
        PacketType::Challenge,
        session_id,
        CHALLENGE_BODY_LEN,
        write,
    )
}

/// Encodes a BIND-ACK (§3.3) into `buf` and returns its length (56). `mac` computes
/// `MAC(K_relay, ·)` over the MAC input it is given (header ‖ body\[0..24\]).
pub fn encode_bind_ack(
    buf: &mut [u8],
    session_id: u64,
    fields: &BindAckFields,
    mac: impl FnOnce(&[u8]) -> Mac,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| {
        w.u8(fields.slot.as_u8())?;
        w.u8(u8::from(fields.peer_present))?;
        w.zeros::<2>()?;
        w.u32(fields.idle_timeout_secs)?;
        w.u64(fields.bind_seq)?;
        w.u64(fields.expires_at)
    };
    encode_authenticated(
        buf,
        PacketType::BindAck,
        session_id,
        BIND_ACK_BODY_LEN,
        write,
        mac,
    )
}

/// Writes the REJECT body fields before the MAC (§3.4).
fn write_reject_fields(
    w: &mut Writer<'_>,
    fields: &RejectFields,
    authenticated: bool,
) -> Result<(), WireError> {
    w.u8(fields.reason.as_u8())?;
    w.u8(fields.slot.as_u8())?;
    w.u8(u8::from(authenticated))?;
    w.zeros::<1>()?;
    w.u64(fields.bind_seq)
}

/// Encodes an authenticated REJECT (§3.4) into `buf` and returns its length (44). `mac`
/// computes `MAC(K_relay, ·)` over the MAC input it is given (header ‖ body\[0..12\], with the
/// authenticated flag set).
pub fn encode_reject(
    buf: &mut [u8],
    session_id: u64,
    fields: &RejectFields,
    mac: impl FnOnce(&[u8]) -> Mac,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| write_reject_fields(w, fields, true);
    encode_authenticated(
        buf,
        PacketType::Reject,
        session_id,
        REJECT_BODY_LEN,
        write,
        mac,
    )
}

/// Encodes an unauthenticated REJECT (§3.4: the relay could not learn `K_relay`) into `buf` and
/// returns its length (44): the authenticated flag and the MAC field are zero.
pub fn encode_reject_unauthenticated(
    buf: &mut [u8],
    session_id: u64,
    fields: &RejectFields,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| {
        write_reject_fields(w, fields, false)?;
        w.zeros::<MAC_LEN>()
    };
    encode_plain(buf, PacketType::Reject, session_id, REJECT_BODY_LEN, write)
}

/// Encodes a DATA packet (§3.5) with `payload` as its body into `buf` and returns its length.
/// The payload must be 1 to [`MAX_DATA_BODY`] bytes.
pub fn encode_data(buf: &mut [u8], session_id: u64, payload: &[u8]) -> Result<usize, WireError> {
    let header = new_header(PacketType::Data, session_id, payload.len())?;
    let (first16, body) = take_buf(buf, header.datagram_len())?;
    header.write(first16);
    Writer { rest: body }.put(payload)?;
    Ok(header.datagram_len())
}

/// Writes only the 16-byte header of a DATA packet whose body will be `body_len` bytes, and
/// returns [`HEADER_LEN`]. The caller then writes (or seals in place) exactly `body_len` bytes
/// right after it. `buf` needs only [`HEADER_LEN`] bytes; `body_len` must be 1 to
/// [`MAX_DATA_BODY`].
pub fn encode_data_header(
    buf: &mut [u8],
    session_id: u64,
    body_len: usize,
) -> Result<usize, WireError> {
    let header = new_header(PacketType::Data, session_id, body_len)?;
    let (first16, _) = take_buf(buf, HEADER_LEN)?;
    header.write(first16);
    Ok(HEADER_LEN)
}

/// Encodes a KEEPALIVE (§3.6) into `buf` and returns its length (16).
pub fn encode_keepalive(buf: &mut [u8], session_id: u64) -> Result<usize, WireError> {
    encode_plain(
        buf,
        PacketType::Keepalive,
        session_id,
        KEEPALIVE_BODY_LEN,
        |_| Ok(()),
    )
}

/// Encodes a REBIND (§3.7) into `buf` and returns its length (60). `proof` computes
/// `MAC(K_peer, ·)` over the MAC input it is given (header ‖ body\[0..28\]).
pub fn encode_rebind(
    buf: &mut [u8],
    session_id: u64,
    fields: &RebindFields,
    proof: impl FnOnce(&[u8]) -> Mac,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| {
        w.u8(fields.slot.as_u8())?;
        w.zeros::<3>()?;
        w.u64(fields.bind_seq)?;
        w.put(&fields.cookie)
    };
    encode_authenticated(
        buf,
        PacketType::Rebind,
        session_id,
        REBIND_BODY_LEN,
        write,
        proof,
    )
}

/// Encodes a CLOSE (§3.8) into `buf` and returns its length (44). `mac` computes
/// `MAC(K_peer, ·)` (peer → relay) or `MAC(K_relay, ·)` (relay → peer) over the MAC input it is
/// given (header ‖ body\[0..12\]).
pub fn encode_close(
    buf: &mut [u8],
    session_id: u64,
    fields: &CloseFields,
    mac: impl FnOnce(&[u8]) -> Mac,
) -> Result<usize, WireError> {
    let write = |w: &mut Writer<'_>| {
        w.u8(fields.slot.as_u8())?;
        w.u8(fields.reason.as_u8())?;
        w.zeros::<2>()?;
        w.u64(fields.seq)
    };
    encode_authenticated(
        buf,
        PacketType::Close,
        session_id,
        CLOSE_BODY_LEN,
        write,
        mac,
    )
}

#[cfg(test)]
mod tests;
