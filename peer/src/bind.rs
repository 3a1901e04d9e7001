//! Binding a slot on a relay, sans-IO: BIND, CHALLENGE, BIND-ACK/REJECT, REBIND, KEEPALIVE and
//! CLOSE from the peer's side (docs/protocol.md §3, timers of §8).
//!
//! The caller owns the socket and the clock: it passes `now` in, sends what the client writes
//! into its buffer, and calls [`BindClient::on_timeout`] when [`BindClient::poll_timeout`] says.
//! What the relay sends unasked comes out of [`BindClient::handle`] too: the notice that the
//! other slot has bound ([`BindEvent::PeerPresent`]) and the CLOSE that ends the binding, with
//! its reason ([`BindEvent::Closed`]).

use std::time::{Duration, Instant};

use ferry_core::proof::{SlotKeys, SlotSecret};
use ferry_core::wire::{self, CloseReason, Packet, RejectReason, Slot, TOKEN_LEN};

/// First retransmission delay of an unanswered BIND/REBIND; it doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest delay between retransmissions.
pub const MAX_RETRY: Duration = Duration::from_secs(8);
/// A bind attempt with no answer for this long fails.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// What a received relay packet meant to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindEvent {
    /// Send the first `n` bytes of the output buffer to the relay.
    Transmit(usize),
    /// The slot is bound (or re-bound); `peer_present` says whether the other slot is too.
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

    /// Records that DATA arrived from the other peer: its slot is bound.
    pub fn note_data_received(&mut self) {
        self.peer_present = true;
    }

    /// Whether the other slot is known to be bound: a BIND-ACK or a peer-present notice said
    /// so, or DATA arrived from it.
    pub fn peer_present(&self) -> bool {
        self.peer_present
    }

    /// Starts binding: writes a BIND into `out`.
    pub fn start(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, wire::WireError> {
        self.begin(now, false);
        self.write_request(now, out)
    }

    /// Moves the binding to a new local address after a NAT change: writes a REBIND.
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
        Ok(n)
    }

    fn begin(&mut self, now: Instant, rebinding: bool) {
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
        match packet {
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
                self.acked_seq = Some(self.pending_seq);
                self.peer_present = ack.peer_present();
                self.idle_timeout = Duration::from_secs(u64::from(ack.idle_timeout_secs().max(3)));
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
                BindEvent::Closed {
                    reason: close.reason(),
                }
            }
            Packet::Keepalive(ka) if ka.session_id() == self.session_id => BindEvent::KeepaliveEcho,
            _ => BindEvent::Ignored,
        }
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

    /// When [`on_timeout`](Self::on_timeout) should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            BindState::Binding => self.retry_at,
            BindState::Bound => self.last_sent.map(|t| t + self.keepalive_interval()),
            _ => None,
        }
    }

    /// How often a bound client with nothing to send sends KEEPALIVE (§8: idle timeout ÷ 3).
    pub fn keepalive_interval(&self) -> Duration {
        self.idle_timeout / 3
    }

    /// Retransmits an unanswered request, gives up after [`BIND_TIMEOUT`], or sends a
    /// KEEPALIVE when bound and idle. Returns the bytes to send, if any.
    pub fn on_timeout(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        let due = self.poll_timeout().is_some_and(|t| now >= t);
        if !due {
            return None;
        }
        match self.state {
            BindState::Binding => {
                if self
                    .started
                    .is_some_and(|s| now.duration_since(s) >= BIND_TIMEOUT)
                {
                    self.state = BindState::Failed;
                    self.retry_at = None;
                    return None;
                }
                self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
                self.write_request(now, out).ok()
            }
            BindState::Bound => {
                self.last_sent = Some(now);
                wire::encode_keepalive(out, self.session_id).ok()
            }
            _ => None,
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
        let fields = wire::BindAckFields {
            slot: Slot::A,
            peer_present,
            idle_timeout_secs: 30,
            bind_seq: FIRST_SEQ,
            expires_at: 1_000,
        };
        let relay = SlotKeys::derive(&secret).relay;
        let mut ack = [0u8; wire::MAX_DATAGRAM];
        let n = wire::encode_bind_ack(&mut ack, SESSION, &fields, |m| relay.mac(m))
            .expect("BIND-ACK fits");
        assert_eq!(
            client.handle(t0, &ack[..n], &mut out),
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

    fn notice(bind_seq: u64, peer_present: bool, relay_key: &SlotSecret) -> Vec<u8> {
        let fields = wire::BindAckFields {
            slot: Slot::A,
            peer_present,
            idle_timeout_secs: 30,
            bind_seq,
            expires_at: 1_000,
        };
        from_relay(
            |b, mac| wire::encode_bind_ack(b, SESSION, &fields, mac),
            relay_key,
        )
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
        client.note_data_received();
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
}
