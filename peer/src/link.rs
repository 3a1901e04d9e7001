//! A datagram link: what the applications on top of a peer session (the reliable file
//! transfer, the UDP tunnel) need from it, and nothing more. A link carries whole messages of
//! at most [`DatagramLink::max_payload`] bytes to the other peer, end-to-end encrypted, with
//! no promise of delivery or order: exactly what DATA through a relay gives.
//!
//! [`memory_pair`] is a link in memory between two ends, with optional loss, reordering and
//! delay, for tests of what runs on top. [`UdpLink`] is plain UDP straight to the other end,
//! with no relay and no encryption: the baseline that measurements of a session compare with.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};

use crate::udp_batch::{BatchSocket, RecvBatch};

/// Why a link cannot carry a message.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The session under the link has ended (closed by either side, or lost for good).
    #[error("the link is closed: {0}")]
    Closed(String),
    /// The message is longer than [`DatagramLink::max_payload`].
    #[error("a message of {len} bytes exceeds the link's maximum of {max}")]
    TooLong {
        /// The message's length.
        len: usize,
        /// The link's maximum.
        max: usize,
    },
}

impl LinkError {
    /// `Ok` when `message` fits a link whose largest message is `max`, else
    /// [`LinkError::TooLong`]: the check every [`DatagramLink::send`] makes first.
    pub fn check_len(message: &[u8], max: usize) -> Result<(), LinkError> {
        match message.len() {
            len if len > max => Err(LinkError::TooLong { len, max }),
            _ => Ok(()),
        }
    }
}

/// An unreliable, unordered, end-to-end encrypted message link to one other peer.
///
/// Both methods take `&self`, so one task may wait in [`recv`](Self::recv) while another
/// sends.
pub trait DatagramLink: Send + Sync + 'static {
    /// The largest message [`send`](Self::send) accepts.
    fn max_payload(&self) -> usize;

    /// Sends one message. Waits while the link's send queue is full; a message may still be
    /// lost on the way.
    fn send(&self, message: &[u8]) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Waits for the next message from the other peer.
    fn recv(&self) -> impl Future<Output = Result<Vec<u8>, LinkError>> + Send;

    /// Waits for the next message, then takes those that have already arrived as well, up to
    /// `limit` messages in all (at least one), appending them to `out`; returns how many it
    /// appended (at least one) or, with none, why the link cannot deliver. A reader that drains
    /// the link pays one wake-up per batch rather than per message. The default receives one
    /// message with [`recv`](Self::recv).
    fn recv_batch(
        &self,
        out: &mut Vec<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<usize, LinkError>> + Send {
        let _ = limit;
        async move {
            out.push(self.recv().await?);
            Ok(1)
        }
    }

    /// How many messages a [`send_segments`](Self::send_segments) call is worth filling with:
    /// 1 when the link gains nothing from them (the default).
    fn max_segments(&self) -> usize {
        1
    }

    /// Sends `contents` as messages of `segment` bytes each, the last one possibly shorter:
    /// the form in which QUIC hands over a run of equal-sized datagrams, which a link over a
    /// socket sends in one system call. Every message is checked as [`send`](Self::send) checks
    /// it; the default sends them one by one with it.
    fn send_segments(
        &self,
        contents: &[u8],
        segment: usize,
    ) -> impl Future<Output = Result<(), LinkError>> + Send {
        async move {
            for message in contents.chunks(segment.max(1)) {
                self.send(message).await?;
            }
            Ok(())
        }
    }
}

/// What a [`memory_pair`] link does to the messages it carries, in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// The fraction of messages dropped, 0.0 to 1.0.
    pub loss: f64,
    /// The fraction of messages held back and delivered after the next one.
    pub reorder: f64,
    /// How long every message takes to arrive.
    pub delay: Duration,
    /// The seed of the link's pseudo-random choices, so a failing run can be repeated.
    pub seed: u64,
}

impl Impairment {
    /// A perfect link: no loss, no reordering, no delay.
    pub const NONE: Self = Self {
        loss: 0.0,
        reorder: 0.0,
        delay: Duration::ZERO,
        seed: 1,
    };
}

/// The largest message a [`memory_pair`] link carries: the largest plaintext a Noise transport
/// message inside one DATA datagram can hold ([`ferry_core::noise::MAX_PLAINTEXT`]).
pub const MEMORY_LINK_MAX_PAYLOAD: usize = ferry_core::noise::MAX_PLAINTEXT;

/// One end of a link in memory (see [`memory_pair`]).
#[derive(Debug)]
pub struct MemoryLink {
    tx: mpsc::Sender<Vec<u8>>,
    rx: Mutex<mpsc::Receiver<Vec<u8>>>,
}

/// How many messages may be in flight in each direction of a [`memory_pair`] before
/// [`DatagramLink::send`] waits.
const MEMORY_LINK_QUEUE: usize = 1024;

/// Two ends of a link in memory. Each direction runs a task (on the current tokio runtime)
/// that applies `impairment` to what passes. Dropping one end closes the link for the other.
pub fn memory_pair(impairment: Impairment) -> (MemoryLink, MemoryLink) {
    let (a_tx, a_wire) = mpsc::channel(MEMORY_LINK_QUEUE);
    let (b_tx, b_wire) = mpsc::channel(MEMORY_LINK_QUEUE);
    let (to_a, a_rx) = mpsc::channel(MEMORY_LINK_QUEUE);
    let (to_b, b_rx) = mpsc::channel(MEMORY_LINK_QUEUE);
    tokio::spawn(impair(a_wire, to_b, impairment));
    let reverse = Impairment {
        seed: impairment.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        ..impairment
    };
    tokio::spawn(impair(b_wire, to_a, reverse));
    (
        MemoryLink {
            tx: a_tx,
            rx: Mutex::new(a_rx),
        },
        MemoryLink {
            tx: b_tx,
            rx: Mutex::new(b_rx),
        },
    )
}

/// Carries messages from `wire` to `out`, dropping, holding back and delaying them as
/// `impairment` says.
async fn impair(
    mut wire: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Vec<u8>>,
    impairment: Impairment,
) {
    let mut rng = XorShift(impairment.seed.max(1));
    let mut held: Option<Vec<u8>> = None;
    // Messages on their way, each with the instant it arrives.
    let mut in_flight: VecDeque<(tokio::time::Instant, Vec<u8>)> = VecDeque::new();
    let mut sender_gone = false;
    loop {
        let next_arrival = in_flight.front().map(|(at, _)| *at);
        if sender_gone && next_arrival.is_none() {
            break;
        }
        tokio::select! {
            message = wire.recv(), if !sender_gone => {
                let Some(message) = message else {
                    // What is on its way still arrives, the held-back message last.
                    sender_gone = true;
                    if let Some(late) = held.take() {
                        in_flight.push_back((tokio::time::Instant::now() + impairment.delay, late));
                    }
                    continue;
                };
                if rng.chance(impairment.loss) {
                    continue;
                }
                let at = tokio::time::Instant::now() + impairment.delay;
                if held.is_none() && rng.chance(impairment.reorder) {
                    held = Some(message);
                    continue;
                }
                in_flight.push_back((at, message));
                if let Some(late) = held.take() {
                    in_flight.push_back((at, late));
                }
            }
            () = sleep_until(next_arrival) => {
                if let Some((_, message)) = in_flight.pop_front()
                    && out.send(message).await.is_err()
                {
                    break;
                }
            }
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

/// A small deterministic generator (xorshift64) for the impairment's choices.
struct XorShift(u64);

impl XorShift {
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

impl DatagramLink for MemoryLink {
    fn max_payload(&self) -> usize {
        MEMORY_LINK_MAX_PAYLOAD
    }

    async fn send(&self, message: &[u8]) -> Result<(), LinkError> {
        LinkError::check_len(message, MEMORY_LINK_MAX_PAYLOAD)?;
        self.tx
            .send(message.to_vec())
            .await
            .map_err(|_| LinkError::Closed("the other end is gone".into()))
    }

    async fn recv(&self) -> Result<Vec<u8>, LinkError> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| LinkError::Closed("the other end is gone".into()))
    }

    async fn recv_batch(&self, out: &mut Vec<Vec<u8>>, limit: usize) -> Result<usize, LinkError> {
        match self.rx.lock().await.recv_many(out, limit.max(1)).await {
            0 => Err(LinkError::Closed("the other end is gone".into())),
            n => Ok(n),
        }
    }
}

/// A link over a plain UDP socket straight to the other end: no relay, no Noise, nothing
/// encrypted or authenticated. It exists to measure what a session through a relay costs
/// against the direct path (the same application on both); never carry user data on it.
#[derive(Debug)]
pub struct UdpLink {
    socket: BatchSocket,
    peer: std::net::SocketAddr,
    /// Receive buffers, and datagrams received but not yet taken (a GRO run may hold more than
    /// a `recv_batch` asks for). Never held across an await.
    rx: std::sync::Mutex<(RecvBatch, VecDeque<Vec<u8>>)>,
}

impl UdpLink {
    /// A link from `socket` to `peer` (the socket is connected to it, so only `peer`'s
    /// datagrams are received). Asks for socket buffers of [`UDP_LINK_BUFFER`] bytes, as a
    /// session does, so that both paths absorb the same bursts; the kernel caps them at its
    /// `net.core.rmem_max` / `wmem_max`, and [`buffer_sizes`](Self::buffer_sizes) tells what
    /// was granted.
    pub async fn connect(
        socket: tokio::net::UdpSocket,
        peer: std::net::SocketAddr,
    ) -> std::io::Result<Self> {
        let sock = socket2::SockRef::from(&socket);
        // A smaller buffer than asked for is not an error: it only means more drops in bursts.
        let _ = sock.set_recv_buffer_size(UDP_LINK_BUFFER);
        let _ = sock.set_send_buffer_size(UDP_LINK_BUFFER);
        socket.connect(peer).await?;
        Ok(Self {
            socket: BatchSocket::new(socket)?,
            peer,
            rx: std::sync::Mutex::new((RecvBatch::new(UDP_LINK_RECV_BUFFERS), VecDeque::new())),
        })
    }

    /// The socket's receive and send buffer sizes as the kernel reports them (Linux reports
    /// twice the size it granted, the bookkeeping overhead included).
    pub fn buffer_sizes(&self) -> std::io::Result<(usize, usize)> {
        let sock = socket2::SockRef::from(self.socket.socket());
        Ok((sock.recv_buffer_size()?, sock.send_buffer_size()?))
    }

    /// Moves what is queued on the socket into `pending` without waiting, keeping only
    /// messages this link could carry; `WouldBlock` when nothing was queued.
    fn take_queued(
        &self,
        batch: &mut RecvBatch,
        pending: &mut VecDeque<Vec<u8>>,
    ) -> std::io::Result<()> {
        self.socket.try_recv(batch)?;
        // Longer than any message: not from the other end of this link.
        pending.extend(
            batch
                .datagrams()
                .filter(|(_, d)| d.len() <= MEMORY_LINK_MAX_PAYLOAD)
                .map(|(_, d)| d.to_vec()),
        );
        Ok(())
    }
}

/// Receive buffers a [`UdpLink`] reads into per system call.
const UDP_LINK_RECV_BUFFERS: usize = 16;

/// The most messages a [`UdpLink`] sends in one system call.
const UDP_LINK_SEGMENTS: usize = 32;

/// The socket buffer size a [`UdpLink`] asks for, in bytes: the same as a session's socket.
pub const UDP_LINK_BUFFER: usize = 4 << 20;

impl DatagramLink for UdpLink {
    /// The same maximum as a session through a relay, so that both carry the same messages.
    fn max_payload(&self) -> usize {
        MEMORY_LINK_MAX_PAYLOAD
    }

    async fn send(&self, message: &[u8]) -> Result<(), LinkError> {
        self.send_segments(message, message.len()).await
    }

    fn max_segments(&self) -> usize {
        UDP_LINK_SEGMENTS
    }

    async fn send_segments(&self, contents: &[u8], segment: usize) -> Result<(), LinkError> {
        let segment = segment.max(1);
        if let Some(message) = contents.chunks(segment).next() {
            LinkError::check_len(message, MEMORY_LINK_MAX_PAYLOAD)?;
        }
        match self.socket.send(self.peer, contents, segment).await {
            // Like a relay session, the link may lose a message; it does not fail for it.
            Ok(()) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(LinkError::Closed(format!("UDP send failed: {e}"))),
        }
    }

    async fn recv(&self) -> Result<Vec<u8>, LinkError> {
        let mut out = Vec::with_capacity(1);
        self.recv_batch(&mut out, 1).await?;
        out.pop()
            .ok_or_else(|| LinkError::Closed("UDP receive returned nothing".into()))
    }

    async fn recv_batch(&self, out: &mut Vec<Vec<u8>>, limit: usize) -> Result<usize, LinkError> {
        let limit = limit.max(1);
        loop {
            {
                let mut guard = self.rx.lock().unwrap_or_else(|e| e.into_inner());
                let (batch, pending) = &mut *guard;
                if pending.is_empty() {
                    match self.take_queued(batch, pending) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if is_transient(&e) => {}
                        Err(e) => {
                            return Err(LinkError::Closed(format!("UDP receive failed: {e}")));
                        }
                    }
                }
                let n = pending.len().min(limit);
                if n > 0 {
                    out.extend(pending.drain(..n));
                    return Ok(n);
                }
            }
            self.socket
                .socket()
                .readable()
                .await
                .map_err(|e| LinkError::Closed(format!("UDP receive failed: {e}")))?;
        }
    }
}

/// Errors of a UDP socket that lose one datagram rather than end the link: the other end's
/// port not (yet) open, a full queue.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(libc::ENOBUFS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_perfect_link_carries_everything_in_order_both_ways() {
        let (a, b) = memory_pair(Impairment::NONE);
        for i in 0..100u8 {
            a.send(&[i]).await.expect("send");
            b.send(&[i, i]).await.expect("send");
        }
        for i in 0..100u8 {
            assert_eq!(b.recv().await.expect("recv"), vec![i]);
            assert_eq!(a.recv().await.expect("recv"), vec![i, i]);
        }
    }

    #[tokio::test]
    async fn an_impaired_link_loses_and_reorders_about_as_asked() {
        let (a, b) = memory_pair(Impairment {
            loss: 0.05,
            reorder: 0.05,
            delay: Duration::from_millis(1),
            seed: 7,
        });
        let sent = 2000u32;
        for i in 0..sent {
            a.send(&i.to_be_bytes()).await.expect("send");
        }
        drop(a);
        let mut got = Vec::new();
        while let Ok(m) = b.recv().await {
            got.push(u32::from_be_bytes(m.try_into().expect("4 bytes")));
        }
        let lost = sent as usize - got.len();
        assert!((40..=160).contains(&lost), "lost {lost} of {sent}");
        let out_of_order = got.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(out_of_order >= 40, "only {out_of_order} reordered");
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), sent as usize - lost, "a message was duplicated");
    }

    #[tokio::test]
    async fn a_message_too_long_is_refused_and_a_dropped_end_closes_the_link() {
        let (a, b) = memory_pair(Impairment::NONE);
        let long = vec![0; MEMORY_LINK_MAX_PAYLOAD + 1];
        assert!(matches!(
            a.send(&long).await,
            Err(LinkError::TooLong { .. })
        ));
        drop(b);
        assert!(matches!(a.recv().await, Err(LinkError::Closed(_))));
        // The first send after the drop may still be accepted by the link's carrier, which then
        // finds the other end gone and stops; the ones after it are refused.
        let mut refused = false;
        for _ in 0..10 {
            if let Err(LinkError::Closed(_)) = a.send(b"x").await {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused, "sends to a dropped end were accepted");
    }

    #[tokio::test]
    async fn a_batch_receive_takes_at_most_its_limit_in_order_then_reports_the_close() {
        let (a, b) = memory_pair(Impairment::NONE);
        for i in 0..10u8 {
            a.send(&[i]).await.expect("send");
        }
        drop(a);
        let mut got = Vec::new();
        loop {
            let before = got.len();
            match b.recv_batch(&mut got, 3).await {
                Ok(n) => {
                    assert!((1..=3).contains(&n), "{n} messages in a batch of 3");
                    assert_eq!(got.len(), before + n);
                }
                Err(LinkError::Closed(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    /// Two ends of a [`UdpLink`] on loopback, each connected to the other.
    async fn udp_pair() -> (UdpLink, UdpLink) {
        let a = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let b = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (a_addr, b_addr) = (a.local_addr().expect("addr"), b.local_addr().expect("addr"));
        let a = UdpLink::connect(a, b_addr).await.expect("connect");
        let b = UdpLink::connect(b, a_addr).await.expect("connect");
        (a, b)
    }

    #[tokio::test]
    async fn a_udp_batch_receive_takes_what_is_queued_up_to_its_limit() {
        let (a, b) = udp_pair().await;
        for i in 0..5u8 {
            a.send(&[i]).await.expect("send");
        }
        // Loopback queues each datagram at the receiving socket before `send` returns.
        let mut got = Vec::new();
        assert_eq!(b.recv_batch(&mut got, 3).await.expect("recv"), 3);
        assert_eq!(b.recv_batch(&mut got, 3).await.expect("recv"), 2);
        assert_eq!(got, (0..5u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_udp_link_carries_messages_both_ways_and_survives_a_closed_port() {
        let (a, b) = udp_pair().await;
        a.send(b"ping").await.expect("send");
        assert_eq!(b.recv().await.expect("recv"), b"ping");
        b.send(b"pong").await.expect("send");
        assert_eq!(a.recv().await.expect("recv"), b"pong");
        // The buffers asked for are granted up to the kernel's maximum (which Linux reports
        // doubled).
        let (rcv, snd) = a.buffer_sizes().expect("buffer sizes");
        let max = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        if let (Some(rmem_max), Some(wmem_max)) = (max("rmem_max"), max("wmem_max")) {
            assert!(
                rcv >= UDP_LINK_BUFFER.min(rmem_max) * 2,
                "{rcv} of {rmem_max}"
            );
            assert!(
                snd >= UDP_LINK_BUFFER.min(wmem_max) * 2,
                "{snd} of {wmem_max}"
            );
        }
        drop(b);
        // The other end's port is closed now: sends lose their message but do not fail.
        for _ in 0..3 {
            a.send(b"anyone?")
                .await
                .expect("a lost message is not an error");
        }
    }
}
