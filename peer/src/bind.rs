//! Binding a slot on a relay, sans-IO: BIND, CHALLENGE, BIND-ACK/REJECT, REBIND, KEEPALIVE and
//! CLOSE from the peer's side (docs/protocol.md §3, timers of §8).
//!
//! The caller owns the socket and the clock: it passes `now` in, sends what the client writes
//! into its buffer, and calls [`BindClient::on_timeout`] when [`BindClient::poll_timeout`] says.
//! What the relay sends unasked comes out of [`BindClient::handle`] too: the notice that the
//! other slot has bound ([`BindEvent::PeerPresent`]) and the CLOSE that ends the binding, with
//! its reason ([`BindEvent::Closed`]).
//!
//! A binding lasts as long as its token: the relay unbinds the slot at the token's `exp` plus
//! its clock skew. To keep it, the peer gets a fresh token for its slot (the gateway's
//! `POST /v1/sessions/renew`) when [`BindClient::renew_due`] says, and hands it to
//! [`BindClient::renew`], which sends a BIND with it from the bound address (docs/protocol.md
//! §3.1, *Renewal*). The old binding keeps working until the relay acknowledges the new one;
//! from then on the client proves its slot with the new slot secret.
//!
//! When the binding is gone — the relay said so with a CLOSE ([`BindEvent::Closed`], reason
//! `IDLE` or `EXPIRED`), or [`KEEPALIVES_LOST`] KEEPALIVEs in a row went unanswered
//! ([`BindEvent::Lost`], e.g. after a relay restart) — the peer gets a fresh token for its slot
//! from the gateway and hands it to [`BindClient::recover`], which binds the slot again from
//! scratch with a first BIND (docs/protocol.md §3.1, *Recovery*). The end-to-end channel is not
//! touched: the relay never held its keys.

use std::time::{Duration, Instant};

use ferry_core::proof::{SlotKeys, SlotSecret};
use ferry_core::time::UnixTime;
use ferry_core::wire::{self, CloseReason, Packet, RejectReason, Slot, TOKEN_LEN};

/// First retransmission delay of an unanswered BIND/REBIND; it doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest delay between retransmissions.
pub const MAX_RETRY: Duration = Duration::from_secs(8);
/// A bind attempt with no answer for this long fails.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a KEEPALIVE waits for its echo before the next one is sent (docs/protocol.md §8).
pub const KEEPALIVE_RETRY: Duration = Duration::from_secs(2);
/// After this many KEEPALIVEs in a row without an echo, each given [`KEEPALIVE_RETRY`], the
/// binding is lost (docs/protocol.md §8).
pub const KEEPALIVES_LOST: u32 = 3;

/// Why [`BindClient::renew`] could not start a renewal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewError {
    /// The slot is not bound: binding, moving with a REBIND, failed or closed. Only a bound
    /// slot is renewed; a slot the relay has unbound needs a first BIND with a fresh token.
    #[error("the slot is not bound")]
    NotBound,
    /// The BIND could not be written.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

/// Where the binding stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindState {
    /// Not started.
    Idle,
    /// BIND or REBIND sent, no BIND-ACK yet.
    Binding,
    /// The relay acknowledged the slot.
    Bound,
    /// The relay refused with an authenticated REJECT, or the bind timed out.
    Failed,
    /// The session was closed by us, or the relay ended our binding (the other peer closed,
    /// the token expired, or the slot was idle).
    Closed,
    /// [`KEEPALIVES_LOST`] KEEPALIVEs in a row went unanswered: the relay no longer holds the
    /// binding (it restarted, or its CLOSE was lost). Recover with [`BindClient::recover`].
    Lost,
}

/// What a received relay packet meant to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindEvent {
    /// Send the first `n` bytes of the output buffer to the relay.
    Transmit(usize),
    /// The slot is bound (or re-bound, or renewed); `peer_present` says whether the other slot
    /// is too.
    Bound {
        /// Whether the other peer was bound when the relay answered.
        peer_present: bool,
    },
    /// The relay refused. `authenticated` REJECTs are final; others are only hints.
    Rejected {
        /// The relay's reason.
        reason: RejectReason,
        /// Whether the REJECT carried a valid relay MAC.
        authenticated: bool,
    },
    /// The relay ended our binding with an authenticated CLOSE (docs/protocol.md §3.8).
    Closed {
        /// Why: the other peer closed the session, our token passed `exp` plus the relay's
        /// clock skew, or our slot was idle for the idle timeout.
        reason: CloseReason,
    },
    /// While bound, the relay said that the other slot has just been bound: an unsolicited
    /// BIND-ACK of our own binding with *peer present* set (docs/protocol.md §3.3). Copies may
    /// repeat it.
    PeerPresent,
    /// The relay echoed a KEEPALIVE: the binding works.
    KeepaliveEcho,
    /// From [`BindClient::on_timer`]: [`KEEPALIVES_LOST`] KEEPALIVEs in a row went unanswered,
    /// so the binding is gone ([`BindState::Lost`]).
    Lost,
    /// Not for us, forged, or stale: ignored.
    Ignored,
}

/// One peer's binding to one slot of one relay session.
pub struct BindClient {
    session_id: u64,
    slot: Slot,
    token: [u8; TOKEN_LEN],
    keys: SlotKeys,
    cookie: [u8; 16],
    /// The next sequence number to use; strictly increasing (docs/protocol.md §3.1).
    next_seq: u64,
    /// The sequence number of the BIND/REBIND in flight.
    pending_seq: u64,
    /// Whether the request in flight is a REBIND.
    rebinding: bool,
    /// The sequence number of the last request the relay acknowledged: the one a peer-present
    /// notice carries.
    acked_seq: Option<u64>,
    state: BindState,
    started: Option<Instant>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    idle_timeout: Duration,
    /// When the peer last sent something that refreshes its slot's idle timer on the relay.
    last_sent: Option<Instant>,
    /// Whether the other slot is known to be bound (a BIND-ACK said so, or DATA arrived from
    /// it): only then does DATA sent refresh this slot's idle timer (docs/protocol.md §8).
    peer_present: bool,
    /// When the relay last showed that it holds the binding: a BIND-ACK, a peer-present
    /// notice, a KEEPALIVE echo, or DATA it forwarded from the other peer.
    last_heard: Option<Instant>,
    /// KEEPALIVEs sent since then without an echo, and when the last of them went.
    unanswered: u32,
    keepalive_sent: Option<Instant>,
    /// The renewal BIND in flight, if any.
    renewal: Option<Renewal>,
    /// When the binding the relay acknowledged last expires, and when that ACK arrived.
    expiry: Option<Expiry>,
}

/// A renewal in flight: a BIND with a fresh token from the bound address, under the keys of the
/// fresh slot secret. The client keeps the old keys until the relay acknowledges it.
struct Renewal {
    token: [u8; TOKEN_LEN],
    keys: SlotKeys,
    seq: u64,
    started: Instant,
    retry_at: Instant,
    retry_delay: Duration,
}

/// The `expires at` of the last BIND-ACK (Unix seconds) and the local time it arrived, which
/// together map the token's expiry onto the caller's monotonic clock.
#[derive(Clone, Copy, Debug)]
struct Expiry {
    expires_at: UnixTime,
    acked_at: Instant,
}

impl std::fmt::Debug for BindClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindClient")
            .field("session_id", &self.session_id)
            .field("slot", &self.slot)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl BindClient {
    /// A client for the slot that `token` grants, proving ownership with `secret`.
    /// `first_seq` should be the current Unix time in microseconds, so sequence numbers keep
    /// increasing across restarts.
    pub fn new(
        session_id: u64,
        slot: Slot,
        token: [u8; TOKEN_LEN],
        secret: &SlotSecret,
        first_seq: u64,
    ) -> Self {
        Self {
            session_id,
            slot,
            token,
            keys: SlotKeys::derive(secret),
            cookie: [0; 16],
            next_seq: first_seq.max(1),
            pending_seq: 0,
            rebinding: false,
            acked_seq: None,
            state: BindState::Idle,
            started: None,
            retry_at: None,
            retry_delay: FIRST_RETRY,
            idle_timeout: Duration::from_secs(60),
            last_sent: None,
            peer_present: false,
            last_heard: None,
            unanswered: 0,
            keepalive_sent: None,
            renewal: None,
            expiry: None,
        }
    }

    /// Where the binding stands.
    pub fn state(&self) -> BindState {
        self.state
    }

    /// The session this client binds.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Records that DATA went to the relay. The relay refreshes a slot's idle timer with DATA
    /// only while the other slot is bound (docs/protocol.md §8), so only then does this postpone
    /// the next KEEPALIVE; before, the client keeps sending KEEPALIVEs on schedule.
    pub fn note_data_sent(&mut self, now: Instant) {
        if self.peer_present {
            self.last_sent = Some(now);
        }
    }

    /// Records that DATA arrived from the other peer at `now`: its slot is bound, and the relay,
    /// which forwarded it, still holds ours.
    pub fn note_data_received(&mut self, now: Instant) {
        self.peer_present = true;
        if self.holds_slot() {
            self.heard(now);
        }
    }

    /// The relay showed at `now` that it holds the binding.
    fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
        self.unanswered = 0;
        self.keepalive_sent = None;
    }

    /// Whether the other slot is known to be bound: a BIND-ACK or a peer-present notice said
    /// so, or DATA arrived from it.
    pub fn peer_present(&self) -> bool {
        self.peer_present
    }

    /// When the binding the relay acknowledged last expires (its token's `exp`, from the
    /// BIND-ACK), if the slot was ever bound.
    pub fn expires_at(&self) -> Option<UnixTime> {
        self.expiry.map(|e| e.expires_at)
    }

    /// Whether a renewal BIND is in flight.
    pub fn renewing(&self) -> bool {
        self.renewal.is_some()
    }

    /// When the binding should be renewed: once two thirds of the life its token had left when
    /// the relay acknowledged it have passed, so that a third is left for getting a fresh token
    /// and for the renewal's retransmissions. `now` and `wall` are the same moment on the
    /// monotonic and the wall clock (the relay states the expiry in Unix seconds); the answer
    /// is on the monotonic clock. `None` while not bound, and while a renewal is in flight.
    pub fn renew_at(&self, now: Instant, wall: UnixTime) -> Option<Instant> {
        if self.state != BindState::Bound || self.renewal.is_some() {
            return None;
        }
        let expiry = self.expiry?;
        // With L the life left at the ACK, e the time since and r the life left now
        // (L = e + r), renewal is due when e ≥ 2L/3, that is e ≥ 2r; r shrinks as e grows,
        // so that moment is (2r − e)/3 from now.
        let left = Duration::from_secs(expiry.expires_at.as_secs().saturating_sub(wall.as_secs()));
        let elapsed = now.saturating_duration_since(expiry.acked_at);
        Some(now + (left * 2).saturating_sub(elapsed) / 3)
    }

    /// Whether the binding should be renewed now (see [`renew_at`](Self::renew_at)).
    pub fn renew_due(&self, now: Instant, wall: UnixTime) -> bool {
        self.renew_at(now, wall).is_some_and(|t| now >= t)
    }

    /// Renews the bound slot with a fresh `token` for the same session and slot and its slot
    /// `secret`: writes a BIND with them and a new sequence number into `out`, to be sent from
    /// the bound address. The client retransmits it like a BIND (see
    /// [`poll_timeout`](Self::poll_timeout)); meanwhile the old binding and its keys keep
    /// working. On the relay's BIND-ACK ([`BindEvent::Bound`]) the client proves its slot with
    /// the new secret and takes the new expiry. An authenticated REJECT of the renewal
    /// ([`BindEvent::Rejected`]) and a renewal unanswered for [`BIND_TIMEOUT`] leave the old
    /// binding as it was. A renewal in flight is replaced by a new one.
    pub fn renew(
        &mut self,
        now: Instant,
        token: [u8; TOKEN_LEN],
        secret: &SlotSecret,
        out: &mut [u8],
    ) -> Result<usize, RenewError> {
        if self.state != BindState::Bound {
            return Err(RenewError::NotBound);
        }
        let seq = self.take_seq();
        self.renewal = Some(Renewal {
            token,
            keys: SlotKeys::derive(secret),
            seq,
            started: now,
            retry_at: now,
            retry_delay: FIRST_RETRY,
        });
        Ok(self.write_renewal(now, out)?)
    }

    fn write_renewal(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, wire::WireError> {
        let cookie = self.cookie;
        let Some(renewal) = self.renewal.as_mut() else {
            return Ok(0);
        };
        let fields = wire::BindFields {
            slot: self.slot,
            bind_seq: renewal.seq,
            cookie,
            token: &renewal.token,
        };
        let keys = &renewal.keys;
        let n = wire::encode_bind(out, self.session_id, &fields, |m| keys.peer.mac(m))?;
        renewal.retry_at = now + renewal.retry_delay;
        Ok(n)
    }

    /// Binds the slot again from scratch after the binding is gone ([`BindEvent::Lost`], or
    /// [`BindEvent::Closed`] with reason `IDLE` or `EXPIRED`), with a fresh `token` for the same
    /// session and slot and its slot `secret` (the gateway's `POST /v1/sessions/renew`): forgets
    /// the old binding and its keys and writes a first BIND with a new sequence number into
    /// `out`, retransmitted and answered like the one of [`start`](Self::start); a relay that
    /// restarted answers it with a CHALLENGE first. Works in any state. The end-to-end channel
    /// needs nothing: the relay never held its keys (docs/protocol.md §3.1, *Recovery*).
    pub fn recover(
        &mut self,
        now: Instant,
        token: [u8; TOKEN_LEN],
        secret: &SlotSecret,
        out: &mut [u8],
    ) -> Result<usize, wire::WireError> {
        self.token = token;
        self.keys = SlotKeys::derive(secret);
        self.acked_seq = None;
        self.peer_present = false;
        self.expiry = None;
        self.last_heard = None;
        self.unanswered = 0;
        self.keepalive_sent = None;
        self.start(now, out)
    }

    /// Starts binding: writes a BIND into `out`.
    pub fn start(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, wire::WireError> {
        self.begin(now, false);
        self.write_request(now, out)
    }

    /// Moves the binding to a new local address after a NAT change: writes a REBIND. A renewal
    /// in flight is given up (it was sent from the old address); renew again once re-bound.
    pub fn rebind(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, wire::WireError> {
        // A cookie is bound to the old address; the relay will CHALLENGE the new one.
        self.cookie = [0; 16];
        self.begin(now, true);
        self.write_request(now, out)
    }

    /// Ends the session: writes a CLOSE the relay will verify and pass on to the other peer.
    pub fn close(&mut self, out: &mut [u8]) -> Result<usize, wire::WireError> {
        let fields = wire::CloseFields {
            slot: self.slot,
            reason: CloseReason::PeerClosed,
            seq: self.take_seq(),
        };
        let keys = &self.keys;
        let n = wire::encode_close(out, self.session_id, &fields, |m| keys.peer.mac(m))?;
        self.state = BindState::Closed;
        self.retry_at = None;
        self.renewal = None;
        Ok(n)
    }

    fn begin(&mut self, now: Instant, rebinding: bool) {
        self.renewal = None;
        self.state = BindState::Binding;
        self.rebinding = rebinding;
        self.started = Some(now);
        self.retry_delay = FIRST_RETRY;
        self.pending_seq = self.take_seq();
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }

    fn write_request(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, wire::WireError> {
        let keys = &self.keys;
        let n = if self.rebinding {
            let fields = wire::RebindFields {
                slot: self.slot,
                bind_seq: self.pending_seq,
                cookie: self.cookie,
            };
            wire::encode_rebind(out, self.session_id, &fields, |m| keys.peer.mac(m))?
        } else {
            let fields = wire::BindFields {
                slot: self.slot,
                bind_seq: self.pending_seq,
                cookie: self.cookie,
                token: &self.token,
            };
            wire::encode_bind(out, self.session_id, &fields, |m| keys.peer.mac(m))?
        };
        self.retry_at = Some(now + self.retry_delay);
        self.last_sent = Some(now);
        Ok(n)
    }

    /// Handles a datagram received from the relay; may write an answer into `out`.
    pub fn handle(&mut self, now: Instant, datagram: &[u8], out: &mut [u8]) -> BindEvent {
        let Ok(packet) = wire::parse(datagram) else {
            return BindEvent::Ignored;
        };
        let renewal_seq = self.renewal.as_ref().map(|r| r.seq);
        match packet {
            Packet::Challenge(c)
                if c.session_id() == self.session_id && Some(c.bind_seq()) == renewal_seq =>
            {
                self.cookie = *c.cookie();
                let seq = self.take_seq();
                if let Some(renewal) = self.renewal.as_mut() {
                    renewal.seq = seq;
                }
                match self.write_renewal(now, out) {
                    Ok(n) => BindEvent::Transmit(n),
                    Err(_) => BindEvent::Ignored,
                }
            }
            Packet::BindAck(ack)
                if ack.session_id() == self.session_id
                    && ack.slot() == self.slot
                    && Some(ack.bind_seq()) == renewal_seq
                    && self
                        .renewal
                        .as_ref()
                        .is_some_and(|r| r.keys.relay.verify(ack.mac_input(), ack.mac())) =>
            {
                // The relay holds the fresh token now: prove the slot with its keys from here on.
                if let Some(renewal) = self.renewal.take() {
                    self.token = renewal.token;
                    self.keys = renewal.keys;
                }
                self.on_ack(now, &ack);
                BindEvent::Bound {
                    peer_present: ack.peer_present(),
                }
            }
            Packet::Reject(rej)
                if rej.session_id() == self.session_id && Some(rej.bind_seq()) == renewal_seq =>
            {
                let authenticated = rej.authenticated()
                    && self
                        .renewal
                        .as_ref()
                        .is_some_and(|r| r.keys.relay.verify(rej.mac_input(), rej.mac()));
                if authenticated {
                    // The relay refused the fresh token; the old binding stands as it was.
                    self.renewal = None;
                }
                BindEvent::Rejected {
                    reason: rej.reason(),
                    authenticated,
                }
            }
            Packet::Challenge(c)
                if c.session_id() == self.session_id
                    && self.state == BindState::Binding
                    && c.bind_seq() == self.pending_seq =>
            {
                self.cookie = *c.cookie();
                // The proof covers the cookie, so the request is rebuilt with a new sequence.
                self.pending_seq = self.take_seq();
                match self.write_request(now, out) {
                    Ok(n) => BindEvent::Transmit(n),
                    Err(_) => BindEvent::Ignored,
                }
            }
            Packet::BindAck(ack)
                if ack.session_id() == self.session_id
                    && ack.slot() == self.slot
                    && self.holds_slot()
                    && Some(ack.bind_seq()) == self.acked_seq
                    && self.keys.relay.verify(ack.mac_input(), ack.mac()) =>
            {
                // A BIND-ACK of the binding we hold: the relay's peer-present notice, or a
                // late copy of the ACK we had (which says nothing new unless it says present).
                self.heard(now);
                if !ack.peer_present() {
                    return BindEvent::Ignored;
                }
                self.peer_present = true;
                BindEvent::PeerPresent
            }
            Packet::BindAck(ack)
                if ack.session_id() == self.session_id
                    && ack.slot() == self.slot
                    && self.keys.relay.verify(ack.mac_input(), ack.mac())
                    && ack.bind_seq() == self.pending_seq =>
            {
                self.state = BindState::Bound;
                self.retry_at = None;
                self.on_ack(now, &ack);
                BindEvent::Bound {
                    peer_present: ack.peer_present(),
                }
            }
            Packet::Reject(rej)
                if rej.session_id() == self.session_id && rej.bind_seq() == self.pending_seq =>
            {
                let authenticated =
                    rej.authenticated() && self.keys.relay.verify(rej.mac_input(), rej.mac());
                if authenticated {
                    self.state = BindState::Failed;
                    self.retry_at = None;
                }
                BindEvent::Rejected {
                    reason: rej.reason(),
                    authenticated,
                }
            }
            Packet::Close(close)
                if close.session_id() == self.session_id
                    && close.slot() == self.slot
                    && self.keys.relay.verify(close.mac_input(), close.mac()) =>
            {
                self.state = BindState::Closed;
                self.retry_at = None;
                self.renewal = None;
                BindEvent::Closed {
                    reason: close.reason(),
                }
            }
            Packet::Keepalive(ka) if ka.session_id() == self.session_id => {
                if self.holds_slot() {
                    self.heard(now);
                }
                BindEvent::KeepaliveEcho
            }
            _ => BindEvent::Ignored,
        }
    }

    /// Takes what a BIND-ACK of our request in flight says: the request is acknowledged, the
    /// other slot's presence, the relay's idle timeout and the binding's expiry.
    fn on_ack(&mut self, now: Instant, ack: &wire::BindAck<'_>) {
        self.heard(now);
        self.acked_seq = Some(ack.bind_seq());
        self.peer_present = ack.peer_present();
        self.idle_timeout = Duration::from_secs(u64::from(ack.idle_timeout_secs().max(3)));
        self.expiry = Some(Expiry {
            expires_at: UnixTime(ack.expires_at()),
            acked_at: now,
        });
    }

    /// Whether the relay holds our slot as far as we know: bound, or moving it with a REBIND
    /// (the old binding stays until the relay accepts the move).
    fn holds_slot(&self) -> bool {
        match self.state {
            BindState::Bound => true,
            BindState::Binding => self.rebinding,
            _ => false,
        }
    }

    /// When [`on_timeout`](Self::on_timeout) should next be called, if ever: a retransmission
    /// of the request or the renewal in flight, the next KEEPALIVE, or the moment the binding
    /// counts as lost.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            BindState::Binding => self.retry_at,
            BindState::Bound => {
                let renewal = self.renewal.as_ref().map(|r| r.retry_at);
                self.keepalive_at().into_iter().chain(renewal).min()
            }
            _ => None,
        }
    }

    /// When the next KEEPALIVE is due (or, after [`KEEPALIVES_LOST`] unanswered ones, the
    /// binding is lost): [`KEEPALIVE_RETRY`] after an unanswered one; otherwise
    /// `KEEPALIVE_INTERVAL` after the last thing sent that refreshes the slot's idle timer, or
    /// twice that after the relay was last heard from, whichever comes first, so that a peer
    /// that keeps sending DATA into a relay that has forgotten it still finds out.
    fn keepalive_at(&self) -> Option<Instant> {
        if let Some(sent) = self.keepalive_sent.filter(|_| self.unanswered > 0) {
            return Some(sent + KEEPALIVE_RETRY);
        }
        let interval = self.keepalive_interval();
        let idle = self.last_sent.map(|t| t + interval);
        let silent = self.last_heard.map(|t| t + interval * 2);
        idle.into_iter().chain(silent).min()
    }

    /// How often a bound client with nothing to send sends KEEPALIVE (§8: idle timeout ÷ 3).
    pub fn keepalive_interval(&self) -> Duration {
        self.idle_timeout / 3
    }

    /// Retransmits an unanswered request or renewal, gives up on either after
    /// [`BIND_TIMEOUT`] (a renewal given up leaves the binding as it was), or sends a KEEPALIVE
    /// when bound and idle. Returns the bytes to send, if any; when several are due, one per
    /// call. [`on_timer`](Self::on_timer) does the same and also reports a lost binding.
    pub fn on_timeout(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        match self.on_timer(now, out) {
            BindEvent::Transmit(n) => Some(n),
            _ => None,
        }
    }

    /// Runs the client's timers, like [`on_timeout`](Self::on_timeout): returns
    /// [`BindEvent::Transmit`] with the bytes to send, [`BindEvent::Lost`] when the last of
    /// [`KEEPALIVES_LOST`] KEEPALIVEs in a row has gone unanswered for [`KEEPALIVE_RETRY`] (the
    /// client is then [`BindState::Lost`]), or [`BindEvent::Ignored`] when nothing is due.
    pub fn on_timer(&mut self, now: Instant, out: &mut [u8]) -> BindEvent {
        let sent = |n: Option<usize>| n.map_or(BindEvent::Ignored, BindEvent::Transmit);
        let due = self.poll_timeout().is_some_and(|t| now >= t);
        if !due {
            return BindEvent::Ignored;
        }
        match self.state {
            BindState::Binding => {
                if self
                    .started
                    .is_some_and(|s| now.duration_since(s) >= BIND_TIMEOUT)
                {
                    self.state = BindState::Failed;
                    self.retry_at = None;
                    return BindEvent::Ignored;
                }
                self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
                sent(self.write_request(now, out).ok())
            }
            BindState::Bound => {
                if let Some(renewal) = self.renewal.as_mut()
                    && now >= renewal.retry_at
                {
                    if now.duration_since(renewal.started) >= BIND_TIMEOUT {
                        self.renewal = None;
                    } else {
                        renewal.retry_delay = (renewal.retry_delay * 2).min(MAX_RETRY);
                        return sent(self.write_renewal(now, out).ok());
                    }
                }
                if self.keepalive_at().is_none_or(|t| now < t) {
                    return BindEvent::Ignored;
                }
                if self.unanswered >= KEEPALIVES_LOST {
                    self.state = BindState::Lost;
                    self.renewal = None;
                    return BindEvent::Lost;
                }
                self.last_sent = Some(now);
                self.keepalive_sent = Some(now);
                self.unanswered += 1;
                sent(wire::encode_keepalive(out, self.session_id).ok())
            }
            _ => BindEvent::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: u64 = 7;
    const FIRST_SEQ: u64 = 100;

    /// A client that has sent its BIND at `t0` and received a BIND-ACK (idle timeout 30 s, so
    /// keepalives every 10 s) saying whether the other slot is bound.
    fn bound_client(t0: Instant, peer_present: bool) -> BindClient {
        let secret = SlotSecret::from_bytes([9; 32]);
        let mut client = BindClient::new(SESSION, Slot::A, [0; TOKEN_LEN], &secret, FIRST_SEQ);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        client.start(t0, &mut out).expect("BIND fits");
        let ack = bind_ack(FIRST_SEQ, peer_present, 1_000, &secret);
        assert_eq!(
            client.handle(t0, &ack, &mut out),
            BindEvent::Bound { peer_present }
        );
        client
    }

    /// A datagram the relay sends the client of [`bound_client`], MAC'd with `relay_key`.
    fn from_relay(
        encode: impl FnOnce(&mut [u8], &dyn Fn(&[u8]) -> wire::Mac) -> Result<usize, wire::WireError>,
        relay_key: &SlotSecret,
    ) -> Vec<u8> {
        let relay = SlotKeys::derive(relay_key).relay;
        let mut buf = vec![0u8; wire::MAX_DATAGRAM];
        let n = encode(&mut buf, &|m| relay.mac(m)).expect("fits");
        buf.truncate(n);
        buf
    }

    fn relay_close(reason: CloseReason, relay_key: &SlotSecret) -> Vec<u8> {
        let fields = wire::CloseFields {
            slot: Slot::A,
            reason,
            seq: FIRST_SEQ,
        };
        from_relay(
            |b, mac| wire::encode_close(b, SESSION, &fields, mac),
            relay_key,
        )
    }

    /// A BIND-ACK for slot A (idle timeout 30 s), MAC'd with `relay_key`.
    fn bind_ack(
        bind_seq: u64,
        peer_present: bool,
        expires_at: u64,
        relay_key: &SlotSecret,
    ) -> Vec<u8> {
        let fields = wire::BindAckFields {
            slot: Slot::A,
            peer_present,
            idle_timeout_secs: 30,
            bind_seq,
            expires_at,
        };
        from_relay(
            |b, mac| wire::encode_bind_ack(b, SESSION, &fields, mac),
            relay_key,
        )
    }

    fn notice(bind_seq: u64, peer_present: bool, relay_key: &SlotSecret) -> Vec<u8> {
        bind_ack(bind_seq, peer_present, 1_000, relay_key)
    }

    #[test]
    fn a_relay_close_says_why_the_binding_ended() {
        let secret = SlotSecret::from_bytes([9; 32]);
        let forger = SlotSecret::from_bytes([8; 32]);
        let t0 = Instant::now();
        let mut out = [0u8; wire::MAX_DATAGRAM];
        for reason in CloseReason::ALL {
            let mut client = bound_client(t0, true);
            let forged = relay_close(reason, &forger);
            assert_eq!(client.handle(t0, &forged, &mut out), BindEvent::Ignored);
            assert_eq!(client.state(), BindState::Bound);
            // A reason the spec does not define is malformed, even with a valid MAC.
            let mut unknown = relay_close(reason, &secret);
            unknown[wire::HEADER_LEN + 1] = 3;
            let relay = SlotKeys::derive(&secret).relay;
            let mac = relay.mac(&unknown[..wire::HEADER_LEN + 12]);
            unknown[wire::HEADER_LEN + 12..].copy_from_slice(&mac);
            assert_eq!(client.handle(t0, &unknown, &mut out), BindEvent::Ignored);
            assert_eq!(
                client.handle(t0, &relay_close(reason, &secret), &mut out),
                BindEvent::Closed { reason }
            );
            assert_eq!(client.state(), BindState::Closed);
            assert_eq!(client.poll_timeout(), None, "a closed client sends nothing");
        }
    }

    #[test]
    fn a_peer_present_notice_while_bound_sets_the_flag() {
        let secret = SlotSecret::from_bytes([9; 32]);
        let t0 = Instant::now();
        let mut client = bound_client(t0, false);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        // Forged, for another sequence number, or a late copy of the first ACK: nothing new.
        let forged = notice(FIRST_SEQ, true, &SlotSecret::from_bytes([8; 32]));
        assert_eq!(client.handle(t0, &forged, &mut out), BindEvent::Ignored);
        let stale = notice(FIRST_SEQ - 1, true, &secret);
        assert_eq!(client.handle(t0, &stale, &mut out), BindEvent::Ignored);
        let copy = notice(FIRST_SEQ, false, &secret);
        assert_eq!(client.handle(t0, &copy, &mut out), BindEvent::Ignored);
        assert!(!client.peer_present());
        assert_eq!(client.state(), BindState::Bound);

        let present = notice(FIRST_SEQ, true, &secret);
        assert_eq!(
            client.handle(t0, &present, &mut out),
            BindEvent::PeerPresent
        );
        assert!(client.peer_present());
        assert_eq!(client.state(), BindState::Bound);
        // Now DATA we send refreshes our slot on the relay, and postpones the KEEPALIVE.
        client.note_data_sent(t0 + Duration::from_secs(5));
        assert_eq!(client.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        // A copy of the notice repeats the event and changes nothing else.
        assert_eq!(
            client.handle(t0, &present, &mut out),
            BindEvent::PeerPresent
        );
        assert_eq!(client.state(), BindState::Bound);
    }

    #[test]
    fn a_peer_present_notice_before_the_binding_is_ignored() {
        let secret = SlotSecret::from_bytes([9; 32]);
        let mut client = BindClient::new(SESSION, Slot::A, [0; TOKEN_LEN], &secret, FIRST_SEQ);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let present = notice(FIRST_SEQ, true, &secret);
        assert_eq!(
            client.handle(Instant::now(), &present, &mut out),
            BindEvent::Ignored,
            "no request in flight, nothing acknowledged"
        );
        assert!(!client.peer_present());
    }

    #[test]
    fn data_sent_before_the_other_slot_binds_does_not_postpone_keepalives() {
        let t0 = Instant::now();
        let mut client = bound_client(t0, false);
        let due = t0 + Duration::from_secs(10);
        assert_eq!(client.poll_timeout(), Some(due));
        // The relay drops DATA while the other slot is empty and does not refresh our slot.
        client.note_data_sent(t0 + Duration::from_secs(5));
        assert_eq!(client.poll_timeout(), Some(due));
        // Once DATA came from the other peer, DATA we send keeps the binding alive.
        client.note_data_received(t0 + Duration::from_secs(6));
        client.note_data_sent(t0 + Duration::from_secs(6));
        assert_eq!(client.poll_timeout(), Some(t0 + Duration::from_secs(16)));
    }

    #[test]
    fn data_sent_with_the_peer_present_postpones_keepalives() {
        let t0 = Instant::now();
        let mut client = bound_client(t0, true);
        client.note_data_sent(t0 + Duration::from_secs(4));
        assert_eq!(client.poll_timeout(), Some(t0 + Duration::from_secs(14)));
        let mut out = [0u8; wire::MAX_DATAGRAM];
        assert_eq!(
            client.on_timeout(t0 + Duration::from_secs(13), &mut out),
            None
        );
        assert!(
            client
                .on_timeout(t0 + Duration::from_secs(14), &mut out)
                .is_some_and(|n| matches!(wire::parse(&out[..n]), Ok(Packet::Keepalive(_)))),
            "a KEEPALIVE is due 10 s after the last DATA"
        );
    }

    /// The fresh slot secret and token of the renewal tests.
    const NEW_SECRET: [u8; 32] = [5; 32];
    const NEW_TOKEN: [u8; TOKEN_LEN] = [1; TOKEN_LEN];

    /// The sequence number, token and proof key of a BIND the client wrote.
    fn sent_bind(datagram: &[u8], peer_key: &SlotSecret) -> (u64, [u8; TOKEN_LEN], [u8; 16]) {
        let Ok(Packet::Bind(bind)) = wire::parse(datagram) else {
            panic!("not a BIND");
        };
        assert!(
            SlotKeys::derive(peer_key)
                .peer
                .verify(bind.mac_input(), bind.mac()),
            "the BIND's proof is under the fresh slot secret"
        );
        (bind.bind_seq(), *bind.token(), *bind.cookie())
    }

    fn ack(bind_seq: u64, expires_at: u64, relay_key: &SlotSecret) -> Vec<u8> {
        bind_ack(bind_seq, true, expires_at, relay_key)
    }

    #[test]
    fn a_renewal_switches_keys_and_expiry_on_its_ack_only() {
        let old = SlotSecret::from_bytes([9; 32]);
        let new = SlotSecret::from_bytes(NEW_SECRET);
        let t0 = Instant::now();
        let mut client = bound_client(t0, false);
        assert_eq!(client.expires_at(), Some(UnixTime(1_000)));
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let t1 = t0 + Duration::from_secs(20);
        let n = client.renew(t1, NEW_TOKEN, &new, &mut out).expect("bound");
        let (seq, token, _) = sent_bind(&out[..n], &new);
        assert!(seq > FIRST_SEQ, "a renewal is a new request");
        assert_eq!(token, NEW_TOKEN);
        assert!(client.renewing());
        assert_eq!(client.state(), BindState::Bound);

        // In flight, the relay still speaks under the old keys: its notice is taken.
        assert_eq!(
            client.handle(t1, &notice(FIRST_SEQ, true, &old), &mut out),
            BindEvent::PeerPresent
        );
        // An ACK of the renewal under the old keys, or of another number, is not the ACK.
        assert_eq!(
            client.handle(t1, &ack(seq, 2_000, &old), &mut out),
            BindEvent::Ignored
        );
        assert_eq!(
            client.handle(t1, &ack(seq + 1, 2_000, &new), &mut out),
            BindEvent::Ignored
        );
        assert!(client.renewing());
        assert_eq!(
            client.handle(t1, &ack(seq, 2_000, &new), &mut out),
            BindEvent::Bound { peer_present: true }
        );
        assert!(!client.renewing());
        assert_eq!(client.expires_at(), Some(UnixTime(2_000)));

        // From now on only the new keys count, both ways.
        assert_eq!(
            client.handle(t1, &notice(FIRST_SEQ, true, &old), &mut out),
            BindEvent::Ignored
        );
        assert_eq!(
            client.handle(t1, &notice(seq, true, &new), &mut out),
            BindEvent::PeerPresent
        );
        assert_eq!(
            client.handle(t1, &relay_close(CloseReason::Expired, &old), &mut out),
            BindEvent::Ignored
        );
        let n = client.close(&mut out).expect("CLOSE fits");
        let Ok(Packet::Close(close)) = wire::parse(&out[..n]) else {
            panic!("not a CLOSE");
        };
        assert!(close.seq() > seq);
        assert!(
            SlotKeys::derive(&new)
                .peer
                .verify(close.mac_input(), close.mac())
        );
    }

    #[test]
    fn a_relay_close_during_a_renewal_still_ends_the_binding() {
        let old = SlotSecret::from_bytes([9; 32]);
        let t0 = Instant::now();
        let mut client = bound_client(t0, true);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        client
            .renew(t0, NEW_TOKEN, &SlotSecret::from_bytes(NEW_SECRET), &mut out)
            .expect("bound");
        assert_eq!(
            client.handle(t0, &relay_close(CloseReason::Expired, &old), &mut out),
            BindEvent::Closed {
                reason: CloseReason::Expired
            }
        );
        assert!(!client.renewing());
        assert_eq!(client.poll_timeout(), None);
    }

    #[test]
    fn a_renewal_is_retransmitted_unchanged_and_given_up_without_losing_the_binding() {
        let new = SlotSecret::from_bytes(NEW_SECRET);
        let t0 = Instant::now();
        let mut client = bound_client(t0, true);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let n = client.renew(t0, NEW_TOKEN, &new, &mut out).expect("bound");
        let first = out[..n].to_vec();
        let mut renewals = Vec::new();
        let mut keepalives = Vec::new();
        while let Some(at) = client.poll_timeout() {
            if at > t0 + Duration::from_secs(40) {
                break;
            }
            let Some(n) = client.on_timeout(at, &mut out) else {
                continue;
            };
            let secs = at.duration_since(t0).as_secs();
            match wire::parse(&out[..n]) {
                Ok(Packet::Bind(_)) => {
                    assert_eq!(out[..n], first[..], "a retransmission repeats the BIND");
                    renewals.push(secs);
                }
                Ok(Packet::Keepalive(_)) => {
                    keepalives.push(secs);
                    // The relay echoes it, so the binding is not lost meanwhile.
                    let echo = out[..n].to_vec();
                    assert_eq!(client.handle(at, &echo, &mut out), BindEvent::KeepaliveEcho);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Back-off 1, 2, 4, 8, 8 s; at 31 s the renewal is older than BIND_TIMEOUT.
        assert_eq!(renewals, [1, 3, 7, 15, 23]);
        assert_eq!(keepalives, [10, 20, 30, 40]);
        assert!(!client.renewing());
        assert_eq!(client.state(), BindState::Bound);
        assert_eq!(client.expires_at(), Some(UnixTime(1_000)));
    }

    #[test]
    fn a_challenged_renewal_is_repeated_with_the_cookie_and_a_new_number() {
        let new = SlotSecret::from_bytes(NEW_SECRET);
        let t0 = Instant::now();
        let mut client = bound_client(t0, true);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let n = client.renew(t0, NEW_TOKEN, &new, &mut out).expect("bound");
        let (seq, _, _) = sent_bind(&out[..n], &new);
        let challenge = |bind_seq| {
            let mut buf = vec![0u8; wire::MAX_DATAGRAM];
            let fields = wire::ChallengeFields {
                bind_seq,
                cookie: [7; 16],
            };
            let n = wire::encode_challenge(&mut buf, SESSION, &fields).expect("fits");
            buf.truncate(n);
            buf
        };
        assert_eq!(
            client.handle(t0, &challenge(seq + 5), &mut out),
            BindEvent::Ignored
        );
        let BindEvent::Transmit(n) = client.handle(t0, &challenge(seq), &mut out) else {
            panic!("the renewal is repeated");
        };
        let (again, token, cookie) = sent_bind(&out[..n], &new);
        assert!(again > seq);
        assert_eq!((token, cookie), (NEW_TOKEN, [7; 16]));
        assert_eq!(
            client.handle(t0, &ack(again, 2_000, &new), &mut out),
            BindEvent::Bound { peer_present: true }
        );
    }

    #[test]
    fn a_refused_renewal_leaves_the_binding_as_it_was() {
        let new = SlotSecret::from_bytes(NEW_SECRET);
        let t0 = Instant::now();
        let mut client = bound_client(t0, true);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let n = client.renew(t0, NEW_TOKEN, &new, &mut out).expect("bound");
        let (seq, _, _) = sent_bind(&out[..n], &new);
        let reject = |key: &SlotSecret| {
            let fields = wire::RejectFields {
                reason: RejectReason::Replayed,
                slot: Slot::A,
                bind_seq: seq,
            };
            from_relay(|b, mac| wire::encode_reject(b, SESSION, &fields, mac), key)
        };
        // Under the old keys it is not the relay's answer to this BIND: only a hint.
        let forged = reject(&SlotSecret::from_bytes([9; 32]));
        assert_eq!(
            client.handle(t0, &forged, &mut out),
            BindEvent::Rejected {
                reason: RejectReason::Replayed,
                authenticated: false
            }
        );
        assert!(client.renewing());
        assert_eq!(
            client.handle(t0, &reject(&new), &mut out),
            BindEvent::Rejected {
                reason: RejectReason::Replayed,
                authenticated: true
            }
        );
        assert!(!client.renewing());
        assert_eq!(client.state(), BindState::Bound);
        // The old keys still hold the slot.
        assert_eq!(
            client.handle(
                t0,
                &notice(FIRST_SEQ, true, &SlotSecret::from_bytes([9; 32])),
                &mut out
            ),
            BindEvent::PeerPresent
        );
    }

    #[test]
    fn renewal_is_due_when_a_third_of_the_token_life_is_left() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut client = BindClient::new(
            SESSION,
            Slot::A,
            [0; TOKEN_LEN],
            &SlotSecret::from_bytes([9; 32]),
            FIRST_SEQ,
        );
        let mut out = [0u8; wire::MAX_DATAGRAM];
        assert_eq!(client.renew_at(t0, UnixTime(970)), None, "not bound");
        assert!(matches!(
            client.renew(t0, NEW_TOKEN, &SlotSecret::from_bytes(NEW_SECRET), &mut out),
            Err(RenewError::NotBound)
        ));
        client = bound_client(t0, true);
        // The ACK at t0 says the token expires at 1000; the wall clock then reads 970: 30 s
        // of life, renewal due after 20 s, whenever asked.
        assert_eq!(client.renew_at(t0, UnixTime(970)), Some(t0 + secs(20)));
        assert_eq!(
            client.renew_at(t0 + secs(10), UnixTime(980)),
            Some(t0 + secs(20))
        );
        assert!(!client.renew_due(t0 + secs(19), UnixTime(989)));
        assert!(client.renew_due(t0 + secs(20), UnixTime(990)));
        assert!(client.renew_due(t0 + secs(40), UnixTime(1_010)), "past exp");
        let n = client
            .renew(
                t0 + secs(20),
                NEW_TOKEN,
                &SlotSecret::from_bytes(NEW_SECRET),
                &mut out,
            )
            .expect("bound");
        let (seq, _, _) = sent_bind(&out[..n], &SlotSecret::from_bytes(NEW_SECRET));
        assert_eq!(
            client.renew_at(t0 + secs(20), UnixTime(990)),
            None,
            "in flight"
        );
        // Acknowledged at t0 + 21 s (wall 991) until 1030: due 26 s later.
        let t1 = t0 + secs(21);
        let renewed = ack(seq, 1_030, &SlotSecret::from_bytes(NEW_SECRET));
        assert_eq!(
            client.handle(t1, &renewed, &mut out),
            BindEvent::Bound { peer_present: true }
        );
        assert_eq!(client.renew_at(t1, UnixTime(991)), Some(t1 + secs(26)));
    }

    /// Runs the client's timers from `from` to `until` on the virtual clock, answering nothing;
    /// returns when each KEEPALIVE went (seconds after `t0`) and when the binding was lost.
    fn silent_relay(
        client: &mut BindClient,
        t0: Instant,
        until: Instant,
        mut before_each: impl FnMut(&mut BindClient, Instant),
    ) -> (Vec<u64>, Option<u64>) {
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let mut keepalives = Vec::new();
        while let Some(at) = client.poll_timeout() {
            if at > until {
                break;
            }
            before_each(client, at);
            let secs = at.duration_since(t0).as_secs();
            match client.on_timer(at, &mut out) {
                BindEvent::Transmit(n) => {
                    assert!(matches!(wire::parse(&out[..n]), Ok(Packet::Keepalive(_))));
                    keepalives.push(secs);
                }
                BindEvent::Lost => return (keepalives, Some(secs)),
                BindEvent::Ignored => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        (keepalives, None)
    }

    #[test]
    fn unanswered_keepalives_lose_the_binding_after_three() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut client = bound_client(t0, true);
        // Idle timeout 30 s: a KEEPALIVE at 10 s, then one every KEEPALIVE_RETRY without an
        // echo, and the binding is lost KEEPALIVE_RETRY after the third.
        let (keepalives, lost) = silent_relay(&mut client, t0, t0 + secs(60), |_, _| {});
        assert_eq!(keepalives, [10, 12, 14]);
        assert_eq!(lost, Some(16));
        assert_eq!(client.state(), BindState::Lost);
        assert_eq!(client.poll_timeout(), None, "a lost client sends nothing");
        assert!(client.renew_at(t0 + secs(16), UnixTime(986)).is_none());
    }

    #[test]
    fn an_echo_resets_the_count_of_unanswered_keepalives() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut client = bound_client(t0, true);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let mut echo = [0u8; wire::MAX_DATAGRAM];
        for at in [10, 12] {
            let Some(n) = client.on_timeout(t0 + secs(at), &mut out) else {
                panic!("a KEEPALIVE at {at} s");
            };
            echo[..n].copy_from_slice(&out[..n]);
        }
        // The second one is echoed at 13 s: the relay holds the binding, back to the interval.
        let n = wire::encode_keepalive(&mut echo, SESSION).expect("fits");
        assert_eq!(
            client.handle(t0 + secs(13), &echo[..n], &mut out),
            BindEvent::KeepaliveEcho
        );
        assert_eq!(client.poll_timeout(), Some(t0 + secs(22)));
        let (keepalives, lost) = silent_relay(&mut client, t0, t0 + secs(60), |_, _| {});
        assert_eq!(keepalives, [22, 24, 26]);
        assert_eq!(lost, Some(28));
    }

    #[test]
    fn a_peer_that_keeps_sending_data_into_a_silent_relay_still_finds_out() {
        let t0 = Instant::now();
        let mut client = bound_client(t0, true);
        // DATA every second postpones the idle KEEPALIVE forever; but with nothing heard from
        // the relay for twice the interval, KEEPALIVEs go anyway.
        let (keepalives, lost) = silent_relay(
            &mut client,
            t0,
            t0 + Duration::from_secs(60),
            |client, at| {
                let whole = at.duration_since(t0).as_secs();
                client.note_data_sent(t0 + Duration::from_secs(whole.saturating_sub(1)));
            },
        );
        assert_eq!(keepalives, [20, 22, 24]);
        assert_eq!(lost, Some(26));
        // DATA forwarded from the other peer, by contrast, shows the relay holds the binding.
        let mut client = bound_client(t0, true);
        let (keepalives, lost) = silent_relay(
            &mut client,
            t0,
            t0 + Duration::from_secs(60),
            |client, at| {
                client.note_data_received(at);
                client.note_data_sent(at);
            },
        );
        assert_eq!((keepalives.len(), lost), (0, None));
    }

    /// A CHALLENGE for `bind_seq`.
    fn challenge(bind_seq: u64, cookie: [u8; 16]) -> Vec<u8> {
        let mut buf = vec![0u8; wire::MAX_DATAGRAM];
        let fields = wire::ChallengeFields { bind_seq, cookie };
        let n = wire::encode_challenge(&mut buf, SESSION, &fields).expect("fits");
        buf.truncate(n);
        buf
    }

    #[test]
    fn after_a_close_idle_a_fresh_token_binds_the_slot_again() {
        let old = SlotSecret::from_bytes([9; 32]);
        let new = SlotSecret::from_bytes(NEW_SECRET);
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut client = bound_client(t0, true);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        assert_eq!(
            client.handle(
                t0 + secs(40),
                &relay_close(CloseReason::Idle, &old),
                &mut out
            ),
            BindEvent::Closed {
                reason: CloseReason::Idle
            }
        );
        assert_eq!(client.state(), BindState::Closed);

        let t1 = t0 + secs(41);
        let n = client.recover(t1, NEW_TOKEN, &new, &mut out).expect("fits");
        let (seq, token, _) = sent_bind(&out[..n], &new);
        assert!(seq > FIRST_SEQ, "a new request");
        assert_eq!(token, NEW_TOKEN);
        assert_eq!(client.state(), BindState::Binding);
        assert!(
            !client.peer_present(),
            "the old binding's news is forgotten"
        );
        assert_eq!(client.expires_at(), None);
        // Retransmitted like a first BIND.
        assert_eq!(client.poll_timeout(), Some(t1 + FIRST_RETRY));
        // Under the old keys nothing counts any more.
        assert_eq!(
            client.handle(t1, &ack(seq, 2_000, &old), &mut out),
            BindEvent::Ignored
        );
        assert_eq!(
            client.handle(t1, &ack(seq, 2_000, &new), &mut out),
            BindEvent::Bound { peer_present: true }
        );
        assert_eq!(client.state(), BindState::Bound);
        assert_eq!(client.expires_at(), Some(UnixTime(2_000)));
        assert_eq!(client.poll_timeout(), Some(t1 + secs(10)));
    }

    #[test]
    fn a_lost_binding_is_recovered_through_a_challenge_and_the_channel_goes_on() {
        use crate::channel::Channel;
        use ferry_core::known_peers::KnownPeers;
        use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};

        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let alice_id = LocalIdentity::from_secret_bytes([1; 32]);
        let bob_id = LocalIdentity::from_secret_bytes([2; 32]);
        let limits = TransportLimits::default();
        let mut alice = Channel::initiator(
            &alice_id,
            PeerExpectation::Pinned(*bob_id.public()),
            SESSION,
            limits,
        )
        .expect("channel");
        let mut bob = Channel::responder(
            &bob_id,
            PeerExpectation::Pinned(*alice_id.public()),
            SESSION,
            limits,
        )
        .expect("channel");
        let mut known = KnownPeers::new();
        let mut buf = vec![0u8; wire::MAX_DATAGRAM];
        let mut answer = vec![0u8; wire::MAX_DATAGRAM];
        // The handshake, delivered directly: the relay only forwards DATA.
        let mut n = alice.start(t0, &mut buf).expect("HANDSHAKE-1");
        let mut to_bob = true;
        loop {
            let (to, from_buf) = if to_bob {
                (&mut bob, &mut buf)
            } else {
                (&mut alice, &mut buf)
            };
            let output = to
                .handle(t0, &mut from_buf[..n], &mut known, &mut answer)
                .expect("handshake message");
            let Some(m) = output.transmit else { break };
            buf[..m].copy_from_slice(&answer[..m]);
            n = m;
            to_bob = !to_bob;
        }
        assert!(alice.is_confirmed() && bob.is_established());
        let mut deliver = |alice: &mut Channel, bob: &mut Channel, at: Instant, text: &[u8]| {
            let n = alice.send(at, text, &mut buf).expect("sealed");
            let output = bob
                .handle(at, &mut buf[..n], &mut known, &mut answer)
                .expect("opened");
            let range = output.plaintext.expect("a message");
            assert_eq!(&buf[range], text);
        };
        deliver(&mut alice, &mut bob, t0, b"before");

        // The relay restarts: KEEPALIVEs go unanswered until the binding is lost. A message
        // sent meanwhile is dropped by the relay (sealed, never delivered).
        let mut client = bound_client(t0, true);
        let (_, lost) = silent_relay(&mut client, t0, t0 + secs(60), |_, _| {});
        let lost_at = t0 + secs(lost.expect("lost"));
        let mut dropped = [0u8; wire::MAX_DATAGRAM];
        alice
            .send(lost_at, b"dropped", &mut dropped)
            .expect("sealed");

        // A fresh token; the new relay challenges the first BIND (its cookie secret is new).
        let new = SlotSecret::from_bytes(NEW_SECRET);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let n = client
            .recover(lost_at, NEW_TOKEN, &new, &mut out)
            .expect("fits");
        let (seq, _, _) = sent_bind(&out[..n], &new);
        let BindEvent::Transmit(n) = client.handle(lost_at, &challenge(seq, [7; 16]), &mut out)
        else {
            panic!("the BIND is repeated with the cookie");
        };
        let (again, token, cookie) = sent_bind(&out[..n], &new);
        assert!(again > seq);
        assert_eq!((token, cookie), (NEW_TOKEN, [7; 16]));
        assert_eq!(
            client.handle(lost_at, &ack(again, 2_000, &new), &mut out),
            BindEvent::Bound { peer_present: true }
        );

        // The same Noise session goes on: no handshake, counters and replay window continue.
        let after = lost_at + secs(1);
        assert!(!alice.is_handshaking() && alice.is_confirmed());
        deliver(&mut alice, &mut bob, after, b"after the restart");
        deliver(
            &mut alice,
            &mut bob,
            after,
            b"dropped, sent again by the application",
        );
        assert!(!alice.is_handshaking() && !bob.is_handshaking());
    }
}
