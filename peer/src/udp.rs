//! A blocking peer over a real UDP socket: [`BindClient`] and [`Channel`] driven by
//! `std::net::UdpSocket` with deadlines. For the CLI, integration tests and simple tools; an
//! event-loop application drives the sans-IO types itself.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::NoiseError;
use ferry_core::proof::SlotSecret;
use ferry_core::wire::{self, CloseReason, MAX_DATAGRAM, Packet, TOKEN_LEN};

use crate::bind::{BindClient, BindEvent, BindState, RenewError};
use crate::channel::{Channel, ChannelError};

/// What went wrong driving a peer over UDP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UdpPeerError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// Nothing useful arrived before the deadline.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The relay refused the bind with an authenticated REJECT.
    #[error("the relay rejected the bind: {0}")]
    Rejected(&'static str),
    /// The session was closed: by us, or by the other peer (a relay CLOSE `PEER_CLOSED`).
    #[error("the session was closed")]
    Closed,
    /// The relay unbound our slot and said why with a CLOSE (`EXPIRED` or `IDLE`); the session
    /// can go on after [`UdpPeer::recover`] with a fresh token.
    #[error("the relay unbound the slot: {0:?}")]
    Unbound(CloseReason),
    /// KEEPALIVEs went unanswered (`BindEvent::Lost`): the relay no longer holds the binding;
    /// the session can go on after [`UdpPeer::recover`] with a fresh token.
    #[error("the binding to the relay is lost")]
    Lost,
    /// The end-to-end channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A packet could not be written.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// A renewal could not start (the slot is not bound).
    #[error(transparent)]
    Renew(#[from] RenewError),
}

/// A peer bound (or binding) to one slot on one relay, over one UDP socket.
#[derive(Debug)]
pub struct UdpPeer {
    socket: UdpSocket,
    relay: SocketAddr,
    bind: BindClient,
    channel: Channel,
    known: KnownPeers,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    /// Messages that arrived while waiting for something else.
    inbox: VecDeque<Vec<u8>>,
}

impl UdpPeer {
    /// A peer that talks to `relay` from `socket`.
    pub fn new(
        socket: UdpSocket,
        relay: SocketAddr,
        bind: BindClient,
        channel: Channel,
        known: KnownPeers,
    ) -> Self {
        Self {
            socket,
            relay,
            bind,
            channel,
            known,
            out: vec![0; MAX_DATAGRAM],
            inbuf: vec![0; MAX_DATAGRAM + 1],
            inbox: VecDeque::new(),
        }
    }

    /// The local socket.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The known-peers store (updated by trust on first use; the caller saves it).
    pub fn known_peers(&self) -> &KnownPeers {
        &self.known
    }

    /// The end-to-end channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The bind client (its expiry, whether renewal is due).
    pub fn bind_client(&self) -> &BindClient {
        &self.bind
    }

    /// Replaces the bind client, e.g. to bind with a fresh token.
    pub fn replace_bind_client(&mut self, bind: BindClient) {
        self.bind = bind;
    }

    /// Replaces the socket, e.g. after the local address changed; then call
    /// [`bind`](Self::bind), which sends a REBIND.
    pub fn set_socket(&mut self, socket: UdpSocket) {
        self.socket = socket;
    }

    fn send_out(&mut self, n: usize) -> io::Result<()> {
        self.socket.send_to(&self.out[..n], self.relay)?;
        Ok(())
    }

    /// Sends a DATA datagram from `out` and tells the bind client, which schedules keepalives.
    fn send_data(&mut self, n: usize) -> io::Result<()> {
        self.send_out(n)?;
        self.bind.note_data_sent(Instant::now());
        Ok(())
    }

    /// Receives one datagram from the relay before `deadline`; `None` at the deadline.
    fn recv(&mut self, deadline: Instant) -> Result<Option<usize>, UdpPeerError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv_from(&mut self.inbuf) {
                // Only the relay speaks to us; anything else is ignored.
                Ok((n, from)) if from == self.relay => return Ok(Some(n)),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Binds the slot (BIND, or REBIND when already bound), retransmitting as the bind client
    /// says, until the relay acknowledges or `timeout` passes. Returns whether the other peer
    /// was bound at that moment.
    pub fn bind(&mut self, timeout: Duration) -> Result<bool, UdpPeerError> {
        let deadline = Instant::now() + timeout;
        let n = match self.bind.state() {
            BindState::Bound => self.bind.rebind(Instant::now(), &mut self.out)?,
            _ => self.bind.start(Instant::now(), &mut self.out)?,
        };
        self.send_out(n)?;
        loop {
            let wake = self
                .bind
                .poll_timeout()
                .map_or(deadline, |t| t.min(deadline));
            let Some(len) = self.recv(wake)? else {
                if Instant::now() >= deadline || self.bind.state() == BindState::Failed {
                    return Err(UdpPeerError::Timeout("BIND-ACK"));
                }
                if let Some(n) = self.bind.on_timeout(Instant::now(), &mut self.out) {
                    self.send_out(n)?;
                }
                continue;
            };
            let event = self
                .bind
                .handle(Instant::now(), &self.inbuf[..len], &mut self.out);
            match event {
                BindEvent::Transmit(n) => self.send_out(n)?,
                BindEvent::Bound { peer_present } => return Ok(peer_present),
                BindEvent::Rejected {
                    reason,
                    authenticated: true,
                } => return Err(UdpPeerError::Rejected(reason.name())),
                BindEvent::Closed { reason } => return Err(closed(reason)),
                _ => {}
            }
        }
    }

    /// Renews the bound slot with a fresh `token` and slot `secret` for it (from the gateway's
    /// `POST /v1/sessions/renew`): sends a BIND with them from the bound address and
    /// retransmits it until the relay acknowledges or `timeout` passes. DATA that arrives
    /// meanwhile goes through the channel to the inbox, as in
    /// [`recv_message`](Self::recv_message). Returns whether the other peer is bound. On an
    /// error other than [`UdpPeerError::Closed`], the old binding stands until its token's
    /// expiry.
    pub fn renew(
        &mut self,
        token: [u8; TOKEN_LEN],
        secret: &SlotSecret,
        timeout: Duration,
    ) -> Result<bool, UdpPeerError> {
        let deadline = Instant::now() + timeout;
        let n = self
            .bind
            .renew(Instant::now(), token, secret, &mut self.out)?;
        self.send_out(n)?;
        self.await_bound(deadline, "the renewal's BIND-ACK", BindClient::renewing)
    }

    /// Binds the slot again after the binding is gone ([`UdpPeerError::Lost`], or
    /// [`UdpPeerError::Unbound`]) with a fresh `token` and slot `secret` for it (from the
    /// gateway's `POST /v1/sessions/renew`): a first BIND from this socket, retransmitted until
    /// the relay acknowledges or `timeout` passes (docs/protocol.md §3.1, *Recovery*). The
    /// channel keeps its Noise session; DATA that arrives meanwhile goes through it to the inbox.
    /// What was sent while the binding was gone is lost: resending it is the application's
    /// business. Returns whether the other peer is bound.
    pub fn recover(
        &mut self,
        token: [u8; TOKEN_LEN],
        secret: &SlotSecret,
        timeout: Duration,
    ) -> Result<bool, UdpPeerError> {
        let deadline = Instant::now() + timeout;
        let n = self
            .bind
            .recover(Instant::now(), token, secret, &mut self.out)?;
        self.send_out(n)?;
        self.await_bound(deadline, "the BIND-ACK", |b| {
            b.state() == BindState::Binding
        })
    }

    /// Waits for the BIND-ACK of the request in flight, running both clients' timers and
    /// passing DATA to the channel meanwhile, while `trying` holds and until `deadline`.
    fn await_bound(
        &mut self,
        deadline: Instant,
        what: &'static str,
        trying: fn(&BindClient) -> bool,
    ) -> Result<bool, UdpPeerError> {
        loop {
            let wake = [self.bind.poll_timeout(), self.channel.poll_timeout()]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            let Some(len) = self.recv(wake)? else {
                let now = Instant::now();
                if now >= deadline || !trying(&self.bind) {
                    return Err(UdpPeerError::Timeout(what));
                }
                self.run_bind_timers(now)?;
                if let Some(n) = self.channel.on_timeout(now, &mut self.out)? {
                    self.send_data(n)?;
                }
                continue;
            };
            if let Ok(Packet::Data(_)) = wire::parse(&self.inbuf[..len]) {
                self.bind.note_data_received(Instant::now());
                self.on_data(len, false)?;
                continue;
            }
            match self
                .bind
                .handle(Instant::now(), &self.inbuf[..len], &mut self.out)
            {
                BindEvent::Transmit(n) => self.send_out(n)?,
                BindEvent::Bound { peer_present } => return Ok(peer_present),
                BindEvent::Rejected {
                    reason,
                    authenticated: true,
                } => return Err(UdpPeerError::Rejected(reason.name())),
                BindEvent::Closed { reason } => return Err(closed(reason)),
                _ => {}
            }
        }
    }

    /// Runs the bind client's timers: sends a retransmission or KEEPALIVE that is due, and
    /// reports a lost binding.
    fn run_bind_timers(&mut self, now: Instant) -> Result<(), UdpPeerError> {
        match self.bind.on_timer(now, &mut self.out) {
            BindEvent::Transmit(n) => self.send_out(n)?,
            BindEvent::Lost => return Err(UdpPeerError::Lost),
            _ => {}
        }
        Ok(())
    }

    /// Runs the end-to-end handshake on the channel's own timers (docs/protocol.md §9.1.1): the
    /// initiator sends HANDSHAKE-1 and the channel resends a fresh one on its back-off until
    /// answered (the other peer may bind later), then waits for the responder's confirmation;
    /// the responder answers what arrives until it has a transport. Gives up at `timeout`, or at
    /// once if the other peer presents the wrong identity. On an established initiator this is a
    /// re-handshake; the responder needs no call for one, since
    /// [`recv_message`](Self::recv_message) answers it.
    pub fn handshake(&mut self, timeout: Duration) -> Result<(), UdpPeerError> {
        let deadline = Instant::now() + timeout;
        if self.channel.is_initiator() {
            let n = self.channel.start(Instant::now(), &mut self.out)?;
            self.send_data(n)?;
        }
        let done = |channel: &Channel| match channel.is_initiator() {
            true => channel.is_confirmed(),
            false => channel.is_established(),
        };
        while !done(&self.channel) {
            if Instant::now() >= deadline {
                return Err(UdpPeerError::Timeout("the handshake"));
            }
            self.step(deadline, true)?;
        }
        Ok(())
    }

    /// Waits for one datagram until the channel's or the bind client's next timer or
    /// `deadline` and handles it, or runs the timers (the channel's, and the bind client's
    /// KEEPALIVEs); sends what they write. Plaintexts go to the inbox. With `identity_fatal`, a
    /// handshake refused for the wrong identity is an error; otherwise it is dropped like any
    /// forged message (the channel keeps its transport). A relay CLOSE, or KEEPALIVEs that go
    /// unanswered, end the binding with an error.
    fn step(&mut self, deadline: Instant, identity_fatal: bool) -> Result<(), UdpPeerError> {
        let wake = [self.bind.poll_timeout(), self.channel.poll_timeout()]
            .into_iter()
            .flatten()
            .fold(deadline, Instant::min);
        let Some(len) = self.recv(wake)? else {
            let now = Instant::now();
            self.run_bind_timers(now)?;
            if let Some(n) = self.channel.on_timeout(now, &mut self.out)? {
                self.send_data(n)?;
            }
            return Ok(());
        };
        if let Ok(Packet::Data(_)) = wire::parse(&self.inbuf[..len]) {
            self.bind.note_data_received(Instant::now());
            return self.on_data(len, identity_fatal);
        }
        match self
            .bind
            .handle(Instant::now(), &self.inbuf[..len], &mut self.out)
        {
            BindEvent::Transmit(n) => self.send_out(n)?,
            BindEvent::Closed { reason } => return Err(closed(reason)),
            _ => {}
        }
        Ok(())
    }

    /// Passes the DATA datagram of `len` bytes in the input buffer to the channel; sends what it
    /// answers and puts a plaintext in the inbox.
    fn on_data(&mut self, len: usize, identity_fatal: bool) -> Result<(), UdpPeerError> {
        match self.channel.handle(
            Instant::now(),
            &mut self.inbuf[..len],
            &mut self.known,
            &mut self.out,
        ) {
            Ok(output) => {
                if let Some(n) = output.transmit {
                    self.send_data(n)?;
                }
                if let Some(range) = output.plaintext {
                    self.inbox.push_back(self.inbuf[range].to_vec());
                }
            }
            // A stale, forged or duplicate message is dropped; a wrong identity is reported.
            Err(e @ ChannelError::Noise(NoiseError::WrongIdentity)) if identity_fatal => {
                return Err(e.into());
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// Encrypts `plaintext` and sends it through the relay.
    pub fn send(&mut self, plaintext: &[u8]) -> Result<(), UdpPeerError> {
        let n = self
            .channel
            .send(Instant::now(), plaintext, &mut self.out)?;
        self.send_data(n)?;
        Ok(())
    }

    /// Waits for the next message from the other peer and returns its plaintext, running the
    /// channel's timers meanwhile (a confirmation, a re-handshake). Keepalive echoes, stale
    /// frames and confirmations are skipped.
    pub fn recv_message(&mut self, timeout: Duration) -> Result<Vec<u8>, UdpPeerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.inbox.pop_front() {
                return Ok(message);
            }
            if Instant::now() >= deadline {
                return Err(UdpPeerError::Timeout("a message"));
            }
            self.step(deadline, false)?;
        }
    }

    /// Sends a KEEPALIVE and waits for the relay's echo; returns whether it came back.
    pub fn keepalive(&mut self, timeout: Duration) -> Result<bool, UdpPeerError> {
        let n = wire::encode_keepalive(&mut self.out, self.bind.session_id())?;
        self.send_out(n)?;
        let deadline = Instant::now() + timeout;
        while let Some(len) = self.recv(deadline)? {
            if self
                .bind
                .handle(Instant::now(), &self.inbuf[..len], &mut self.out)
                == BindEvent::KeepaliveEcho
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Closes the session at the relay.
    pub fn close(&mut self) -> Result<(), UdpPeerError> {
        let n = self.bind.close(&mut self.out)?;
        self.send_out(n)?;
        Ok(())
    }
}

/// The error for a relay CLOSE with `reason`.
fn closed(reason: CloseReason) -> UdpPeerError {
    match reason {
        CloseReason::PeerClosed => UdpPeerError::Closed,
        other => UdpPeerError::Unbound(other),
    }
}
