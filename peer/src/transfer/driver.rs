//! Drives one quinn-proto connection over a [`DatagramLink`]: datagrams from the link into the
//! endpoint, the connection's timer, its transmits back onto the link. The two sides' loops
//! (`send_file`, `receive_file`) own the application logic and call [`Driver::wait`] with their
//! own work as the third thing to wait for.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Endpoint, Event, ServerConfig, VarInt,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::TransferError;
use super::quic::PEER_LABEL;
use super::wire::{close, escape_untrusted};
use crate::link::{DatagramLink, LinkError};

/// How many received datagrams the receiving task may queue for the driver.
const INBOUND_QUEUE: usize = 512;
/// How many queued datagrams the driver takes in before it lets the connection answer; also
/// the most the receiving task takes from the link in one go.
const INBOUND_BATCH: usize = 64;

/// What woke [`Driver::wait`] up.
pub(crate) enum Wake<T> {
    /// Datagrams were fed to the connection, or the connection's timer fired.
    Network,
    /// The caller's own work finished with this.
    App(T),
    /// The caller's stall deadline passed first.
    Stalled,
}

/// Receives from the link on a task of its own, so that no `recv` future is ever dropped
/// half-way (the link's `recv` need not be cancel-safe). The task takes datagrams from the link
/// in batches ([`DatagramLink::recv_batch`]) and queues whole batches, so the driver is woken
/// once per batch rather than once per datagram. Aborted on drop.
pub(crate) struct Inbound {
    rx: mpsc::Receiver<Result<Vec<Vec<u8>>, LinkError>>,
    /// The rest of the batch last taken from the queue.
    ready: VecDeque<Vec<u8>>,
    task: JoinHandle<()>,
}

impl Inbound {
    /// Starts receiving from `link`.
    pub(crate) fn start<L: DatagramLink>(link: Arc<L>) -> Self {
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE / INBOUND_BATCH);
        let task = tokio::spawn(async move {
            loop {
                let mut batch = Vec::with_capacity(INBOUND_BATCH);
                let message = link
                    .recv_batch(&mut batch, INBOUND_BATCH)
                    .await
                    .map(|_| batch);
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    break;
                }
            }
        });
        Self {
            rx,
            ready: VecDeque::new(),
            task,
        }
    }

    /// The next datagram; an error once the link is closed.
    pub(crate) async fn next(&mut self) -> Result<Vec<u8>, TransferError> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Ok(message);
            }
            // Cancel-safe: nothing is awaited once a batch is taken from the queue.
            match self.rx.recv().await {
                Some(Ok(batch)) => self.ready.extend(batch),
                Some(Err(e)) => return Err(TransferError::Link(e)),
                None => {
                    return Err(TransferError::Link(LinkError::Closed(
                        "the link's receiver stopped".into(),
                    )));
                }
            }
        }
    }

    /// A datagram already queued, if any.
    fn try_next(&mut self) -> Option<Result<Vec<u8>, TransferError>> {
        loop {
            if let Some(message) = self.ready.pop_front() {
                return Some(Ok(message));
            }
            match self.rx.try_recv() {
                Ok(Ok(batch)) => self.ready.extend(batch),
                Ok(Err(e)) => return Some(Err(TransferError::Link(e))),
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Some(Err(TransferError::Link(LinkError::Closed(
                        "the link's receiver stopped".into(),
                    ))));
                }
            }
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A QUIC endpoint with its one connection, over a link.
pub(crate) struct Driver<L: DatagramLink> {
    link: Arc<L>,
    inbound: Inbound,
    endpoint: Endpoint,
    handle: ConnectionHandle,
    /// The connection (public to the side loops, which open and use its stream).
    pub(crate) conn: quinn_proto::Connection,
    /// Transmit and response buffer.
    buf: Vec<u8>,
    /// Datagrams the endpoint could not use (not QUIC, another connection, a stray packet).
    pub(crate) ignored: u64,
    /// The link failed after datagrams that are still to be acted on.
    link_error: Option<TransferError>,
    /// This side is the QUIC client.
    client: bool,
    /// A QUIC client's first packet (a long-header Initial of at least 1200 bytes for a
    /// connection that is not ours) reached this client: the other peer is a client too.
    pub(crate) peer_is_client: bool,
}

impl<L: DatagramLink> Driver<L> {
    /// The sender's side: connects as the QUIC client.
    pub(crate) fn connect(
        link: Arc<L>,
        mut endpoint: Endpoint,
        client: quinn_proto::ClientConfig,
    ) -> Result<Self, TransferError> {
        let (handle, conn) = endpoint
            .connect(Instant::now(), client, PEER_LABEL, super::quic::SERVER_NAME)
            .map_err(|e| TransferError::Setup(format!("QUIC connect: {e}")))?;
        let inbound = Inbound::start(link.clone());
        Ok(Self {
            link,
            inbound,
            endpoint,
            handle,
            conn,
            buf: Vec::new(),
            ignored: 0,
            link_error: None,
            client: true,
            peer_is_client: false,
        })
    }

    /// The receiver's side: waits for the sender's first packet and accepts its connection.
    /// Waits at most `wait`, and fails when the link closes.
    pub(crate) async fn accept(
        link: Arc<L>,
        mut endpoint: Endpoint,
        server: Arc<ServerConfig>,
        wait: Duration,
    ) -> Result<Self, TransferError> {
        let mut inbound = Inbound::start(link.clone());
        let deadline = tokio::time::Instant::now().checked_add(wait);
        let mut buf = Vec::new();
        let mut ignored = 0;
        loop {
            let message = tokio::select! {
                message = inbound.next() => message?,
                () = sleep_until(deadline) => return Err(TransferError::NoConnection(wait)),
            };
            let now = Instant::now();
            match endpoint.handle(now, PEER_LABEL, None, None, bytes_mut(message), &mut buf) {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    match endpoint.accept(incoming, now, &mut buf, Some(server.clone())) {
                        Ok((handle, conn)) => {
                            buf.clear();
                            return Ok(Self {
                                link,
                                inbound,
                                endpoint,
                                handle,
                                conn,
                                buf,
                                ignored,
                                link_error: None,
                                client: false,
                                peer_is_client: false,
                            });
                        }
                        Err(e) => {
                            if let Some(response) = e.response {
                                link.send(&buf[..response.size]).await?;
                            }
                            buf.clear();
                            ignored += 1;
                        }
                    }
                }
                Some(DatagramEvent::Response(transmit)) => {
                    link.send(&buf[..transmit.size]).await?;
                    buf.clear();
                }
                Some(DatagramEvent::ConnectionEvent(..)) | None => ignored += 1,
            }
        }
    }

    /// Lets the connection send what it has, and hands what it tells the endpoint over.
    pub(crate) async fn flush(&mut self) -> Result<(), TransferError> {
        loop {
            while let Some(event) = self.conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(self.handle, event) {
                    self.conn.handle_event(back);
                }
            }
            self.buf.clear();
            let most = self.link.max_segments().max(1);
            let Some(transmit) = self.conn.poll_transmit(Instant::now(), most, &mut self.buf)
            else {
                return Ok(());
            };
            let segment = transmit.segment_size.unwrap_or(transmit.size);
            self.link
                .send_segments(&self.buf[..transmit.size], segment)
                .await?;
        }
    }

    /// The connection's next application event.
    pub(crate) fn poll(&mut self) -> Option<Event> {
        self.conn.poll()
    }

    /// Waits for the link, the connection's timer, `app`, or the `stall` deadline, and feeds
    /// what came to the connection. Call [`poll`](Self::poll) and [`flush`](Self::flush) after
    /// it.
    pub(crate) async fn wait<T>(
        &mut self,
        app: impl Future<Output = T>,
        stall: Option<tokio::time::Instant>,
    ) -> Result<Wake<T>, TransferError> {
        let deadline = self.conn.poll_timeout().map(tokio::time::Instant::from_std);
        if let Some(e) = self.link_error.take() {
            return Err(e);
        }
        tokio::select! {
            message = self.inbound.next() => {
                self.feed(message?);
                for _ in 1..INBOUND_BATCH {
                    match self.inbound.try_next() {
                        Some(Ok(message)) => self.feed(message),
                        Some(Err(e)) => {
                            // What arrived before the link failed (a close with its reason,
                            // say) is handled first; the failure comes with the next wait.
                            self.link_error = Some(e);
                            break;
                        }
                        None => break,
                    }
                }
                Ok(Wake::Network)
            }
            () = sleep_until(deadline) => {
                self.conn.handle_timeout(Instant::now());
                Ok(Wake::Network)
            }
            value = app => Ok(Wake::App(value)),
            () = sleep_until(stall) => Ok(Wake::Stalled),
        }
    }

    /// Hands one datagram to the endpoint, and what it finds for the connection to it.
    fn feed(&mut self, message: Vec<u8>) {
        let client_initial = self.client && is_client_initial(&message);
        self.buf.clear();
        match self.endpoint.handle(
            Instant::now(),
            PEER_LABEL,
            None,
            None,
            bytes_mut(message),
            &mut self.buf,
        ) {
            Some(DatagramEvent::ConnectionEvent(handle, event)) if handle == self.handle => {
                self.conn.handle_event(event);
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                // One transfer, one connection: a second one (a stray or replayed Initial) is
                // dropped without an answer.
                self.endpoint.ignore(incoming);
                self.ignored += 1;
            }
            // Stateless answers (a reset for an unknown connection) and datagrams that are not
            // QUIC are of no use to the one connection.
            _ => {
                self.ignored += 1;
                self.peer_is_client |= client_initial;
            }
        }
    }

    /// Closes the connection with `code` and `reason`, and sends the close.
    pub(crate) async fn close(&mut self, code: u32, reason: &str) {
        self.conn.close(
            Instant::now(),
            VarInt::from_u32(code),
            Bytes::copy_from_slice(reason.as_bytes()),
        );
        // The link may be gone already; the close is a courtesy then.
        let _ = self.flush().await;
    }
}

/// Whether `datagram` looks like a QUIC version 1 client's first flight: a long header of type
/// Initial in a datagram of at least 1200 bytes (RFC 9000 §17.2.2, §14.1). A server's Initials
/// go to the client's own connection and never get this far.
fn is_client_initial(datagram: &[u8]) -> bool {
    datagram.len() >= super::quic::QUIC_MIN_PAYLOAD
        && datagram[0] & 0xf0 == 0xc0
        && datagram[1..5] == [0, 0, 0, 1]
}

/// The datagram as quinn-proto takes it, without a copy.
fn bytes_mut(message: Vec<u8>) -> BytesMut {
    BytesMut::from(Bytes::from(message))
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The transfer error for a lost connection, from the point of view of the side that lost it.
/// What the other peer wrote (its close reason) is escaped: it ends up on a terminal.
pub(crate) fn lost(reason: ConnectionError, idle: Duration) -> TransferError {
    match reason {
        ConnectionError::TimedOut => TransferError::Timeout(idle),
        ConnectionError::ApplicationClosed(close) => {
            let text = escape_untrusted(&String::from_utf8_lossy(&close.reason));
            match close.error_code.into_inner() {
                c if c == u64::from(close::REFUSED) => TransferError::PeerRefused(text),
                c if c == u64::from(close::PROTOCOL) => {
                    TransferError::Protocol(format!("the other peer says: {text}"))
                }
                c if c == u64::from(close::DONE) => TransferError::Protocol(
                    "the other peer ended the transfer before it was complete".into(),
                ),
                _ => TransferError::PeerAborted(text),
            }
        }
        // A transport close carries the other peer's reason too.
        other => TransferError::Quic(escape_untrusted(&other.to_string())),
    }
}
