//! The task behind a [`Session`](super::Session): owns the socket, the bind client and the
//! channel, and turns socket reads, application messages, commands, gateway answers and timers
//! into calls of the sans-IO types.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{NoiseError, PeerExpectation};
use ferry_core::time::UnixTime;
use ferry_core::wire::{self, CloseReason, MAX_DATAGRAM, Packet, RejectReason, Slot};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::{Command, Renewer, SessionConfig, SessionError, Shared, add};
use crate::bind::{BindClient, BindEvent, BindState};
use crate::channel::{Channel, ChannelError};
use crate::gateway::{GatewayError, Grant};
use crate::udp_batch::{BatchSocket, RecvBatch};

/// The first wait before a failed gateway request for a renewal or recovery is repeated; it
/// doubles up to [`GATEWAY_RETRY_MAX`].
const GATEWAY_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between gateway requests.
const GATEWAY_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a fresh socket is tried while the local address is gone.
const REBIND_RETRY: Duration = Duration::from_secs(1);
/// How long the REBIND tried after unanswered KEEPALIVEs may go unanswered before the binding
/// is taken as lost and recovered: long enough for the REBIND's first two retransmissions. A
/// relay that restarted does not know the session, and its XDP guard drops a REBIND for it
/// without an answer, so waiting out the whole bind timeout would stall every transfer.
const UNANSWERED_REBIND_WAIT: Duration = Duration::from_secs(3);
/// The most application messages sent in one go before the driver looks at its other inputs.
const BATCH: usize = 64;
/// The most receive system calls in one go before the driver looks at its other inputs; each
/// takes up to [`RECV_BUFFERS`] datagrams or GRO runs of them.
const RECV_ROUNDS: usize = 4;
/// Receive buffers per system call.
const RECV_BUFFERS: usize = 16;
/// The socket buffer sizes asked for (the kernel may cap them).
const SOCKET_BUFFER: usize = 4 << 20;
/// The most DATA datagrams one batched send carries.
const MAX_RUN_DATAGRAMS: usize = 64;
/// The most bytes one batched send carries (an offloaded send is one IP packet's worth).
const MAX_RUN_BYTES: usize = 64_000;
/// How many copies of a CLOSE go out (nothing acknowledges one, docs/protocol.md §3.8).
const CLOSE_COPIES: usize = 2;

/// The channels between the driver and the [`Session`](super::Session) handle.
pub(super) struct Queues {
    /// Decrypted messages for the application.
    pub(super) to_app: mpsc::Sender<Vec<u8>>,
    /// Messages the application sends.
    pub(super) from_app: mpsc::Receiver<Vec<u8>>,
    /// Rebind and close.
    pub(super) commands: mpsc::Receiver<Command>,
}

/// A lost binding being recovered.
struct Recovery {
    /// When it was found lost.
    since: Instant,
    /// Why, for the end reason if it cannot be recovered.
    why: String,
    /// When to ask the gateway next (if no request is in flight).
    next_try: Instant,
    /// The wait after the next failure.
    backoff: Duration,
    /// Whether the BIND with a fresh token is in flight.
    binding: bool,
}

/// The session's driver.
pub(super) struct Driver {
    socket: BatchSocket,
    relay: SocketAddr,
    bind: BindClient,
    channel: Channel,
    known: KnownPeers,
    session_id: u64,
    slot: Slot,
    renewer: Option<Arc<dyn Renewer>>,
    recovery_timeout: Duration,
    queues: Queues,
    shared: Arc<Shared>,
    /// Answers of the gateway requests spawned by the driver.
    grants_tx: mpsc::Sender<Result<Grant, GatewayError>>,
    grants_rx: mpsc::Receiver<Result<Grant, GatewayError>>,
    /// Whether a gateway request is in flight.
    gateway_busy: bool,
    /// No renewal request before this (back-off after a failure).
    renew_not_before: Instant,
    renew_backoff: Duration,
    recovery: Option<Recovery>,
    /// Whether the REBIND in flight is ours to count.
    rebinding: bool,
    /// When the REBIND sent after unanswered KEEPALIVEs is given up for recovery.
    rebind_gives_up: Option<Instant>,
    /// When to try a fresh socket (the local address went away).
    rebind_at: Option<Instant>,
    /// The monotonic and wall clock at one moment, to tell the wall time from the monotonic
    /// clock (so tokio's paused clock drives renewal too).
    epoch: (Instant, u64),
    /// Whether [`connect`](Self::connect) is still running: some failures are errors then.
    connecting: bool,
    /// The last unauthenticated REJECT of the bind in flight, for the error if it times out.
    hint: Option<RejectReason>,
    /// The error that ends [`connect`](Self::connect).
    failure: Option<SessionError>,
    out: Vec<u8>,
    /// The receive buffers (taken out while their datagrams are handled).
    rx: RecvBatch,
    /// Encrypted DATA waiting to go out in one batched send.
    tx: DataRun,
}

/// A run of encrypted DATA datagrams for one batched send: all of one size but the last, which
/// may be shorter (what UDP segmentation offload takes).
#[derive(Debug, Default)]
struct DataRun {
    bytes: Vec<u8>,
    /// The size of every datagram in the run but the last.
    segment: usize,
    datagrams: u64,
    /// The application bytes the run carries.
    payload: u64,
    /// The last datagram is shorter than `segment`: the run takes no more.
    closed: bool,
}

impl DataRun {
    /// Whether a datagram of `len` bytes may join the run.
    fn takes(&self, len: usize, max_datagrams: usize) -> bool {
        self.datagrams == 0
            || (!self.closed
                && len <= self.segment
                && (self.datagrams as usize) < max_datagrams
                && self.bytes.len() + len <= MAX_RUN_BYTES)
    }

    /// Adds a datagram, which [`takes`](Self::takes) accepted, carrying `payload` bytes.
    fn push(&mut self, datagram: &[u8], payload: usize) {
        if self.datagrams == 0 {
            self.segment = datagram.len();
        } else if datagram.len() < self.segment {
            self.closed = true;
        }
        self.bytes.extend_from_slice(datagram);
        self.datagrams += 1;
        self.payload += payload as u64;
    }

    /// Empties the run for the next.
    fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams = 0;
        self.payload = 0;
        self.closed = false;
    }
}

/// The driver's clock: tokio's, so that a paused test clock drives it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Whether a send failed because the local address is gone, so a fresh socket may help.
fn address_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
    )
}

/// A fresh UDP socket on an ephemeral port of the relay's address family, with large buffers
/// and batched I/O.
fn open_socket(relay: SocketAddr) -> io::Result<BatchSocket> {
    let local: SocketAddr = match relay {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Larger buffers absorb bursts; the kernel caps them at its maximum, which is fine.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    BatchSocket::new(UdpSocket::from_std(socket.into())?)
}

impl Driver {
    pub(super) fn new(
        config: &SessionConfig,
        expect: PeerExpectation,
        known: KnownPeers,
        relay: SocketAddr,
        queues: Queues,
        shared: Arc<Shared>,
    ) -> Result<Self, SessionError> {
        let grant = &config.grant;
        let channel = match grant.slot {
            Slot::A => {
                Channel::initiator(&config.identity, expect, grant.session_id, config.limits)?
            }
            Slot::B => {
                Channel::responder(&config.identity, expect, grant.session_id, config.limits)?
            }
        };
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let bind = BindClient::new(
            grant.session_id,
            grant.slot,
            *grant.token,
            &grant.slot_secret,
            wall.as_micros() as u64,
        );
        let (grants_tx, grants_rx) = mpsc::channel(2);
        let start = now();
        Ok(Self {
            socket: open_socket(relay)?,
            relay,
            bind,
            channel,
            known,
            session_id: grant.session_id,
            slot: grant.slot,
            renewer: config.renewer.clone(),
            recovery_timeout: config.timeouts.recovery,
            queues,
            shared,
            grants_tx,
            grants_rx,
            gateway_busy: false,
            renew_not_before: start,
            renew_backoff: GATEWAY_RETRY,
            recovery: None,
            rebinding: false,
            rebind_gives_up: None,
            rebind_at: None,
            epoch: (start, wall.as_secs()),
            connecting: true,
            hint: None,
            failure: None,
            out: vec![0; MAX_DATAGRAM],
            rx: RecvBatch::new(RECV_BUFFERS),
            tx: DataRun::default(),
        })
    }

    pub(super) fn remote_identity(&self) -> Option<[u8; 32]> {
        self.channel.remote_identity()
    }

    pub(super) fn known_peers(&self) -> &KnownPeers {
        &self.known
    }

    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.socket().local_addr()
    }

    /// The wall clock at monotonic `at`.
    fn wall(&self, at: Instant) -> UnixTime {
        UnixTime(self.epoch.1 + at.saturating_duration_since(self.epoch.0).as_secs())
    }

    /// Whether the handshake is done as far as [`connect`](Self::connect) needs: the
    /// initiator's keys are confirmed, the responder has a transport.
    fn connected(&self) -> bool {
        if self.channel.is_initiator() {
            self.channel.is_confirmed()
        } else {
            self.channel.is_established()
        }
    }

    /// Binds and runs the handshake until [`connected`](Self::connected), a failure, or
    /// `deadline` (`timeout` after the start, for the error).
    pub(super) async fn connect(
        &mut self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let n = self
            .bind
            .start(now(), &mut self.out)
            .map_err(io::Error::other)?;
        self.send_raw(n).await;
        while !self.connected() {
            if let Some(error) = self.failure.take() {
                return Err(error);
            }
            if self.shared.end.get().is_some() {
                return Err(SessionError::Closed(self.shared.end_reason()));
            }
            if tokio::time::Instant::now() >= deadline {
                if let Some(reason) = self.hint.filter(|_| self.bind.state() != BindState::Bound) {
                    return Err(SessionError::RefusedUnauthenticated {
                        reason: reason.name(),
                        after: timeout,
                    });
                }
                let what = match self.bind.state() {
                    BindState::Bound if self.bind.peer_present() => "the handshake",
                    BindState::Bound => "the other peer",
                    _ => "the relay's BIND-ACK",
                };
                return Err(SessionError::Timeout {
                    what,
                    after: timeout,
                });
            }
            self.step(Some(deadline)).await;
        }
        self.connecting = false;
        Ok(())
    }

    /// Runs until the session ends, then records why (the [`Session`](super::Session) handle
    /// sees its queues close).
    pub(super) async fn run(mut self) {
        while self.shared.end.get().is_none() {
            self.step(None).await;
        }
    }

    /// Ends the session with `reason` (the first reason wins).
    fn end(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.connecting && self.failure.is_none() {
            self.failure = Some(SessionError::Closed(reason.clone()));
        }
        let _ = self.shared.end.set(reason);
    }

    /// When the driver must next look at its timers.
    fn next_wake(&self) -> Option<Instant> {
        let renew = self
            .renewer
            .as_ref()
            .filter(|_| !self.gateway_busy && self.recovery.is_none())
            .and_then(|_| {
                let n = now();
                self.bind.renew_at(n, self.wall(n))
            })
            .map(|t| t.max(self.renew_not_before));
        let recovery = self
            .recovery
            .as_ref()
            .filter(|r| !r.binding && !self.gateway_busy)
            .map(|r| r.next_try);
        let recovery_end = self
            .recovery
            .as_ref()
            .map(|r| r.since + self.recovery_timeout);
        [
            self.bind.poll_timeout(),
            self.channel.poll_timeout(),
            renew,
            recovery,
            recovery_end,
            self.rebind_at,
            self.rebind_gives_up.filter(|_| self.rebinding),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Waits for one input (or the next timer, or `deadline`) and handles it.
    async fn step(&mut self, deadline: Option<tokio::time::Instant>) {
        let wake = self
            .next_wake()
            .map(tokio::time::Instant::from_std)
            .into_iter()
            .chain(deadline)
            .min();
        let accept_app = !self.connecting;
        enum Input {
            Readable(io::Result<()>),
            Command(Option<Command>),
            App(Option<Vec<u8>>),
            Grant(Option<Box<Result<Grant, GatewayError>>>),
            Timer,
        }
        let input = tokio::select! {
            r = self.socket.socket().readable() => Input::Readable(r),
            c = self.queues.commands.recv() => Input::Command(c),
            m = self.queues.from_app.recv(), if accept_app => Input::App(m),
            g = self.grants_rx.recv() => Input::Grant(g.map(Box::new)),
            () = sleep_until(wake) => Input::Timer,
        };
        match input {
            Input::Readable(Ok(())) => self.read_datagrams().await,
            Input::Readable(Err(_)) => {}
            Input::Command(Some(Command::Rebind)) => self.rebind_now().await,
            Input::Command(Some(Command::Close(done))) => {
                self.send_what_the_app_queued().await;
                self.close().await;
                let _ = done.send(());
            }
            // The Session handle is gone: close as it would have.
            Input::Command(None) => {
                self.send_what_the_app_queued().await;
                self.close().await;
            }
            Input::App(Some(message)) => {
                self.queue_message(&message).await;
                for _ in 1..BATCH {
                    match self.queues.from_app.try_recv() {
                        Ok(message) => self.queue_message(&message).await,
                        Err(_) => break,
                    }
                }
                self.flush_data().await;
            }
            Input::App(None) => self.close().await,
            Input::Grant(Some(answer)) => self.on_grant(*answer).await,
            Input::Grant(None) | Input::Timer => {}
        }
        if self.shared.end.get().is_none() {
            self.on_timers().await;
        }
    }

    /// Reads what the socket holds, a few system calls' worth, and handles the relay's
    /// datagrams. An error (an ICMP error from an earlier send, the relay's port closed during
    /// a restart) ends the round: the keepalive timers find out what it means.
    async fn read_datagrams(&mut self) {
        let mut rx = std::mem::take(&mut self.rx);
        for _ in 0..RECV_ROUNDS {
            if self.socket.try_recv(&mut rx).is_err() {
                break;
            }
            for (from, datagram) in rx.datagrams() {
                if from == self.relay && datagram.len() <= MAX_DATAGRAM {
                    self.on_datagram(datagram).await;
                }
            }
        }
        self.rx = rx;
    }

    /// Sends the messages the application queued before it asked to close, so that they
    /// reach the other peer before the CLOSE does (a QUIC CONNECTION_CLOSE among them): the
    /// relay drops DATA of a session it no longer holds. (`step` picks among ready inputs at
    /// random, so a CLOSE command may be taken before messages queued ahead of it.)
    async fn send_what_the_app_queued(&mut self) {
        if self.connecting {
            return;
        }
        let mut queued = 0;
        while let Ok(message) = self.queues.from_app.try_recv() {
            self.queue_message(&message).await;
            queued += 1;
            if queued % BATCH == 0 {
                self.flush_data().await;
            }
        }
        self.flush_data().await;
    }

    /// Sends CLOSE and ends the session.
    async fn close(&mut self) {
        if let Ok(n) = self.bind.close(&mut self.out) {
            for _ in 0..CLOSE_COPIES {
                self.send_raw(n).await;
            }
        }
        self.end("closed by this peer");
    }

    /// Sends the first `n` bytes of the output buffer to the relay. A failure because the
    /// local address went away schedules a fresh socket; other failures are dropped packets.
    async fn send_raw(&mut self, n: usize) -> bool {
        match self
            .socket
            .socket()
            .send_to(&self.out[..n], self.relay)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                if address_gone(&e) && self.rebind_at.is_none() {
                    self.rebind_at = Some(now());
                }
                false
            }
        }
    }

    /// Sends DATA from the output buffer and tells the bind client.
    async fn send_data(&mut self, n: usize) -> bool {
        let sent = self.send_raw(n).await;
        if sent {
            self.bind.note_data_sent(now());
        }
        sent
    }

    /// Encrypts one application message into the run of DATA waiting to go out, sending the
    /// run first if the new datagram cannot join it.
    async fn queue_message(&mut self, message: &[u8]) {
        let n = match self.channel.send(now(), message, &mut self.out) {
            Ok(n) => n,
            Err(_) => {
                add(&self.shared.counters.dropped_outgoing, 1);
                return;
            }
        };
        if !self.tx.takes(n, MAX_RUN_DATAGRAMS) {
            self.flush_data().await;
        }
        self.tx.push(&self.out[..n], message.len());
    }

    /// Sends the run of DATA waiting to go out, in as few system calls as the kernel allows.
    async fn flush_data(&mut self) {
        if self.tx.datagrams == 0 {
            return;
        }
        let sent = self
            .socket
            .send(self.relay, &self.tx.bytes, self.tx.segment)
            .await;
        let counters = &self.shared.counters;
        match sent {
            Ok(()) => {
                self.bind.note_data_sent(now());
                add(&counters.messages_sent, self.tx.datagrams);
                add(&counters.bytes_sent, self.tx.payload);
            }
            Err(e) => {
                add(&counters.dropped_outgoing, self.tx.datagrams);
                if address_gone(&e) && self.rebind_at.is_none() {
                    self.rebind_at = Some(now());
                }
            }
        }
        self.tx.clear();
    }

    /// Handles a datagram from the relay.
    async fn on_datagram(&mut self, datagram: &mut [u8]) {
        let at = now();
        if let Ok(Packet::Data(_)) = wire::parse(datagram) {
            self.bind.note_data_received(at);
            self.on_data(at, datagram).await;
            return;
        }
        let renewing = self.bind.renewing();
        let event = self.bind.handle(at, datagram, &mut self.out);
        match event {
            BindEvent::Transmit(n) => {
                self.send_raw(n).await;
            }
            BindEvent::Bound { peer_present } => {
                if renewing && !self.bind.renewing() {
                    add(&self.shared.counters.renewals, 1);
                    self.renew_backoff = GATEWAY_RETRY;
                }
                if self.recovery.take().is_some() {
                    add(&self.shared.counters.recoveries, 1);
                }
                if std::mem::take(&mut self.rebinding) {
                    add(&self.shared.counters.rebinds, 1);
                }
                self.rebind_gives_up = None;
                if peer_present {
                    self.peer_arrived(at).await;
                }
            }
            BindEvent::PeerPresent => self.peer_arrived(at).await,
            BindEvent::Rejected {
                reason,
                authenticated,
            } => self.on_reject(at, renewing, reason, authenticated),
            BindEvent::Closed {
                reason: CloseReason::PeerClosed,
            } => self.end("the other peer closed the session"),
            BindEvent::Closed { reason } => {
                self.lost(
                    at,
                    format!("the relay unbound the slot ({})", reason.name()),
                );
            }
            BindEvent::KeepaliveEcho | BindEvent::Lost | BindEvent::Ignored => {}
        }
    }

    /// A REJECT of the request in flight.
    fn on_reject(
        &mut self,
        at: Instant,
        renewing: bool,
        reason: RejectReason,
        authenticated: bool,
    ) {
        if renewing && authenticated {
            // The old binding stands; try again later with another fresh token.
            self.renew_later(at);
            return;
        }
        if authenticated {
            // The bind client gave up this request (state Failed).
            if self.connecting {
                self.failure = Some(SessionError::Rejected(reason.name()));
                return;
            }
            self.rebinding = false;
            self.lost(
                at,
                format!("the relay refused the bind ({})", reason.name()),
            );
            if let Some(recovery) = self.recovery.as_mut() {
                recovery.binding = false;
            }
            return;
        }
        if self.connecting {
            self.hint = Some(reason);
        }
        // Unauthenticated REJECTs are hints; the bind client keeps retrying. A REBIND the relay
        // does not know means the relay lost our binding: recover rather than retry.
        if reason == RejectReason::UnknownSession && self.rebinding {
            self.rebinding = false;
            self.lost(
                at,
                "the relay no longer knows the session (UNKNOWN_SESSION)".into(),
            );
        }
    }

    /// The other peer has bound: the initiator without a channel starts its handshake now
    /// rather than at its next retransmission.
    async fn peer_arrived(&mut self, at: Instant) {
        if self.channel.is_initiator()
            && !self.channel.is_established()
            && let Ok(n) = self.channel.start(at, &mut self.out)
        {
            self.send_data(n).await;
        }
    }

    /// Passes a DATA datagram to the channel.
    async fn on_data(&mut self, at: Instant, datagram: &mut [u8]) {
        let result = self
            .channel
            .handle(at, datagram, &mut self.known, &mut self.out);
        let counters = &self.shared.counters;
        match result {
            Ok(output) => {
                if output.established {
                    add(&counters.handshakes, 1);
                }
                if let Some(range) = output.plaintext {
                    let len = range.len() as u64;
                    let message = datagram[range].to_vec();
                    if self.queues.to_app.try_send(message).is_ok() {
                        add(&counters.messages_received, 1);
                        add(&counters.bytes_received, len);
                    } else {
                        add(&counters.dropped_incoming, 1);
                    }
                }
                if let Some(n) = output.transmit {
                    self.send_data(n).await;
                }
            }
            Err(ChannelError::Noise(NoiseError::WrongIdentity)) if self.connecting => {
                self.failure = Some(SessionError::WrongIdentity);
            }
            Err(_) => add(&counters.dropped_incoming, 1),
        }
    }

    /// KEEPALIVEs went unanswered. Perhaps only the path changed (a NAT rebinding, a new
    /// local address behind the same socket) and the relay still holds the binding at the old
    /// address: try a REBIND from here first. A relay that lost the binding answers it with
    /// `UNKNOWN_SESSION`, one that stays silent lets it time out; both lead to recovery.
    async fn unanswered(&mut self, at: Instant) {
        match self.bind.rebind(at, &mut self.out) {
            Ok(n) => {
                self.rebinding = true;
                self.rebind_gives_up = Some(at + UNANSWERED_REBIND_WAIT);
                self.send_raw(n).await;
            }
            Err(_) => self.lost(at, "KEEPALIVEs went unanswered".into()),
        }
    }

    /// The binding is gone: recover it with a fresh token, or end the session when there is
    /// no renewer.
    fn lost(&mut self, at: Instant, why: String) {
        self.rebind_gives_up = None;
        if self.renewer.is_none() {
            self.end(format!(
                "{why}, and without a gateway the session cannot get a fresh token"
            ));
            return;
        }
        match self.recovery.as_mut() {
            Some(recovery) => {
                recovery.binding = false;
                recovery.why = why;
            }
            None => {
                self.recovery = Some(Recovery {
                    since: at,
                    why,
                    next_try: at,
                    backoff: GATEWAY_RETRY,
                    binding: false,
                });
            }
        }
    }

    /// Schedules the next renewal attempt after a failed one.
    fn renew_later(&mut self, at: Instant) {
        self.renew_not_before = at + self.renew_backoff;
        self.renew_backoff = (self.renew_backoff * 2).min(GATEWAY_RETRY_MAX);
    }

    /// Asks the renewer for a fresh grant, in a task of its own.
    fn request_grant(&mut self) {
        let Some(renewer) = self.renewer.clone() else {
            return;
        };
        self.gateway_busy = true;
        let answers = self.grants_tx.clone();
        let (session_id, slot) = (self.session_id, self.slot);
        tokio::spawn(async move {
            let answer = renewer.renew(session_id, slot).await;
            let _ = answers.send(answer).await;
        });
    }

    /// A fresh grant (or the failure to get one): recover the lost binding with it, or renew
    /// the bound one.
    async fn on_grant(&mut self, answer: Result<Grant, GatewayError>) {
        self.gateway_busy = false;
        let at = now();
        let grant = match answer {
            Ok(grant) if grant.session_id == self.session_id && grant.slot == self.slot => grant,
            failed => {
                add(&self.shared.counters.gateway_failures, 1);
                let detail = match failed {
                    Err(e) => e.to_string(),
                    Ok(_) => "the gateway renewed another session or slot".to_string(),
                };
                match self.recovery.as_mut() {
                    Some(recovery) => {
                        recovery.next_try = at + recovery.backoff;
                        recovery.backoff = (recovery.backoff * 2).min(GATEWAY_RETRY_MAX);
                        recovery.why = format!("{}; the gateway: {detail}", recovery.why);
                    }
                    None => self.renew_later(at),
                }
                return;
            }
        };
        if let Some(recovery) = self.recovery.as_mut() {
            recovery.binding = true;
            match self
                .bind
                .recover(at, *grant.token, &grant.slot_secret, &mut self.out)
            {
                Ok(n) => {
                    self.send_raw(n).await;
                }
                Err(_) => recovery.binding = false,
            }
            return;
        }
        if self.bind.state() == BindState::Bound {
            match self
                .bind
                .renew(at, *grant.token, &grant.slot_secret, &mut self.out)
            {
                Ok(n) => {
                    self.send_raw(n).await;
                }
                Err(_) => self.renew_later(at),
            }
        } else {
            // Moving to a new address: renew once the REBIND is through.
            self.renew_later(at);
        }
    }

    /// Moves to a fresh socket and sends a REBIND from it (or lets the BIND in flight go on
    /// from it). While no socket can be opened or the send fails, retries every
    /// [`REBIND_RETRY`].
    async fn rebind_now(&mut self) {
        let at = now();
        self.rebind_at = None;
        match open_socket(self.relay) {
            Ok(socket) => self.socket = socket,
            Err(_) => {
                self.rebind_at = Some(at + REBIND_RETRY);
                return;
            }
        }
        let holds = self.bind.state() == BindState::Bound
            || (self.bind.state() == BindState::Binding && self.rebinding);
        let n = if holds {
            match self.bind.rebind(at, &mut self.out) {
                Ok(n) => n,
                Err(_) => return,
            }
        } else {
            // Binding from scratch, or lost: the bind client's retransmissions (or the
            // recovery's BIND) go out from the new socket.
            return;
        };
        self.rebinding = true;
        if !self.send_raw(n).await && self.rebind_at.is_some() {
            self.rebind_at = Some(at + REBIND_RETRY);
        }
    }

    /// Runs every timer that is due.
    async fn on_timers(&mut self) {
        let at = now();
        // The bind client: retransmissions, KEEPALIVEs (several may be due), a lost binding.
        for _ in 0..4 {
            match self.bind.on_timer(at, &mut self.out) {
                BindEvent::Transmit(n) => {
                    self.send_raw(n).await;
                }
                BindEvent::Lost => {
                    self.unanswered(at).await;
                    break;
                }
                _ => break,
            }
        }
        if self.rebinding && self.rebind_gives_up.is_some_and(|t| t <= at) {
            self.rebinding = false;
            self.lost(
                at,
                format!(
                    "KEEPALIVEs and a REBIND went unanswered for {UNANSWERED_REBIND_WAIT:?} \
                     (the relay restarted, or the path is gone)"
                ),
            );
        }
        if self.bind.state() == BindState::Failed {
            if self.connecting {
                if self.failure.is_none() {
                    self.failure = Some(match self.hint {
                        Some(reason) => SessionError::RefusedUnauthenticated {
                            reason: reason.name(),
                            after: crate::bind::BIND_TIMEOUT,
                        },
                        None => SessionError::Timeout {
                            what: "the relay's BIND-ACK",
                            after: crate::bind::BIND_TIMEOUT,
                        },
                    });
                }
                return;
            }
            let recovering = self.recovery.as_ref().is_some_and(|r| r.binding);
            if recovering || self.rebinding || self.recovery.is_none() {
                self.rebinding = false;
                self.lost(at, "the relay did not answer the bind".into());
            }
        }
        if let Ok(Some(n)) = self.channel.on_timeout(at, &mut self.out) {
            self.send_data(n).await;
        }
        if self.rebind_at.is_some_and(|t| t <= at) {
            self.rebind_now().await;
        }
        if let Some(recovery) = &self.recovery {
            if at >= recovery.since + self.recovery_timeout {
                let reason = format!(
                    "the binding could not be recovered within {:?}: {}",
                    self.recovery_timeout, recovery.why
                );
                self.end(reason);
                return;
            }
            if !recovery.binding && !self.gateway_busy && at >= recovery.next_try {
                self.request_grant();
            }
            return;
        }
        if self.renewer.is_some()
            && !self.gateway_busy
            && at >= self.renew_not_before
            && self.bind.renew_due(at, self.wall(at))
        {
            self.request_grant();
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;

    #[test]
    fn a_run_takes_equal_datagrams_then_one_shorter_and_nothing_after() {
        let mut run = DataRun::default();
        assert!(run.takes(1400, 4), "an empty run takes any size");
        run.push(&[1; 1400], 1300);
        assert!(run.takes(1400, 4));
        assert!(
            !run.takes(1401, 4),
            "a longer datagram would break the segment size"
        );
        run.push(&[2; 1400], 1300);
        assert!(run.takes(100, 4));
        run.push(&[3; 100], 50);
        assert!(
            !run.takes(100, 4),
            "after a shorter datagram the run is closed"
        );
        assert!(!run.takes(1400, 4));
        assert_eq!((run.segment, run.datagrams, run.payload), (1400, 3, 2650));
        assert_eq!(run.bytes.len(), 2900);
        run.clear();
        assert!(run.takes(1401, 4));
        run.push(&[4; 700], 600);
        assert_eq!((run.segment, run.datagrams, run.bytes.len()), (700, 1, 700));
    }

    #[test]
    fn a_run_stops_at_its_datagram_and_byte_limits() {
        let mut run = DataRun::default();
        for _ in 0..3 {
            run.push(&[0; 10], 1);
        }
        assert!(!run.takes(10, 3), "three of three datagrams");
        assert!(run.takes(10, 4));
        let mut big = DataRun::default();
        while big.bytes.len() + 1400 <= MAX_RUN_BYTES {
            big.push(&[0; 1400], 1);
        }
        assert!(
            !big.takes(1400, usize::MAX),
            "the run's bytes would pass the limit"
        );
    }
}
