//! An async peer session on tokio: one slot of one relay session, bound, through its Noise
//! handshake, and kept alive by a background task until either side closes it.
//!
//! [`Session::connect`] binds the grant's slot on the relay, waits for the other peer (the
//! relay's peer-present notice, or its handshake messages), runs the end-to-end handshake (slot
//! A initiates, slot B answers) and returns once the channel is up. From then on a driver task
//! owns the UDP socket, the [`BindClient`](crate::bind::BindClient) and the
//! [`Channel`](crate::channel::Channel) and runs all their timers:
//!
//! - KEEPALIVEs, bind retransmissions, the channel's handshake retransmissions and its
//!   re-handshake before the transport's maximum age;
//! - **renewal**: when [`BindClient::renew_due`](crate::bind::BindClient::renew_due) says (two
//!   thirds into the token's life), a fresh token from the [`Renewer`] (the gateway's
//!   `POST /v1/sessions/renew`) and a renewal BIND; a failed request is retried with back-off;
//! - **lost binding**: when KEEPALIVEs go unanswered, first a REBIND from the same socket
//!   (which heals a NAT rebinding or a changed local address while the relay still holds the
//!   binding);
//! - **recovery**: when the relay ends the binding (a CLOSE `EXPIRED` or `IDLE`), or that REBIND
//!   meets `UNKNOWN_SESSION` (a relay restart), goes unanswered for the bind timeout (30 s) or
//!   is refused, a fresh token from the [`Renewer`] and a first BIND with it; the Noise session
//!   is kept (docs/protocol.md §3.1, *Recovery*). Attempts are retried with back-off for
//!   [`Timeouts::recovery`], then the session ends;
//! - **rebind**: when sending fails because the local address went away (`EADDRNOTAVAIL`,
//!   `ENETUNREACH`, `ENETDOWN`), a fresh socket and a REBIND from it, retried every second
//!   while the network is gone; [`Session::rebind`] does the same on request.
//!
//! Without a [`Renewer`], the session cannot renew: it ends when the relay unbinds the slot at
//! the token's `exp` (plus the relay's clock skew), with a reason that says so.
//!
//! The session is a [`DatagramLink`]: [`DatagramLink::send`] queues a message for the driver
//! (waiting while the bounded queue is full), [`DatagramLink::recv`] takes the next decrypted
//! message. Its messages are at most [`DatagramLink::max_payload`] bytes, which depends on the
//! relay address's family ([`Family::max_plaintext`]: 1427 bytes over IPv4, 1407 over IPv6), so
//! that every DATA datagram fits a 1500-byte path unfragmented; a longer message is refused
//! with [`LinkError::TooLong`]. Nothing is retransmitted: a message sent while the binding is
//! being recovered is lost, as on any datagram link. When the session ends — [`Session::close`], the other peer's
//! CLOSE, or a binding that could not be recovered — both return [`LinkError::Closed`] with
//! the reason.

mod driver;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_core::keys::PeerPublicKey;
use ferry_core::known_peers::KnownPeers;
use ferry_core::noise::{LocalIdentity, PeerExpectation, TransportLimits};
use ferry_core::wire::{RejectReason, Slot};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::channel::ChannelError;
use crate::gateway::{GatewayClient, GatewayError, Grant};
use crate::link::{DatagramLink, LinkError};
use crate::sizes::Family;

/// Where a [`Renewer`] gets a fresh grant for a slot: the gateway, or a fake in tests.
pub trait Renewer: Send + Sync + 'static {
    /// A fresh token and slot secret for `slot` of `session_id`.
    fn renew(
        &self,
        session_id: u64,
        slot: Slot,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, GatewayError>> + Send + '_>>;
}

impl Renewer for GatewayClient {
    fn renew(
        &self,
        session_id: u64,
        slot: Slot,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, GatewayError>> + Send + '_>> {
        Box::pin(GatewayClient::renew(self, session_id, slot))
    }
}

/// Whose static key the other peer must present in the handshake.
#[derive(Clone, Debug, Default)]
pub enum Expectation {
    /// The key the grant names (`expected_peer_public_key`): the default. A grant without one
    /// is refused at [`Session::connect`].
    #[default]
    FromGrant,
    /// Exactly this key.
    Pinned(PeerPublicKey),
    /// Trust on first use, only when asked for: the key `known` records for `name` must match;
    /// an unknown name is recorded (see [`Session::known_peers`], which the caller saves).
    TrustOnFirstUse {
        /// The peer's name in the store.
        name: String,
        /// The store.
        known: KnownPeers,
    },
}

/// How long a session waits for things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// [`Session::connect`]: binding, waiting for the other peer and the handshake together.
    pub connect: Duration,
    /// How long the driver keeps trying to recover a lost binding before it ends the session.
    pub recovery: Duration,
}

impl Default for Timeouts {
    /// 60 s to connect, 300 s to recover.
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(60),
            recovery: Duration::from_secs(300),
        }
    }
}

/// What [`Session::connect`] needs.
pub struct SessionConfig {
    /// The slot to bind: from the gateway's create, join or renew.
    pub grant: Grant,
    /// This peer's static key.
    pub identity: LocalIdentity,
    /// Whom to expect on the other side (by default the key the grant names).
    pub expectation: Expectation,
    /// The relay to talk to instead of the grant's `relay.address` (e.g. behind a NAT that
    /// maps the relay's public address elsewhere).
    pub relay: Option<SocketAddr>,
    /// Where fresh tokens come from for renewal and recovery; without one the session ends at
    /// the token's expiry.
    pub renewer: Option<Arc<dyn Renewer>>,
    /// The timeouts.
    pub timeouts: Timeouts,
    /// The Noise transport's rekey and age limits.
    pub limits: TransportLimits,
    /// How many messages each direction's queue between the application and the driver holds.
    /// A full send queue makes [`DatagramLink::send`] wait; a full receive queue drops what
    /// arrives (counted in [`SessionStats::dropped_incoming`]).
    pub queue: usize,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("grant", &self.grant)
            .field("expectation", &self.expectation)
            .field("relay", &self.relay)
            .field("renewer", &self.renewer.is_some())
            .field("timeouts", &self.timeouts)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The default of [`SessionConfig::queue`].
pub const DEFAULT_QUEUE: usize = 2048;

impl SessionConfig {
    /// A config for `grant` and `identity` with the defaults: the grant's pinned peer key and
    /// relay, no renewer, [`Timeouts::default`], [`TransportLimits::default`],
    /// [`DEFAULT_QUEUE`].
    pub fn new(grant: Grant, identity: LocalIdentity) -> Self {
        Self {
            grant,
            identity,
            expectation: Expectation::FromGrant,
            relay: None,
            renewer: None,
            timeouts: Timeouts::default(),
            limits: TransportLimits::default(),
            queue: DEFAULT_QUEUE,
        }
    }

    /// Renews and recovers with `renewer` (for example a [`GatewayClient`]).
    pub fn with_renewer(mut self, renewer: Arc<dyn Renewer>) -> Self {
        self.renewer = Some(renewer);
        self
    }
}

/// Why [`Session::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The UDP socket could not be opened or used.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The grant names no key to pin and trust on first use was not asked for.
    #[error(
        "the grant names no peer key to pin: create the session with the joiner's key, pin one, \
         or ask for trust on first use"
    )]
    NoPeerKey,
    /// The channel could not be set up (an invalid trust-on-first-use name, bad limits).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The relay refused the bind with an authenticated REJECT.
    #[error("the relay rejected the bind: {0}")]
    Rejected(&'static str),
    /// The other peer's static key is not the one expected: someone else holds the other slot,
    /// or a relay tried to sit in the middle.
    #[error("the other peer presented the wrong identity")]
    WrongIdentity,
    /// Nothing useful happened in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The relay answered the bind only with unauthenticated REJECTs (which are hints, so the
    /// peer kept trying) and no BIND-ACK came in time.
    #[error(
        "the relay refused the bind ({reason}; unauthenticated, so retried) and no BIND-ACK came \
         within {after:?}"
    )]
    RefusedUnauthenticated {
        /// The last reason the relay gave.
        reason: &'static str,
        /// How long the peer tried.
        after: Duration,
    },
    /// The grant's token has expired and there is no renewer to get a fresh one.
    #[error(
        "the grant's token expired at {expires_at} (Unix seconds): renew it (`ferry-peer renew`) \
         or give the session a gateway"
    )]
    GrantExpired {
        /// The token's `exp`.
        expires_at: u64,
    },
    /// The relay refused the bind because the grant's token was used before (a token binds
    /// once: a grant is good for one session), and there is no renewer to get a fresh one.
    #[error(
        "the relay rejected the bind: this grant's token was already used (a token binds once): \
         renew it (`ferry-peer renew`) or give the session a gateway"
    )]
    TokenUsed,
    /// The renewer could not give a fresh grant for an expired or used one.
    #[error("the grant's token expired or was used, and the gateway could not renew it: {0}")]
    Renew(#[source] GatewayError),
    /// The session ended while connecting (the other peer closed it, the relay unbound it).
    #[error("the session ended while connecting: {0}")]
    Closed(String),
}

/// A grant whose token expires within this is renewed before [`Session::connect`] binds.
const EXPIRY_MARGIN_SECS: u64 = 5;

/// A session's counters (see [`Session::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Application messages encrypted and handed to the socket.
    pub messages_sent: u64,
    /// Their plaintext bytes.
    pub bytes_sent: u64,
    /// Application messages received and decrypted.
    pub messages_received: u64,
    /// Their plaintext bytes.
    pub bytes_received: u64,
    /// Messages the application sent that never left: no channel yet, the transport refused
    /// them, or the socket failed.
    pub dropped_outgoing: u64,
    /// Datagrams from the relay that carried no message for the application: not
    /// authenticated, replayed, stale, or the receive queue was full.
    pub dropped_incoming: u64,
    /// Renewals the relay acknowledged.
    pub renewals: u64,
    /// Bindings recovered with a fresh token after the relay lost or ended them.
    pub recoveries: u64,
    /// REBINDs the relay acknowledged (moves to a new local address).
    pub rebinds: u64,
    /// End-to-end handshakes finished on this side (the first and every re-handshake).
    pub handshakes: u64,
    /// Requests to the renewer (gateway) that failed.
    pub gateway_failures: u64,
}

impl SessionStats {
    /// Every counter with its name (the field's), in a fixed order: for printing.
    pub fn fields(&self) -> [(&'static str, u64); 11] {
        [
            ("messages_sent", self.messages_sent),
            ("bytes_sent", self.bytes_sent),
            ("messages_received", self.messages_received),
            ("bytes_received", self.bytes_received),
            ("dropped_outgoing", self.dropped_outgoing),
            ("dropped_incoming", self.dropped_incoming),
            ("renewals", self.renewals),
            ("recoveries", self.recoveries),
            ("rebinds", self.rebinds),
            ("handshakes", self.handshakes),
            ("gateway_failures", self.gateway_failures),
        ]
    }
}

impl fmt::Display for SessionStats {
    /// `name value` pairs, space-separated, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.fields().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name} {value}")?;
        }
        Ok(())
    }
}

/// The live counters behind [`SessionStats`], written by the driver only.
#[derive(Debug, Default)]
struct Counters {
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    dropped_outgoing: AtomicU64,
    dropped_incoming: AtomicU64,
    renewals: AtomicU64,
    recoveries: AtomicU64,
    rebinds: AtomicU64,
    handshakes: AtomicU64,
    gateway_failures: AtomicU64,
}

/// Adds `n` to a counter.
fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> SessionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SessionStats {
            messages_sent: get(&self.messages_sent),
            bytes_sent: get(&self.bytes_sent),
            messages_received: get(&self.messages_received),
            bytes_received: get(&self.bytes_received),
            dropped_outgoing: get(&self.dropped_outgoing),
            dropped_incoming: get(&self.dropped_incoming),
            renewals: get(&self.renewals),
            recoveries: get(&self.recoveries),
            rebinds: get(&self.rebinds),
            handshakes: get(&self.handshakes),
            gateway_failures: get(&self.gateway_failures),
        }
    }
}

/// What the driver and the [`Session`] handle share.
#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    /// Why the session ended, once it has.
    end: OnceLock<String>,
}

impl Shared {
    fn end_reason(&self) -> String {
        self.end
            .get()
            .cloned()
            .unwrap_or_else(|| "the session's driver is gone".to_string())
    }
}

/// Replaces `config`'s grant by a fresh one from its renewer (which the caller made sure of),
/// keeping the caller's pin when the renewal names no key.
async fn renew_grant(config: &mut SessionConfig) -> Result<(), SessionError> {
    let Some(renewer) = &config.renewer else {
        return Err(SessionError::TokenUsed);
    };
    let fresh = renewer
        .renew(config.grant.session_id, config.grant.slot)
        .await
        .map_err(SessionError::Renew)?;
    config.grant = Grant {
        // The pin and the relay's address are the caller's; a renewal repeats them.
        expected_peer_public_key: config
            .grant
            .expected_peer_public_key
            .or(fresh.expected_peer_public_key),
        ..fresh
    };
    Ok(())
}

/// What the application asks of the driver besides sending.
#[derive(Debug)]
enum Command {
    /// Move to a fresh socket and REBIND.
    Rebind,
    /// Send CLOSE and stop; answered once done.
    Close(oneshot::Sender<()>),
}

/// How many messages a sender on a session may hand over in one run
/// ([`DatagramLink::send_segments`]).
const SEND_SEGMENTS: usize = 32;

/// A connected peer session (see the module doc). Dropping it closes the session like
/// [`close`](Self::close), without waiting.
#[derive(Debug)]
pub struct Session {
    commands: mpsc::Sender<Command>,
    outgoing: mpsc::Sender<Vec<u8>>,
    incoming: Mutex<mpsc::Receiver<Vec<u8>>>,
    shared: Arc<Shared>,
    session_id: u64,
    slot: Slot,
    remote: PeerPublicKey,
    known: KnownPeers,
    local_addr: SocketAddr,
    relay: SocketAddr,
}

impl Session {
    /// Binds, waits for the other peer, runs the handshake, and starts the driver task (see
    /// the module doc). A grant whose token has expired (or expires within 5 s) is first
    /// renewed through the renewer; without one that is an error. A token the relay says was
    /// used before (REJECT `REPLAYED`: a token binds once) is renewed and the bind tried once
    /// more; without a renewer that is an error. Fails at once when the other peer presents
    /// the wrong identity or the relay refuses the bind with an authenticated REJECT, and
    /// after [`Timeouts::connect`] otherwise.
    pub async fn connect(mut config: SessionConfig) -> Result<Self, SessionError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if config.grant.expires_at <= now + EXPIRY_MARGIN_SECS {
            if config.renewer.is_none() {
                return Err(SessionError::GrantExpired {
                    expires_at: config.grant.expires_at,
                });
            }
            renew_grant(&mut config).await?;
        }
        match Self::connect_once(&config).await {
            Err(SessionError::Rejected(reason)) if reason == RejectReason::Replayed.name() => {
                if config.renewer.is_none() {
                    return Err(SessionError::TokenUsed);
                }
                renew_grant(&mut config).await?;
                Self::connect_once(&config).await
            }
            other => other,
        }
    }

    /// One attempt of [`connect`](Self::connect) with the grant as it is.
    async fn connect_once(config: &SessionConfig) -> Result<Self, SessionError> {
        let (expect, known) = match &config.expectation {
            Expectation::FromGrant => match config.grant.expected_peer_public_key {
                Some(key) => (PeerExpectation::Pinned(*key.as_bytes()), KnownPeers::new()),
                None => return Err(SessionError::NoPeerKey),
            },
            Expectation::Pinned(key) => {
                (PeerExpectation::Pinned(*key.as_bytes()), KnownPeers::new())
            }
            Expectation::TrustOnFirstUse { name, known } => (
                PeerExpectation::TrustOnFirstUse { name: name.clone() },
                known.clone(),
            ),
        };
        let queue = config.queue.max(1);
        let (out_tx, out_rx) = mpsc::channel(queue);
        let (in_tx, in_rx) = mpsc::channel(queue);
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let shared = Arc::new(Shared::default());
        let relay = config.relay.unwrap_or(config.grant.relay.address);
        let session_id = config.grant.session_id;
        let slot = config.grant.slot;
        let mut driver = driver::Driver::new(
            config,
            expect,
            known,
            relay,
            driver::Queues {
                to_app: in_tx,
                from_app: out_rx,
                commands: cmd_rx,
            },
            shared.clone(),
        )?;
        let deadline = tokio::time::Instant::now() + config.timeouts.connect;
        driver.connect(deadline, config.timeouts.connect).await?;
        let remote = driver.remote_identity().ok_or(SessionError::Timeout {
            what: "the handshake",
            after: config.timeouts.connect,
        })?;
        let known = driver.known_peers().clone();
        let local_addr = driver.local_addr()?;
        tokio::spawn(driver.run());
        Ok(Self {
            commands: cmd_tx,
            outgoing: out_tx,
            incoming: Mutex::new(in_rx),
            shared,
            session_id,
            slot,
            remote: PeerPublicKey::from_bytes(remote),
            known,
            local_addr,
            relay,
        })
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// The slot this peer holds.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The other peer's static key, as the handshake checked it.
    pub fn remote_identity(&self) -> PeerPublicKey {
        self.remote
    }

    /// The known-peers store after the handshake: with trust on first use, it holds the other
    /// peer's key if it was new (the caller saves it).
    pub fn known_peers(&self) -> &KnownPeers {
        &self.known
    }

    /// The local address of the socket the session connected from; after a rebind the session
    /// sends from another socket, which this does not follow.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The relay the session talks to.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The IP family of the session's datagrams to the relay, which sizes its messages.
    pub fn family(&self) -> Family {
        Family::of(self.relay)
    }

    /// The session's counters so far.
    pub fn stats(&self) -> SessionStats {
        self.shared.counters.snapshot()
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<String> {
        self.shared.end.get().cloned()
    }

    /// Moves the session to a fresh local socket and sends a REBIND from it: for an
    /// application that knows its address changed (the driver does the same by itself when
    /// sending fails because the local address went away).
    pub async fn rebind(&self) -> Result<(), LinkError> {
        self.commands
            .send(Command::Rebind)
            .await
            .map_err(|_| LinkError::Closed(self.shared.end_reason()))
    }

    /// Ends the session: sends CLOSE (which the relay passes on to the other peer, whose
    /// session then ends with `PEER_CLOSED`) and stops the driver. Returns once done; a
    /// session that already ended returns at once.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

impl DatagramLink for Session {
    /// 1427 bytes through an IPv4 relay address, 1407 through an IPv6 one
    /// ([`Family::max_plaintext`]).
    fn max_payload(&self) -> usize {
        self.family().max_plaintext()
    }

    /// The driver batches DATA by itself; runs let the sender hand over several at once.
    fn max_segments(&self) -> usize {
        SEND_SEGMENTS
    }

    async fn send(&self, message: &[u8]) -> Result<(), LinkError> {
        LinkError::check_len(message, self.max_payload())?;
        self.outgoing
            .send(message.to_vec())
            .await
            .map_err(|_| LinkError::Closed(self.shared.end_reason()))
    }

    async fn recv(&self) -> Result<Vec<u8>, LinkError> {
        self.incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| LinkError::Closed(self.shared.end_reason()))
    }

    async fn recv_batch(&self, out: &mut Vec<Vec<u8>>, limit: usize) -> Result<usize, LinkError> {
        match self
            .incoming
            .lock()
            .await
            .recv_many(out, limit.max(1))
            .await
        {
            0 => Err(LinkError::Closed(self.shared.end_reason())),
            n => Ok(n),
        }
    }
}
