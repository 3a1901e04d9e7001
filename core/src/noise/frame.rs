//! The end-to-end frames carried in DATA bodies (docs/protocol.md §9).
//!
//! [`parse`] matches `(kind, len)` against the named sizes below and returns a [`Frame`] that
//! borrows the caller's buffer; the encoders write into caller buffers. Nothing here allocates
//! or panics, whatever the input.

use thiserror::Error;

/// `MAX_DATA_BODY` of docs/protocol.md §3.5: the largest DATA body, so the largest frame.
pub const MAX_FRAME_LEN: usize = 1456;
/// Frame kind of Noise message 1 (`-> e`).
pub const KIND_HANDSHAKE_1: u8 = 1;
/// Frame kind of Noise message 2 (`<- e, ee, s, es`).
pub const KIND_HANDSHAKE_2: u8 = 2;
/// Frame kind of Noise message 3 (`-> s, se`).
pub const KIND_HANDSHAKE_3: u8 = 3;
/// Frame kind of a transport message.
pub const KIND_TRANSPORT: u8 = 4;
/// Length of Noise message 1 (an ephemeral key, empty payload).
pub const HANDSHAKE_1_LEN: usize = 32;
/// Length of Noise message 2 (ephemeral key, encrypted static key, empty payload's tag).
pub const HANDSHAKE_2_LEN: usize = 96;
/// Length of Noise message 3 (encrypted static key, empty payload's tag).
pub const HANDSHAKE_3_LEN: usize = 64;
/// Length of the kind byte that starts every frame.
pub const KIND_LEN: usize = 1;
/// Kind, epoch (u32) and counter (u64): the TRANSPORT header, also the AEAD's associated data.
pub const TRANSPORT_HEADER_LEN: usize = 13;
/// Length of the ChaCha20-Poly1305 tag ending a TRANSPORT frame.
pub const TAG_LEN: usize = 16;
/// Header and tag: what a TRANSPORT frame adds to its plaintext.
pub const TRANSPORT_OVERHEAD: usize = TRANSPORT_HEADER_LEN + TAG_LEN;
/// The largest plaintext of one TRANSPORT frame: `MAX_DATA_BODY − 29` = 1427.
pub const MAX_PLAINTEXT: usize = MAX_FRAME_LEN - TRANSPORT_OVERHEAD;

/// Why a DATA body is not a well-formed §9 frame. The sender (or whoever forged it) is to blame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The body is empty: there is no kind byte.
    #[error("empty frame")]
    Empty,
    /// The kind byte is not one of §9's four kinds.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The length does not match the kind (handshake frames have one exact length, TRANSPORT
    /// frames 29 to 1456 bytes).
    #[error("frame of kind {kind} has invalid length {len}")]
    BadLength {
        /// The frame's kind byte.
        kind: u8,
        /// The frame's whole length, kind byte included.
        len: usize,
    },
    /// A TRANSPORT frame carries counter 2^64 − 1, which Noise reserves and no sender uses.
    #[error("reserved counter value")]
    ReservedCounter,
}

/// The kinds of handshake frame, one per Noise `XX` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeKind {
    /// HANDSHAKE-1, initiator → responder.
    One,
    /// HANDSHAKE-2, responder → initiator.
    Two,
    /// HANDSHAKE-3, initiator → responder.
    Three,
}

impl HandshakeKind {
    /// The frame kind byte.
    pub const fn kind_byte(self) -> u8 {
        match self {
            Self::One => KIND_HANDSHAKE_1,
            Self::Two => KIND_HANDSHAKE_2,
            Self::Three => KIND_HANDSHAKE_3,
        }
    }

    /// The exact length of the Noise message (the frame without its kind byte).
    pub const fn message_len(self) -> usize {
        match self {
            Self::One => HANDSHAKE_1_LEN,
            Self::Two => HANDSHAKE_2_LEN,
            Self::Three => HANDSHAKE_3_LEN,
        }
    }

    /// The exact length of the whole frame.
    pub const fn frame_len(self) -> usize {
        KIND_LEN + self.message_len()
    }
}

/// A parsed frame borrowing the DATA body it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A handshake frame and its Noise message (without the kind byte).
    Handshake {
        /// Which of the three messages.
        kind: HandshakeKind,
        /// The Noise message, exactly `kind.message_len()` bytes.
        message: &'a [u8],
    },
    /// A TRANSPORT frame.
    Transport(TransportFrame<'a>),
}

/// A TRANSPORT frame split into its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportFrame<'a> {
    /// The decoded header.
    pub header: TransportHeader,
    /// The first [`TRANSPORT_HEADER_LEN`] bytes: the AEAD's associated data.
    pub aad: &'a [u8],
    /// The ciphertext, as long as the plaintext.
    pub ciphertext: &'a [u8],
    /// The [`TAG_LEN`]-byte tag.
    pub tag: &'a [u8],
}

/// The header of a TRANSPORT frame after the kind byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransportHeader {
    /// Number of rekeys done on the sender's key.
    pub epoch: u32,
    /// Per-epoch message counter.
    pub counter: u64,
}

impl TransportHeader {
    /// Checks a whole TRANSPORT frame's kind and length and decodes its header.
    pub fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        let kind = *frame.first().ok_or(FrameError::Empty)?;
        if kind != KIND_TRANSPORT {
            return Err(match kind {
                KIND_HANDSHAKE_1..=KIND_HANDSHAKE_3 => FrameError::BadLength {
                    kind,
                    len: frame.len(),
                },
                _ => FrameError::UnknownKind(kind),
            });
        }
        if !(TRANSPORT_OVERHEAD..=MAX_FRAME_LEN).contains(&frame.len()) {
            return Err(FrameError::BadLength {
                kind,
                len: frame.len(),
            });
        }
        let header = Self::decode_fields(frame)?;
        if header.counter == u64::MAX {
            return Err(FrameError::ReservedCounter);
        }
        Ok(header)
    }

    fn decode_fields(frame: &[u8]) -> Result<Self, FrameError> {
        let bad = FrameError::BadLength {
            kind: KIND_TRANSPORT,
            len: frame.len(),
        };
        let epoch = frame.get(1..5).ok_or(bad)?;
        let counter = frame.get(5..TRANSPORT_HEADER_LEN).ok_or(bad)?;
        Ok(Self {
            epoch: u32::from_be_bytes(epoch.try_into().map_err(|_| bad)?),
            counter: u64::from_be_bytes(counter.try_into().map_err(|_| bad)?),
        })
    }

    /// The 13-byte header (kind byte included), ready to be the associated data.
    pub fn encode(&self) -> [u8; TRANSPORT_HEADER_LEN] {
        let mut out = [0; TRANSPORT_HEADER_LEN];
        out[0] = KIND_TRANSPORT;
        out[1..5].copy_from_slice(&self.epoch.to_be_bytes());
        out[5..].copy_from_slice(&self.counter.to_be_bytes());
        out
    }
}

/// Parses a DATA body by `(kind, len)`.
pub fn parse(body: &[u8]) -> Result<Frame<'_>, FrameError> {
    let (&kind, rest) = body.split_first().ok_or(FrameError::Empty)?;
    let handshake = match kind {
        KIND_HANDSHAKE_1 => HandshakeKind::One,
        KIND_HANDSHAKE_2 => HandshakeKind::Two,
        KIND_HANDSHAKE_3 => HandshakeKind::Three,
        KIND_TRANSPORT => return parse_transport(body).map(Frame::Transport),
        other => return Err(FrameError::UnknownKind(other)),
    };
    if rest.len() != handshake.message_len() {
        return Err(FrameError::BadLength {
            kind,
            len: body.len(),
        });
    }
    Ok(Frame::Handshake {
        kind: handshake,
        message: rest,
    })
}

fn parse_transport(frame: &[u8]) -> Result<TransportFrame<'_>, FrameError> {
    let header = TransportHeader::parse(frame)?;
    let (aad, rest) = frame.split_at(TRANSPORT_HEADER_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    Ok(TransportFrame {
        header,
        aad,
        ciphertext,
        tag,
    })
}

/// Writes the kind byte of a handshake frame and returns the slice where its Noise message
/// goes (exactly `kind.message_len()` bytes), or `None` if `out` is too short.
pub fn handshake_frame_mut(kind: HandshakeKind, out: &mut [u8]) -> Option<&mut [u8]> {
    let frame = out.get_mut(..kind.frame_len())?;
    let (kind_byte, message) = frame.split_first_mut()?;
    *kind_byte = kind.kind_byte();
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(MAX_PLAINTEXT, 1427);
        assert_eq!(TRANSPORT_OVERHEAD, 29);
    }

    #[test]
    fn table() {
        let mut transport = [0u8; 40];
        transport[0] = KIND_TRANSPORT;
        transport[1..5].copy_from_slice(&7u32.to_be_bytes());
        transport[5..13].copy_from_slice(&9u64.to_be_bytes());
        let mut reserved = transport;
        reserved[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
        let h1 = [[1u8].as_slice(), &[0; 32]].concat();
        let h2 = [[2u8].as_slice(), &[0; 96]].concat();
        let h3 = [[3u8].as_slice(), &[0; 64]].concat();
        let too_long = [[4u8].as_slice(), &[0; MAX_FRAME_LEN]].concat();
        let cases: Vec<(&[u8], Result<(), FrameError>)> = vec![
            (&[], Err(FrameError::Empty)),
            (&[0], Err(FrameError::UnknownKind(0))),
            (&[5, 1, 2], Err(FrameError::UnknownKind(5))),
            (&h1, Ok(())),
            (&h2, Ok(())),
            (&h3, Ok(())),
            (&h1[..32], Err(FrameError::BadLength { kind: 1, len: 32 })),
            (&h3[..65], Ok(())),
            (&h2[..65], Err(FrameError::BadLength { kind: 2, len: 65 })),
            (&transport, Ok(())),
            (&transport[..29], Ok(())),
            (
                &transport[..28],
                Err(FrameError::BadLength { kind: 4, len: 28 }),
            ),
            (&too_long, Err(FrameError::BadLength { kind: 4, len: 1457 })),
            (&too_long[..1456], Ok(())),
            (&reserved, Err(FrameError::ReservedCounter)),
        ];
        for (i, (body, want)) in cases.into_iter().enumerate() {
            assert_eq!(parse(body).map(|_| ()), want, "case {i}");
        }
        match parse(&transport) {
            Ok(Frame::Transport(t)) => {
                assert_eq!(
                    t.header,
                    TransportHeader {
                        epoch: 7,
                        counter: 9
                    }
                );
                assert_eq!(t.ciphertext.len(), 40 - 29);
                assert_eq!(t.tag.len(), TAG_LEN);
                assert_eq!(t.aad, &t.header.encode());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn handshake_writer() {
        let mut out = [0u8; 97];
        assert!(handshake_frame_mut(HandshakeKind::Two, &mut out[..96]).is_none());
        let message = handshake_frame_mut(HandshakeKind::Two, &mut out);
        assert_eq!(message.map(|m| m.len()), Some(96));
        assert_eq!(out[0], KIND_HANDSHAKE_2);
    }

    proptest! {
        #[test]
        fn never_panics_and_borrows(body in proptest::collection::vec(any::<u8>(), 0..1600)) {
            match parse(&body) {
                Ok(Frame::Handshake { kind, message }) => {
                    prop_assert_eq!(message.len(), kind.message_len());
                    prop_assert_eq!(body[0], kind.kind_byte());
                }
                Ok(Frame::Transport(t)) => {
                    prop_assert_eq!(t.aad.len() + t.ciphertext.len() + t.tag.len(), body.len());
                    prop_assert_eq!(TransportHeader::parse(&body), Ok(t.header));
                }
                Err(_) => {}
            }
        }

        #[test]
        fn header_round_trip(epoch in any::<u32>(), counter in 0..u64::MAX) {
            let header = TransportHeader { epoch, counter };
            let mut frame = [0u8; 29];
            frame[..13].copy_from_slice(&header.encode());
            prop_assert_eq!(TransportHeader::parse(&frame), Ok(header));
        }
    }
}
