//! The end-to-end channel between two peers, carried in DATA datagrams through the relay
//! (docs/protocol.md §9): a Noise XX handshake, then the transport. Sans-IO.
//!
//! Every datagram this module writes is a complete relay DATA datagram (16-byte header, then
//! the frame), so the caller sends it to the relay as is; every datagram it reads is a DATA
//! datagram the relay forwarded.

use std::ops::Range;
use std::time::Instant;

use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{
    Handshake, LocalIdentity, NoiseError, PeerExpectation, Transport, TransportLimits,
};
use ferry_core::wire::{self, HEADER_LEN, Packet};

/// Everything that can go wrong on the channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The end-to-end layer refused the frame or the operation.
    #[error(transparent)]
    Noise(#[from] NoiseError),
    /// The datagram was not a DATA datagram of this session.
    #[error("not a DATA datagram of session {0:#x}")]
    NotOurData(u64),
    /// The relay header could not be written.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// Application data before the handshake finished.
    #[error("the channel is not established yet")]
    NotEstablished,
}

/// What handling one datagram produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelOutput {
    /// Bytes of the output buffer to send to the relay (a handshake message).
    pub transmit: Option<usize>,
    /// The handshake finished with this datagram.
    pub established: bool,
    /// Where the decrypted plaintext sits in the datagram buffer.
    pub plaintext: Option<Range<usize>>,
}

enum State {
    Handshaking(Box<Handshake>),
    Established(Box<Transport>),
    /// The handshake failed; a new channel is needed.
    Failed,
}

/// One end of the end-to-end channel.
pub struct Channel {
    session_id: u64,
    limits: TransportLimits,
    state: State,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let established = matches!(self.state, State::Established(_));
        f.debug_struct("Channel")
            .field("session_id", &self.session_id)
            .field("established", &established)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// The slot-A side, which starts the handshake with [`Channel::start`].
    pub fn initiator(
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
        limits: TransportLimits,
    ) -> Result<Self, ChannelError> {
        let hs = Handshake::initiator(local, expect, session_id)?;
        Ok(Self::with(hs, session_id, limits))
    }

    /// The slot-B side, which answers the initiator.
    pub fn responder(
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
        limits: TransportLimits,
    ) -> Result<Self, ChannelError> {
        let hs = Handshake::responder(local, expect, session_id)?;
        Ok(Self::with(hs, session_id, limits))
    }

    fn with(hs: Handshake, session_id: u64, limits: TransportLimits) -> Self {
        Self {
            session_id,
            limits,
            state: State::Handshaking(Box::new(hs)),
        }
    }

    /// Whether the handshake has finished.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// The other peer's static key, once the handshake has checked it.
    pub fn remote_identity(&self) -> Option<[u8; 32]> {
        match &self.state {
            State::Handshaking(hs) => hs.remote_identity().copied(),
            State::Established(t) => Some(*t.remote_identity()),
            State::Failed => None,
        }
    }

    /// The transport, once established (for its counters and epochs).
    pub fn transport(&self) -> Option<&Transport> {
        match &self.state {
            State::Established(t) => Some(t),
            State::Handshaking(_) | State::Failed => None,
        }
    }

    /// Initiator only: writes handshake message 1 as a DATA datagram. A handshake state writes
    /// each message once; to retry after a loss, make a new channel.
    pub fn start(&mut self, out: &mut [u8]) -> Result<usize, ChannelError> {
        match &mut self.state {
            State::Handshaking(hs) => write_handshake(hs, self.session_id, out),
            State::Established(_) | State::Failed => Err(ChannelError::NotEstablished),
        }
    }

    /// Handles a DATA datagram forwarded by the relay. Transport frames are decrypted in place;
    /// handshake frames may produce a reply in `out`. `known` is consulted (and, for trust on
    /// first use, updated: the caller saves it) when the remote identity is learned.
    pub fn handle(
        &mut self,
        now: Instant,
        datagram: &mut [u8],
        known: &mut KnownPeers,
        out: &mut [u8],
    ) -> Result<ChannelOutput, ChannelError> {
        let session_id = match wire::parse(datagram) {
            Ok(Packet::Data(d)) if d.session_id() == self.session_id => d.session_id(),
            _ => return Err(ChannelError::NotOurData(self.session_id)),
        };
        let body = datagram
            .get_mut(HEADER_LEN..)
            .ok_or(ChannelError::NotOurData(session_id))?;
        match &mut self.state {
            State::Established(t) => {
                let range = t.open_in_place(now, body)?;
                Ok(ChannelOutput {
                    plaintext: Some(range.start + HEADER_LEN..range.end + HEADER_LEN),
                    ..ChannelOutput::default()
                })
            }
            State::Failed => Err(ChannelError::NotEstablished),
            State::Handshaking(hs) => {
                hs.read_message(body, known)?;
                let mut output = ChannelOutput::default();
                if hs.is_my_turn() && !hs.is_finished() {
                    output.transmit = Some(write_handshake(hs, session_id, out)?);
                }
                if hs.is_finished() {
                    self.finish(now)?;
                    output.established = true;
                }
                Ok(output)
            }
        }
    }

    fn finish(&mut self, now: Instant) -> Result<(), ChannelError> {
        // The handshake is consumed into the transport. Should that fail, the channel stays
        // `Failed`: a half-made key schedule is never used.
        match std::mem::replace(&mut self.state, State::Failed) {
            State::Handshaking(hs) => {
                let transport = hs.into_transport(now, self.limits)?;
                self.state = State::Established(Box::new(transport));
            }
            other => self.state = other,
        }
        Ok(())
    }

    /// Encrypts `plaintext` into a DATA datagram in `out`.
    pub fn send(
        &mut self,
        now: Instant,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, ChannelError> {
        let State::Established(t) = &mut self.state else {
            return Err(ChannelError::NotEstablished);
        };
        let body = after_header(out)?;
        let n = t.seal(now, plaintext, body)?;
        wire::encode_data_header(out, self.session_id, n)?;
        Ok(HEADER_LEN + n)
    }

    /// Like [`send`](Self::send) without a copy: the plaintext already sits at
    /// `buf[PLAINTEXT_OFFSET..PLAINTEXT_OFFSET + len]`; it is encrypted where it is and the
    /// headers are written in front of it.
    pub fn send_in_place(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, ChannelError> {
        let State::Established(t) = &mut self.state else {
            return Err(ChannelError::NotEstablished);
        };
        let body = after_header(buf)?;
        let n = t.seal_in_place(now, body, len)?;
        wire::encode_data_header(buf, self.session_id, n)?;
        Ok(HEADER_LEN + n)
    }
}

/// Where [`Channel::send_in_place`] expects the plaintext: after the relay header and the
/// transport frame header.
pub const PLAINTEXT_OFFSET: usize = HEADER_LEN + ferry_core::noise::TRANSPORT_HEADER_LEN;

fn write_handshake(
    hs: &mut Handshake,
    session_id: u64,
    out: &mut [u8],
) -> Result<usize, ChannelError> {
    let body = after_header(out)?;
    let n = hs.write_message(body)?;
    wire::encode_data_header(out, session_id, n)?;
    Ok(HEADER_LEN + n)
}

/// The part of a datagram buffer after the relay header, where the frame goes.
fn after_header(buf: &mut [u8]) -> Result<&mut [u8], wire::WireError> {
    let available = buf.len();
    buf.get_mut(HEADER_LEN..)
        .ok_or(wire::WireError::BufferTooSmall {
            needed: HEADER_LEN,
            available,
        })
}
