//! Batched UDP input and output for the peer's sockets: many datagrams per system call.
//!
//! A bulk transfer through a relay is bound by CPU on small machines, and most of that CPU was
//! one system call (and one pass through the kernel's UDP stack) per datagram. The kernel offers
//! two remedies that cost the other end nothing:
//!
//! - **Sending** a run of equal-sized datagrams as one buffer with a segment size (UDP
//!   segmentation offload, GSO): one `sendmsg`, one route lookup, and the split into datagrams
//!   happens as late as the device allows. The datagrams on the wire are exactly those a loop of
//!   single sends would give.
//! - **Receiving** with `recvmmsg` (up to [`quinn_udp::BATCH_SIZE`] buffers a call) and UDP
//!   receive offload (GRO), which hands over a run of datagrams from one source as one buffer
//!   with their common size ([`quinn_udp::RecvMeta::stride`]).
//!
//! Both go through `quinn-udp`, which keeps the `unsafe` system-call code this crate denies,
//! falls back to single datagrams where the kernel or the device refuses offload, and sets the
//! don't-fragment bit (protocol.md: IP fragments are not part of the protocol).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The most bytes one offloaded send carries: the kernel refuses a buffer longer than an IP
/// packet can be (64 KiB) less the headers.
const MAX_OFFLOAD_BYTES: usize = 65_000;

/// The size of each receive buffer: large enough for a whole GRO run.
const RECV_BUFFER: usize = 64 * 1024;

/// A tokio UDP socket with batched sends and receives.
#[derive(Debug)]
pub(crate) struct BatchSocket {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl BatchSocket {
    /// Wraps `socket` and turns on what batching needs (GRO where the kernel has it).
    pub(crate) fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        Ok(Self { socket, state })
    }

    /// The socket itself, for single sends and addresses.
    pub(crate) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// How many datagrams of `segment` bytes one offloaded send may carry here (at least 1).
    fn segments_per_send(&self, segment: usize) -> usize {
        self.state
            .max_gso_segments()
            .min(MAX_OFFLOAD_BYTES / segment.max(1))
            .max(1)
    }

    /// Sends `contents` to `to` as datagrams of `segment` bytes each, the last one possibly
    /// shorter, in as few system calls as the kernel allows. Waits while the socket's send
    /// buffer is full. An error means some of the datagrams were not sent.
    pub(crate) async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        let segment = segment.clamp(1, contents.len().max(1));
        let per_send = self.segments_per_send(segment);
        for run in contents.chunks(per_send * segment) {
            match self.send_run(to, run, segment).await {
                Ok(()) => {}
                // quinn-udp turns offload off for good when the device refuses it (EIO or
                // EINVAL from a kernel or driver without UDP GSO): send this run one by one.
                Err(_) if run.len() > segment && self.state.max_gso_segments() == 1 => {
                    for datagram in run.chunks(segment) {
                        self.send_run(to, datagram, segment).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One system call for `run`: a single datagram, or several of `segment` bytes offloaded.
    async fn send_run(&self, to: SocketAddr, run: &[u8], segment: usize) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: run,
            segment_size: (run.len() > segment).then_some(segment),
            src_ip: None,
        };
        self.socket
            .async_io(Interest::WRITABLE, || {
                self.state
                    .try_send(UdpSockRef::from(&self.socket), &transmit)
            })
            .await
    }

    /// Takes what is queued into `batch` without waiting; `WouldBlock` when nothing is.
    pub(crate) fn try_recv(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.count = 0;
        let mut slices: Vec<IoSliceMut<'_>> = batch
            .buffers
            .iter_mut()
            .map(|b| IoSliceMut::new(b))
            .collect();
        let count = self.socket.try_io(Interest::READABLE, || {
            self.state
                .recv(UdpSockRef::from(&self.socket), &mut slices, &mut batch.meta)
        })?;
        batch.count = count;
        Ok(())
    }
}

/// Receive buffers for [`BatchSocket::try_recv`], and what the last receive put in them.
pub(crate) struct RecvBatch {
    buffers: Vec<Box<[u8]>>,
    meta: Vec<RecvMeta>,
    count: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("buffers", &self.buffers.len())
            .field("count", &self.count)
            .finish()
    }
}

/// No buffers: what the driver leaves in a batch's place while it works on the datagrams.
impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            buffers: Vec::new(),
            meta: Vec::new(),
            count: 0,
        }
    }
}

impl RecvBatch {
    /// Room for `buffers` system-call buffers of 64 KiB (each one datagram, or a GRO run of
    /// them), at most [`quinn_udp::BATCH_SIZE`].
    pub(crate) fn new(buffers: usize) -> Self {
        let buffers = buffers.clamp(1, quinn_udp::BATCH_SIZE);
        Self {
            buffers: (0..buffers)
                .map(|_| vec![0u8; RECV_BUFFER].into_boxed_slice())
                .collect(),
            meta: vec![RecvMeta::default(); buffers],
            count: 0,
        }
    }

    /// The datagrams of the last receive, each with its source, in arrival order; a GRO run is
    /// split back into its datagrams.
    pub(crate) fn datagrams(&mut self) -> impl Iterator<Item = (SocketAddr, &mut [u8])> {
        self.buffers
            .iter_mut()
            .zip(&self.meta)
            .take(self.count)
            .flat_map(|(buffer, meta)| {
                let len = meta.len.min(buffer.len());
                buffer[..len]
                    .chunks_mut(meta.stride.max(1))
                    .map(move |datagram| (meta.addr, datagram))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (BatchSocket, BatchSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        (
            BatchSocket::new(a).expect("state"),
            BatchSocket::new(b).expect("state"),
        )
    }

    /// Receives until `want` datagrams have come, each with its source.
    async fn collect(socket: &BatchSocket, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut batch = RecvBatch::new(4);
        let mut got = Vec::new();
        while got.len() < want {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                socket.socket().readable(),
            )
            .await
            .expect("datagrams in time")
            .expect("readable");
            match socket.try_recv(&mut batch) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => other.expect("recv"),
            }
            got.extend(batch.datagrams().map(|(from, d)| (from, d.to_vec())));
        }
        got
    }

    #[tokio::test]
    async fn a_run_of_segments_arrives_as_the_same_datagrams_in_order() {
        let (a, b) = pair().await;
        let to = b.socket().local_addr().expect("addr");
        // 100 datagrams of 1000 bytes and a short last one: more than one offloaded send.
        let contents: Vec<u8> = (0..100_300u32).map(|i| (i % 251) as u8).collect();
        a.send(to, &contents, 1000).await.expect("send");
        let got = collect(&b, 101).await;
        let from = a.socket().local_addr().expect("addr");
        assert!(got.iter().all(|(source, _)| *source == from));
        let lengths: Vec<usize> = got.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(lengths[..100], [1000; 100]);
        assert_eq!(lengths[100], 300);
        let joined: Vec<u8> = got.into_iter().flat_map(|(_, d)| d).collect();
        assert_eq!(joined, contents);
    }

    #[tokio::test]
    async fn datagrams_of_different_sizes_and_sources_stay_apart() {
        let (a, b) = pair().await;
        let (c, _) = pair().await;
        let to = b.socket().local_addr().expect("addr");
        a.send(to, b"one", 3).await.expect("send");
        c.send(to, b"two!", 4).await.expect("send");
        a.send(to, b"three", 5).await.expect("send");
        let got = collect(&b, 3).await;
        let a_addr = a.socket().local_addr().expect("addr");
        let c_addr = c.socket().local_addr().expect("addr");
        assert_eq!(
            got,
            vec![
                (a_addr, b"one".to_vec()),
                (c_addr, b"two!".to_vec()),
                (a_addr, b"three".to_vec())
            ]
        );
        let mut batch = RecvBatch::new(2);
        assert_eq!(
            b.try_recv(&mut batch).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
        assert_eq!(batch.datagrams().count(), 0);
    }
}
