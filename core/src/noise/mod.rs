//! The peers' end-to-end layer, carried inside DATA bodies (docs/protocol.md §9).
//!
//! What it does **not** do: send or receive datagrams, read the clock, or persist anything.
//! The caller moves bytes, passes `now`, and saves [`KnownPeers`](crate::known_peers::KnownPeers)
//! when a handshake has recorded a new peer.
//!
//! The entry points:
//!
//! 1. [`Handshake::initiator`] / [`Handshake::responder`]: a sans-IO
//!    `Noise_XX_25519_ChaChaPoly_BLAKE2s` handshake. Call [`Handshake::write_message`] and
//!    [`Handshake::read_message`] in turn; each checks the peer's static key against a
//!    [`PeerExpectation`] as soon as it is known.
//! 2. [`Handshake::into_transport`] gives a [`Transport`]: [`Transport::seal`] /
//!    [`Transport::seal_in_place`] build TRANSPORT frames with explicit counters;
//!    [`Transport::open`] / [`Transport::open_in_place`] check the epoch and the
//!    [`ReplayWindow`] before decrypting and update them only after the tag verifies. The
//!    sending key is rekeyed by message count or age within [`TransportLimits`].
//! 3. [`frame::parse`] classifies any DATA body by `(kind, len)`.

pub mod frame;
mod handshake;
mod replay;
mod transport;

pub use frame::{Frame, FrameError, MAX_PLAINTEXT, TAG_LEN, TRANSPORT_HEADER_LEN};
pub use handshake::{
    Handshake, IdentityCheck, LocalIdentity, PROLOGUE_PREFIX, PROTOCOL_NAME, PeerExpectation,
    check_identity,
};
pub use replay::{ReplayWindow, WINDOW_SIZE};
pub use transport::{Transport, TransportLimits, TransportStats};

use thiserror::Error;

/// Everything that can go wrong in the end-to-end layer.
///
/// Errors on received frames mean "drop this frame" (the sender or a forger is to blame) unless
/// noted; [`CounterExhausted`](Self::CounterExhausted), [`EpochExhausted`](Self::EpochExhausted)
/// and [`SessionExpired`](Self::SessionExpired) mean the session is over and the peers must run
/// a new handshake.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The Noise library refused an operation (an internal state or parameter problem).
    #[error("noise protocol error: {0}")]
    Snow(snow::Error),
    /// The received bytes are not a well-formed §9 frame.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// A well-formed frame that the handshake does not expect now (wrong message number or
    /// direction, a transport frame during the handshake, or a call out of turn).
    #[error("unexpected message for the handshake state")]
    UnexpectedMessage,
    /// The peer's static key does not match the pinned key or the key recorded for its name.
    #[error("peer presented the wrong identity")]
    WrongIdentity,
    /// The handshake already failed (for example with a wrong identity); start a new one.
    #[error("handshake already failed")]
    HandshakeFailed,
    /// The handshake has not finished, so there are no transport keys yet.
    #[error("handshake not finished")]
    HandshakeIncomplete,
    /// A trust-on-first-use peer name is not `[A-Za-z0-9._@-]{1,64}`.
    #[error("invalid peer name")]
    InvalidPeerName,
    /// The frame's counter was already received in its epoch.
    #[error("replayed frame")]
    Replayed,
    /// The frame's counter is older than the replay window of its epoch.
    #[error("frame too old for the replay window")]
    TooOld,
    /// The frame's epoch is neither the current receive epoch, the previous one, nor 1 to 8
    /// epochs ahead (docs/protocol.md §9.3).
    #[error("frame from an unknown epoch")]
    UnknownEpoch,
    /// Authentication failed: the frame was forged, corrupted or sealed under another key.
    #[error("authentication failed")]
    Decrypt,
    /// The output buffer cannot hold the result.
    #[error("buffer too small: need {needed} bytes")]
    BufferTooSmall {
        /// Bytes the operation needs.
        needed: usize,
    },
    /// The plaintext is longer than [`MAX_PLAINTEXT`].
    #[error("payload of {0} bytes exceeds the maximum of {MAX_PLAINTEXT}")]
    PayloadTooLarge(usize),
    /// The [`TransportLimits`] are out of range.
    #[error("invalid transport limits: {0}")]
    InvalidLimits(&'static str),
    /// The sending counter would reach 2^64 − 1; a new handshake is required.
    #[error("message counter exhausted")]
    CounterExhausted,
    /// A rekey is due but the epoch is already `u32::MAX`; a new handshake is required.
    #[error("rekey epoch exhausted")]
    EpochExhausted,
    /// The session is older than [`TransportLimits::max_age`]; a new handshake is required.
    #[error("session expired")]
    SessionExpired,
}

impl From<snow::Error> for NoiseError {
    fn from(error: snow::Error) -> Self {
        match error {
            snow::Error::Decrypt => Self::Decrypt,
            other => Self::Snow(other),
        }
    }
}

#[cfg(test)]
mod tests;
