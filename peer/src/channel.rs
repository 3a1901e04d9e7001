//! The end-to-end channel between two peers, carried in DATA datagrams through the relay
//! (docs/protocol.md §9): a Noise XX handshake, then the transport. Sans-IO and timer-driven,
//! like quinn-proto's connection: the caller passes `now`, sends what the channel writes, and
//! calls [`Channel::on_timeout`] when [`Channel::poll_timeout`] says so. The retransmission,
//! key-confirmation and restart rules are docs/protocol.md §9.1.1.
//!
//! Every datagram this module writes is a complete relay DATA datagram (16-byte header, then
//! the frame), so the caller sends it to the relay as is; every datagram it reads is a DATA
//! datagram the relay forwarded.

use std::ops::Range;
use std::time::{Duration, Instant};

use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::frame::{self, Frame, HANDSHAKE_1_LEN, HandshakeKind};
use ferry_core::noise::{
    Handshake, LocalIdentity, NoiseError, PeerExpectation, Transport, TransportLimits,
};
use ferry_core::wire::{self, HEADER_LEN, Packet};

/// The first handshake retransmission interval; each retransmission doubles it up to
/// [`RETRY_MAX`] (docs/protocol.md §8). Also the least time between two HANDSHAKE-2 answers on
/// an established channel, and between two repeated confirmations.
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// The longest handshake retransmission interval.
pub const RETRY_MAX: Duration = Duration::from_secs(8);
/// How many times the initiator resends one HANDSHAKE-3 without a confirmation before it starts
/// over with a fresh HANDSHAKE-1.
pub const MAX_CONFIRM_RESENDS: u32 = 4;
/// How long a responder keeps a handshake it answered, and how long either side keeps
/// accepting frames under a transport that a new handshake replaced.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a responder keeps of handshakes it answered and that are not finished: the newest
/// ones win.
const MAX_RESPONDING: usize = 2;

/// Everything that can go wrong on the channel. Errors from [`Channel::handle`] mean "this
/// datagram was dropped"; only [`ChannelError::Noise`] with
/// [`NoiseError::WrongIdentity`] says something about the other peer.
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
    /// Only the initiator starts a handshake.
    #[error("only the initiator starts a handshake")]
    NotInitiator,
    /// A handshake message this channel already handled arrived again (a duplicate or replay).
    #[error("duplicate handshake message")]
    Duplicate,
    /// A handshake message that would need an answer arrived within [`RETRY_INITIAL`] of the
    /// last answer of its kind.
    #[error("handshake answer rate-limited")]
    RateLimited,
}

/// What handling one datagram produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelOutput {
    /// Bytes of the output buffer to send to the relay (a handshake message or a confirmation).
    pub transmit: Option<usize>,
    /// A (new) transport was made with this datagram: the handshake, or a re-handshake,
    /// finished on this side.
    pub established: bool,
    /// Where the decrypted plaintext sits in the datagram buffer. An empty TRANSPORT frame
    /// carries no message (it confirms the keys) and gives `None`.
    pub plaintext: Option<Range<usize>>,
}

/// A transport the initiator made from HANDSHAKE-2 that the responder has not yet proved it
/// holds.
struct Unconfirmed {
    transport: Box<Transport>,
    /// The HANDSHAKE-3 DATA datagram, resent as is until confirmed.
    message3: Vec<u8>,
    resends: u32,
    /// When the transport was made, which its age counts from.
    created: Instant,
}

/// A handshake the responder answered.
struct Responding {
    hs: Box<Handshake>,
    message1: [u8; HANDSHAKE_1_LEN],
    started: Instant,
}

/// One end of the end-to-end channel.
pub struct Channel {
    session_id: u64,
    limits: TransportLimits,
    local: LocalIdentity,
    expect: PeerExpectation,
    initiator: bool,
    /// The transport in use: confirmed on the initiator, made from an authenticated HANDSHAKE-3
    /// on the responder.
    current: Option<Box<Transport>>,
    /// When `current` was made.
    current_since: Option<Instant>,
    /// The transport `current` replaced, for frames still in flight: receive only, until then.
    previous: Option<(Box<Transport>, Instant)>,
    /// Initiator: the handshake whose HANDSHAKE-1 went out last.
    outgoing: Option<Box<Handshake>>,
    /// Initiator: a transport waiting for the responder's confirmation.
    unconfirmed: Option<Unconfirmed>,
    /// Initiator: when to resend (a fresh HANDSHAKE-1, or the same HANDSHAKE-3).
    retry_at: Option<Instant>,
    /// Initiator: the wait after the next send.
    retry_interval: Duration,
    /// Responder: the handshakes answered and not finished, oldest first.
    responding: Vec<Responding>,
    /// Responder: the HANDSHAKE-1 and HANDSHAKE-3 that made `current`, to recognize repeats.
    current_messages: Option<([u8; HANDSHAKE_1_LEN], Vec<u8>)>,
    /// Responder: the last HANDSHAKE-2 sent while it had a transport, for the rate limit.
    last_answer: Option<Instant>,
    /// Responder: the last confirmation sent, for the rate limit.
    last_confirmation: Option<Instant>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("session_id", &self.session_id)
            .field("initiator", &self.initiator)
            .field("established", &self.is_established())
            .field("confirmed", &self.is_confirmed())
            .field("handshaking", &self.is_handshaking())
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
        Self::new(true, local, expect, session_id, limits)
    }

    /// The slot-B side, which answers the initiator.
    pub fn responder(
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
        limits: TransportLimits,
    ) -> Result<Self, ChannelError> {
        Self::new(false, local, expect, session_id, limits)
    }

    fn new(
        initiator: bool,
        local: &LocalIdentity,
        expect: PeerExpectation,
        session_id: u64,
        limits: TransportLimits,
    ) -> Result<Self, ChannelError> {
        limits.validate()?;
        // Checks the expectation (a trust-on-first-use name) now rather than at the first
        // message.
        Handshake::responder(local, expect.clone(), session_id)?;
        Ok(Self {
            session_id,
            limits,
            local: local.clone(),
            expect,
            initiator,
            current: None,
            current_since: None,
            previous: None,
            outgoing: None,
            unconfirmed: None,
            retry_at: None,
            retry_interval: RETRY_INITIAL,
            responding: Vec::new(),
            current_messages: None,
            last_answer: None,
            last_confirmation: None,
        })
    }

    /// Whether this is the initiator (slot A).
    pub fn is_initiator(&self) -> bool {
        self.initiator
    }

    /// Whether a transport exists, so [`send`](Self::send) works. On the initiator it may be
    /// unconfirmed: frames sealed under it open once the responder has HANDSHAKE-3.
    pub fn is_established(&self) -> bool {
        self.current.is_some() || self.unconfirmed.is_some()
    }

    /// Whether the newest handshake is finished on both sides as far as this side can tell:
    /// the responder has authenticated HANDSHAKE-3; the initiator has received a frame from
    /// the responder under the newest transport. False while a re-handshake runs.
    pub fn is_confirmed(&self) -> bool {
        self.current.is_some() && !self.is_handshaking()
    }

    /// Whether a handshake (the first one or a re-handshake) is in progress on this side.
    pub fn is_handshaking(&self) -> bool {
        self.outgoing.is_some() || self.unconfirmed.is_some() || !self.responding.is_empty()
    }

    /// The other peer's static key, once a handshake has checked it.
    pub fn remote_identity(&self) -> Option<[u8; 32]> {
        self.transport().map(|t| *t.remote_identity())
    }

    /// The transport that [`send`](Self::send) uses (for its counters and epochs).
    pub fn transport(&self) -> Option<&Transport> {
        self.current
            .as_deref()
            .or(self.unconfirmed.as_ref().map(|u| &*u.transport))
    }

    /// Initiator only: starts a handshake, writing HANDSHAKE-1 as a DATA datagram into `out`;
    /// the channel then resends a fresh one on its timers until answered. On an established
    /// channel this is a re-handshake: the current transport keeps working until the new one
    /// is confirmed. Calling it while a handshake runs starts that one over.
    pub fn start(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, ChannelError> {
        if !self.initiator {
            return Err(ChannelError::NotInitiator);
        }
        self.unconfirmed = None;
        self.retry_interval = RETRY_INITIAL;
        self.send_message1(now, out)
    }

    /// A fresh initiator handshake and its HANDSHAKE-1; schedules the next resend.
    fn send_message1(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, ChannelError> {
        let mut hs = Handshake::initiator(&self.local, self.expect.clone(), self.session_id)?;
        let n = write_handshake(&mut hs, self.session_id, out)?;
        self.outgoing = Some(Box::new(hs));
        self.schedule_retry(now);
        Ok(n)
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.retry_at = Some(now + self.retry_interval);
        self.retry_interval = (self.retry_interval * 2).min(RETRY_MAX);
    }

    /// When [`on_timeout`](Self::on_timeout) should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let responding = self
            .responding
            .iter()
            .map(|r| r.started + HANDSHAKE_TIMEOUT);
        [
            self.retry_at,
            self.previous.as_ref().map(|p| p.1),
            self.rehandshake_at(),
        ]
        .into_iter()
        .flatten()
        .chain(responding)
        .min()
    }

    /// Initiator: when the current transport is old enough to be replaced by a re-handshake,
    /// `max_age − min(60 s, max_age / 4)` after it was made, if no handshake is running.
    fn rehandshake_at(&self) -> Option<Instant> {
        if !self.initiator || self.is_handshaking() {
            return None;
        }
        let since = self.current_since?;
        let margin = Duration::from_secs(60).min(self.limits.max_age / 4);
        Some(since + self.limits.max_age.saturating_sub(margin))
    }

    /// Runs the timers due at `now`; returns the length of a datagram written into `out` to
    /// send, if any (a handshake retransmission).
    pub fn on_timeout(
        &mut self,
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, ChannelError> {
        if self.previous.as_ref().is_some_and(|p| p.1 <= now) {
            self.previous = None;
        }
        self.responding
            .retain(|r| now < r.started + HANDSHAKE_TIMEOUT);
        if self.rehandshake_at().is_some_and(|at| at <= now) {
            return self.start(now, out).map(Some);
        }
        if self.retry_at.is_none_or(|at| at > now) {
            return Ok(None);
        }
        match &mut self.unconfirmed {
            Some(u) if u.resends < MAX_CONFIRM_RESENDS => {
                u.resends += 1;
                let n = u.message3.len();
                let available = out.len();
                let dst = out.get_mut(..n).ok_or(wire::WireError::BufferTooSmall {
                    needed: n,
                    available,
                })?;
                dst.copy_from_slice(&u.message3);
                self.schedule_retry(now);
                Ok(Some(n))
            }
            Some(_) => self.start(now, out).map(Some),
            // Also after a HANDSHAKE-2 with the wrong identity, which spent the handshake.
            None => self.send_message1(now, out).map(Some),
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
        match wire::parse(datagram) {
            Ok(Packet::Data(d)) if d.session_id() == self.session_id => {}
            _ => return Err(ChannelError::NotOurData(self.session_id)),
        }
        let body = datagram
            .get_mut(HEADER_LEN..)
            .ok_or(ChannelError::NotOurData(self.session_id))?;
        let kind = match frame::parse(body).map_err(NoiseError::from)? {
            Frame::Handshake { kind, .. } => Some(kind),
            Frame::Transport(_) => None,
        };
        match (kind, self.initiator) {
            (None, _) => self.open(now, body),
            (Some(HandshakeKind::Two), true) => self.on_message2(now, body, known, out),
            (Some(HandshakeKind::One), false) => self.on_message1(now, body, known, out),
            (Some(HandshakeKind::Three), false) => self.on_message3(now, body, known, out),
            (Some(_), _) => Err(NoiseError::UnexpectedMessage.into()),
        }
    }

    /// Initiator: HANDSHAKE-2 answering the newest HANDSHAKE-1.
    fn on_message2(
        &mut self,
        now: Instant,
        body: &[u8],
        known: &mut KnownPeers,
        out: &mut [u8],
    ) -> Result<ChannelOutput, ChannelError> {
        let hs = self
            .outgoing
            .as_mut()
            .ok_or(NoiseError::UnexpectedMessage)?;
        if let Err(error) = hs.read_message(body, known) {
            if matches!(error, NoiseError::WrongIdentity) {
                // This handshake is spent; the retry timer sends a fresh HANDSHAKE-1.
                self.outgoing = None;
            }
            return Err(error.into());
        }
        let n = write_handshake(hs, self.session_id, out)?;
        let message3 = out.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
        let Some(hs) = self.outgoing.take() else {
            return Err(NoiseError::HandshakeIncomplete.into());
        };
        let transport = hs.into_transport(now, self.limits)?;
        self.unconfirmed = Some(Unconfirmed {
            transport: Box::new(transport),
            message3,
            resends: 0,
            created: now,
        });
        self.retry_interval = RETRY_INITIAL;
        self.schedule_retry(now);
        Ok(ChannelOutput {
            transmit: Some(n),
            established: true,
            plaintext: None,
        })
    }

    /// Responder: HANDSHAKE-1 starts a handshake next to whatever exists.
    fn on_message1(
        &mut self,
        now: Instant,
        body: &[u8],
        known: &mut KnownPeers,
        out: &mut [u8],
    ) -> Result<ChannelOutput, ChannelError> {
        let message1: [u8; HANDSHAKE_1_LEN] = body
            .get(1..)
            .and_then(|m| m.try_into().ok())
            .ok_or(NoiseError::UnexpectedMessage)?;
        let repeated = self.responding.iter().any(|r| r.message1 == message1)
            || self
                .current_messages
                .as_ref()
                .is_some_and(|(m1, _)| *m1 == message1);
        if repeated {
            return Err(ChannelError::Duplicate);
        }
        let established = self.current.is_some();
        if established && recent(self.last_answer, now) {
            return Err(ChannelError::RateLimited);
        }
        let mut hs = Handshake::responder(&self.local, self.expect.clone(), self.session_id)?;
        hs.read_message(body, known)?;
        let n = write_handshake(&mut hs, self.session_id, out)?;
        if self.responding.len() == MAX_RESPONDING {
            self.responding.remove(0);
        }
        self.responding.push(Responding {
            hs: Box::new(hs),
            message1,
            started: now,
        });
        if established {
            self.last_answer = Some(now);
        }
        Ok(ChannelOutput {
            transmit: Some(n),
            ..ChannelOutput::default()
        })
    }

    /// Responder: HANDSHAKE-3 finishes one of the answered handshakes, newest first.
    fn on_message3(
        &mut self,
        now: Instant,
        body: &[u8],
        known: &mut KnownPeers,
        out: &mut [u8],
    ) -> Result<ChannelOutput, ChannelError> {
        let mut refused = None;
        let mut finished = None;
        for i in (0..self.responding.len()).rev() {
            match self.responding[i].hs.read_message(body, known) {
                Ok(()) => {
                    finished = Some(self.responding.remove(i));
                    break;
                }
                Err(NoiseError::WrongIdentity) => {
                    // Authenticated but from the wrong key: this handshake is over, nothing
                    // else changes.
                    self.responding.remove(i);
                    refused = Some(NoiseError::WrongIdentity);
                    break;
                }
                Err(error) => refused = refused.or(Some(error)),
            }
        }
        if let Some(done) = finished {
            let transport = done.hs.into_transport(now, self.limits)?;
            self.responding.clear();
            self.install(now, Box::new(transport), now);
            self.current_messages = Some((done.message1, body.to_vec()));
            let n = self.confirm(now, out)?;
            return Ok(ChannelOutput {
                transmit: Some(n),
                established: true,
                plaintext: None,
            });
        }
        if let Some(error @ NoiseError::WrongIdentity) = refused {
            return Err(error.into());
        }
        let repeated = self
            .current_messages
            .as_ref()
            .is_some_and(|(_, m3)| m3.as_slice() == body);
        match (repeated, recent(self.last_confirmation, now)) {
            (true, false) => Ok(ChannelOutput {
                transmit: Some(self.confirm(now, out)?),
                ..ChannelOutput::default()
            }),
            (true, true) => Err(ChannelError::RateLimited),
            (false, _) => Err(refused.unwrap_or(NoiseError::UnexpectedMessage).into()),
        }
    }

    /// Makes `transport`, made at `created`, current, keeping the one it replaces for frames in
    /// flight.
    fn install(&mut self, now: Instant, transport: Box<Transport>, created: Instant) {
        if let Some(old) = self.current.replace(transport) {
            self.previous = Some((old, now + HANDSHAKE_TIMEOUT));
        }
        self.current_since = Some(created);
    }

    /// Responder: writes the confirmation, an empty TRANSPORT frame under the current keys.
    fn confirm(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, ChannelError> {
        let transport = self.current.as_mut().ok_or(ChannelError::NotEstablished)?;
        let n = seal(transport, self.session_id, now, &[], out)?;
        self.last_confirmation = Some(now);
        Ok(n)
    }

    /// A TRANSPORT frame: opened under the unconfirmed transport (which it then confirms), the
    /// current one or the previous one, whichever authenticates it.
    fn open(&mut self, now: Instant, body: &mut [u8]) -> Result<ChannelOutput, ChannelError> {
        let candidates = usize::from(self.unconfirmed.is_some())
            + usize::from(self.current.is_some())
            + usize::from(self.previous.is_some());
        if candidates == 0 {
            return Err(ChannelError::NotEstablished);
        }
        // A failed open leaves the frame's bytes unspecified: keep a copy to try the next key.
        let original = (candidates > 1).then(|| body.to_vec());
        let mut first_error = None;
        let mut attempt = |transport: &mut Transport, body: &mut [u8]| {
            if let Some(original) = &original {
                body.copy_from_slice(original);
            }
            match transport.open_in_place(now, body) {
                Ok(range) => Some(range),
                Err(error) => {
                    first_error.get_or_insert(error);
                    None
                }
            }
        };
        let mut opened = None;
        let mut confirmed = false;
        if let Some(u) = &mut self.unconfirmed {
            opened = attempt(&mut u.transport, body);
            confirmed = opened.is_some();
        }
        if opened.is_none()
            && let Some(t) = &mut self.current
        {
            opened = attempt(t, body);
        }
        if opened.is_none()
            && let Some((t, _)) = &mut self.previous
        {
            opened = attempt(t, body);
        }
        let Some(range) = opened else {
            return Err(first_error.unwrap_or(NoiseError::Decrypt).into());
        };
        if confirmed && let Some(u) = self.unconfirmed.take() {
            self.install(now, u.transport, u.created);
            self.retry_at = None;
        }
        Ok(ChannelOutput {
            plaintext: (!range.is_empty())
                .then(|| range.start + HEADER_LEN..range.end + HEADER_LEN),
            ..ChannelOutput::default()
        })
    }

    /// The transport to seal with: the current one, unless only an unconfirmed one exists or
    /// the current one is past its maximum age.
    fn sending(&mut self, now: Instant) -> Result<&mut Transport, ChannelError> {
        let current_usable = self.current.as_ref().is_some_and(|t| !t.is_expired(now));
        let use_current = current_usable || self.unconfirmed.is_none();
        match (use_current, &mut self.current, &mut self.unconfirmed) {
            (true, Some(t), _) => Ok(t),
            (_, _, Some(u)) => Ok(&mut u.transport),
            _ => Err(ChannelError::NotEstablished),
        }
    }

    /// Encrypts `plaintext` into a DATA datagram in `out`.
    pub fn send(
        &mut self,
        now: Instant,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, ChannelError> {
        let session_id = self.session_id;
        seal(self.sending(now)?, session_id, now, plaintext, out)
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
        let session_id = self.session_id;
        let t = self.sending(now)?;
        let body = after_header(buf)?;
        let n = t.seal_in_place(now, body, len)?;
        wire::encode_data_header(buf, session_id, n)?;
        Ok(HEADER_LEN + n)
    }
}

/// Where [`Channel::send_in_place`] expects the plaintext: after the relay header and the
/// transport frame header.
pub const PLAINTEXT_OFFSET: usize = HEADER_LEN + ferry_core::noise::TRANSPORT_HEADER_LEN;

/// Whether `last` is less than [`RETRY_INITIAL`] before `now`.
fn recent(last: Option<Instant>, now: Instant) -> bool {
    last.is_some_and(|at| now < at + RETRY_INITIAL)
}

fn seal(
    transport: &mut Transport,
    session_id: u64,
    now: Instant,
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<usize, ChannelError> {
    let body = after_header(out)?;
    let n = transport.seal(now, plaintext, body)?;
    wire::encode_data_header(out, session_id, n)?;
    Ok(HEADER_LEN + n)
}

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

#[cfg(test)]
mod tests;
