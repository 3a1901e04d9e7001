//! The `Noise_XX_25519_ChaChaPoly_BLAKE2s` handshake between two peers (docs/protocol.md §9.1).

use std::fmt;
use std::time::Instant;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::NoiseError;
use super::frame::{self, Frame, HandshakeKind};
use super::transport::{Transport, TransportLimits};
use crate::known_peers::{KnownPeers, is_valid_name};

/// The Noise protocol name.
pub const PROTOCOL_NAME: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// The prologue starts with these bytes; the session id (u64, big-endian) follows.
pub const PROLOGUE_PREFIX: &[u8] = b"ferry e2e v1";

const KEY_LEN: usize = 32;

/// This peer's static X25519 key pair. The secret is zeroized on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct LocalIdentity {
    secret: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl LocalIdentity {
    /// The key pair of an X25519 secret key.
    pub fn from_secret_bytes(secret: [u8; KEY_LEN]) -> Self {
        let public = x25519_dalek::x25519(secret, x25519_dalek::X25519_BASEPOINT_BYTES);
        Self { secret, public }
    }

    /// The public key, which the other peer sees and checks.
    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("public", &Hex(&self.public))
            .finish_non_exhaustive()
    }
}

/// Whom this peer expects at the other end (docs/protocol.md §9.1).
#[derive(Clone, PartialEq, Eq)]
pub enum PeerExpectation {
    /// The peer's static key must be exactly this one (given on the command line or by the
    /// gateway).
    Pinned([u8; KEY_LEN]),
    /// Trust on first use: the key recorded for `name` in the [`KnownPeers`] store must match;
    /// an unknown name is recorded.
    TrustOnFirstUse {
        /// The peer's name in the store, `[A-Za-z0-9._@-]{1,64}`.
        name: String,
    },
}

impl fmt::Debug for PeerExpectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pinned(key) => f.debug_tuple("Pinned").field(&Hex(key)).finish(),
            Self::TrustOnFirstUse { name } => f
                .debug_struct("TrustOnFirstUse")
                .field("name", name)
                .finish(),
        }
    }
}

/// How a peer's key passed [`check_identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityCheck {
    /// It equals the pinned key.
    Pinned,
    /// It equals the key already recorded for the name.
    Known,
    /// The name was unknown; the key is now recorded in the store, which the caller should save.
    Recorded,
}

/// Checks the peer's static `key` against `expect`, recording it in `known` on first use.
///
/// Fails with [`NoiseError::WrongIdentity`] if a pinned key or the key recorded for the name
/// differs (compared in constant time).
pub fn check_identity(
    expect: &PeerExpectation,
    key: &[u8; KEY_LEN],
    known: &mut KnownPeers,
) -> Result<IdentityCheck, NoiseError> {
    match expect {
        PeerExpectation::Pinned(pinned) => match bool::from(pinned.ct_eq(key)) {
            true => Ok(IdentityCheck::Pinned),
            false => Err(NoiseError::WrongIdentity),
        },
        PeerExpectation::TrustOnFirstUse { name } => match known.get(name) {
            Some(recorded) if bool::from(recorded.ct_eq(key)) => Ok(IdentityCheck::Known),
            Some(_) => Err(NoiseError::WrongIdentity),
            None => {
                known
                    .insert(name, *key)
                    .map_err(|_| NoiseError::InvalidPeerName)?;
                Ok(IdentityCheck::Recorded)
            }
        },
    }
}

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The next message to write or read.
    Expect(HandshakeKind),
    /// All three messages done and the peer's identity accepted.
    Finished,
    /// The peer's identity was refused; nothing more is possible.
    Failed,
}

/// One side of the end-to-end handshake, sans IO.
///
/// The initiator (the slot-A peer) writes HANDSHAKE-1, reads HANDSHAKE-2, writes HANDSHAKE-3;
/// the responder does the opposite. The peer's static key is checked as soon as it is known
/// (the initiator after message 2, the responder after message 3). A frame that fails to
/// decrypt leaves the state unchanged, so a forged frame cannot abort a handshake; a wrong
/// identity does.
pub struct Handshake {
    noise: snow::HandshakeState,
    initiator: bool,
    session_id: u64,
    expect: PeerExpectation,
    stage: Stage,
    remote: Option<[u8; KEY_LEN]>,
    identity_check: Option<IdentityCheck>,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("initiator", &self.initiator)
            .field("session_id", &self.session_id)
            .field("expect", &self.expect)
            .field("stage", &self.stage)
            .field("remote", &self.remote.as_ref().map(Hex))
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// The initiator (slot A) of session `session_id`.
    pub fn initiator(
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
    ) -> Result<Self, NoiseError> {
        Self::new(true, local, expect, session_id)
    }

    /// The responder (slot B) of session `session_id`.
    pub fn responder(
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
    ) -> Result<Self, NoiseError> {
        Self::new(false, local, expect, session_id)
    }

    fn new(
        initiator: bool,
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
    ) -> Result<Self, NoiseError> {
        if let PeerExpectation::TrustOnFirstUse { name } = &expect
            && !is_valid_name(name)
        {
            return Err(NoiseError::InvalidPeerName);
        }
        let mut prologue = [0u8; PROLOGUE_PREFIX.len() + 8];
        prologue[..PROLOGUE_PREFIX.len()].copy_from_slice(PROLOGUE_PREFIX);
        prologue[PROLOGUE_PREFIX.len()..].copy_from_slice(&session_id.to_be_bytes());
        let params: snow::params::NoiseParams = PROTOCOL_NAME.parse()?;
        let builder = snow::Builder::new(params)
            .local_private_key(&local.secret)?
            .prologue(&prologue)?;
        let noise = match initiator {
            true => builder.build_initiator()?,
            false => builder.build_responder()?,
        };
        Ok(Self {
            noise,
            initiator,
            session_id,
            expect,
            stage: Stage::Expect(HandshakeKind::One),
            remote: None,
            identity_check: None,
        })
    }

    /// Whether this side is the initiator.
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// The session id bound into the prologue.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Whether it is this side's turn to [`write_message`](Self::write_message).
    pub fn is_my_turn(&self) -> bool {
        matches!(self.stage, Stage::Expect(kind) if self.writes(kind))
    }

    /// Whether all three messages are done and the peer's identity was accepted.
    pub fn is_finished(&self) -> bool {
        self.stage == Stage::Finished
    }

    /// The peer's static key, once it has passed the identity check.
    pub fn remote_identity(&self) -> Option<&[u8; KEY_LEN]> {
        self.identity_check.and(self.remote.as_ref())
    }

    /// How the peer's key passed the identity check, once it has. After
    /// [`IdentityCheck::Recorded`] the caller should save its [`KnownPeers`].
    pub fn identity_check(&self) -> Option<IdentityCheck> {
        self.identity_check
    }

    /// Whether this side writes message `kind`: the initiator writes 1 and 3.
    fn writes(&self, kind: HandshakeKind) -> bool {
        self.initiator == (kind != HandshakeKind::Two)
    }

    /// The message this side must handle next, if `writing` matches its turn.
    fn expected(&self, writing: bool) -> Result<HandshakeKind, NoiseError> {
        match self.stage {
            Stage::Expect(kind) if self.writes(kind) == writing => Ok(kind),
            Stage::Failed => Err(NoiseError::HandshakeFailed),
            _ => Err(NoiseError::UnexpectedMessage),
        }
    }

    /// Writes this side's next handshake frame (kind byte and Noise message) into `out`;
    /// returns its length.
    pub fn write_message(&mut self, out: &mut [u8]) -> Result<usize, NoiseError> {
        let kind = self.expected(true)?;
        let needed = kind.frame_len();
        let message =
            frame::handshake_frame_mut(kind, out).ok_or(NoiseError::BufferTooSmall { needed })?;
        // snow wants room for a tag even where message 1 has none; write via a scratch buffer.
        let mut scratch = [0u8; frame::HANDSHAKE_2_LEN + frame::TAG_LEN];
        let written = self.noise.write_message(&[], &mut scratch)?;
        if written != kind.message_len() {
            return Err(NoiseError::UnexpectedMessage);
        }
        message.copy_from_slice(&scratch[..written]);
        self.advance(kind);
        Ok(needed)
    }

    /// Reads the peer's next handshake frame, checking its identity if this message reveals
    /// it. `known` is consulted (and updated on first use) only for
    /// [`PeerExpectation::TrustOnFirstUse`].
    pub fn read_message(&mut self, frame: &[u8], known: &mut KnownPeers) -> Result<(), NoiseError> {
        let expected = self.expected(false)?;
        let message = match frame::parse(frame)? {
            Frame::Handshake { kind, message } if kind == expected => message,
            _ => return Err(NoiseError::UnexpectedMessage),
        };
        let mut payload = [0u8; 64];
        let payload_len = self.noise.read_message(message, &mut payload)?;
        if payload_len != 0 {
            // Unreachable with §9's fixed sizes; refuse rather than ignore a payload.
            self.stage = Stage::Failed;
            return Err(NoiseError::UnexpectedMessage);
        }
        if let Err(error) = self.check_remote(known) {
            self.stage = Stage::Failed;
            return Err(error);
        }
        self.advance(expected);
        Ok(())
    }

    /// Checks the peer's static key the first time snow knows it.
    fn check_remote(&mut self, known: &mut KnownPeers) -> Result<(), NoiseError> {
        if self.identity_check.is_some() {
            return Ok(());
        }
        let Some(remote) = self.noise.get_remote_static() else {
            return Ok(());
        };
        let key: [u8; KEY_LEN] = remote
            .try_into()
            .map_err(|_| NoiseError::UnexpectedMessage)?;
        self.remote = Some(key);
        self.identity_check = Some(check_identity(&self.expect, &key, known)?);
        Ok(())
    }

    fn advance(&mut self, done: HandshakeKind) {
        self.stage = match done {
            HandshakeKind::One => Stage::Expect(HandshakeKind::Two),
            HandshakeKind::Two => Stage::Expect(HandshakeKind::Three),
            HandshakeKind::Three => Stage::Finished,
        };
    }

    /// Turns a finished handshake into a [`Transport`] created at `now`: the initiator sends
    /// with the first split key and receives with the second.
    pub fn into_transport(
        mut self,
        now: Instant,
        limits: TransportLimits,
    ) -> Result<Transport, NoiseError> {
        limits.validate()?;
        match self.stage {
            Stage::Finished => {}
            Stage::Failed => return Err(NoiseError::HandshakeFailed),
            Stage::Expect(_) => return Err(NoiseError::HandshakeIncomplete),
        }
        let (Some(remote), Some(_)) = (self.remote, self.identity_check) else {
            return Err(NoiseError::HandshakeIncomplete);
        };
        if !self.noise.is_handshake_finished() {
            return Err(NoiseError::HandshakeIncomplete);
        }
        let (first, second) = self.noise.dangerously_get_raw_split();
        let (first, second) = (Zeroizing::new(first), Zeroizing::new(second));
        let (send, recv) = match self.initiator {
            true => (first, second),
            false => (second, first),
        };
        Ok(Transport::new(send, recv, remote, now, limits))
    }
}

/// Prints a key as lowercase hex.
struct Hex<'a>(&'a [u8; KEY_LEN]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}
