//! The UDP tunnel: carries a local UDP application's datagrams through a peer session, so
//! any UDP program (a game, a video stream, WireGuard) can use Ferry unchanged.
//!
//! The two ends of a tunnel play different parts:
//!
//! - [`TunnelMode::Listen`] opens a UDP socket on a local address, where the application
//!   sends its datagrams as if to its server. Each one goes through the link as one message.
//!   What comes back through the link goes to the application address that sent most recently
//!   (one application at a time; a new sender takes over the replies).
//! - [`TunnelMode::Connect`] sends what arrives through the link to the application's server
//!   at a local address, from a socket connected to it (so only that address's replies are
//!   taken), and sends the replies back through the link.
//!
//! A datagram is carried whole or not at all: one longer than the link's
//! [`max_payload`](DatagramLink::max_payload) (1427 bytes through an IPv4 relay address, 1407
//! through an IPv6 one: [`crate::sizes`]) is dropped and counted in
//! [`TunnelCounts::dropped_too_long`], never split. Applications with their own MTU setting
//! (WireGuard's `MTU`) should keep their datagrams within it. Like UDP itself, the tunnel neither retransmits nor
//! reorders; the application keeps whatever loss handling it has.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

use crate::link::{DatagramLink, LinkError};

/// Which end of the tunnel this is (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelMode {
    /// Take a local application's datagrams at this address; answer the latest sender.
    Listen(SocketAddr),
    /// Deliver to the local application listening at this address.
    Connect(SocketAddr),
}

/// Why a tunnel stopped.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The local socket could not be opened.
    #[error("cannot open the tunnel's local socket for {addr}: {source}")]
    Open {
        /// The address given.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The local socket failed in a way that retrying cannot mend.
    #[error("the tunnel's local socket failed: {0}")]
    Local(std::io::Error),
    /// The session under the tunnel ended.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// What a tunnel has carried and dropped, updated while it runs.
#[derive(Debug, Default)]
pub struct TunnelStats {
    to_peer_datagrams: AtomicU64,
    to_peer_bytes: AtomicU64,
    from_peer_datagrams: AtomicU64,
    from_peer_bytes: AtomicU64,
    dropped_too_long: AtomicU64,
    dropped_empty: AtomicU64,
    dropped_no_application: AtomicU64,
    local_errors: AtomicU64,
}

/// A copy of [`TunnelStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelCounts {
    /// Datagrams from the local application sent through the link.
    pub to_peer_datagrams: u64,
    /// Their bytes.
    pub to_peer_bytes: u64,
    /// Datagrams from the link delivered to the local application.
    pub from_peer_datagrams: u64,
    /// Their bytes.
    pub from_peer_bytes: u64,
    /// Local datagrams dropped for being longer than the link carries.
    pub dropped_too_long: u64,
    /// Empty local datagrams, dropped: an empty message on the link is the end-to-end
    /// layer's key confirmation (protocol.md §9.1.1), which the other end never delivers.
    pub dropped_empty: u64,
    /// Datagrams from the link dropped on the listening end because no local application had
    /// sent anything yet, so there was nobody to give them to.
    pub dropped_no_application: u64,
    /// Local send or receive errors that dropped one datagram (for example the application's
    /// port was closed: ICMP port unreachable).
    pub local_errors: u64,
}

impl TunnelStats {
    /// The counts now.
    pub fn snapshot(&self) -> TunnelCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TunnelCounts {
            to_peer_datagrams: get(&self.to_peer_datagrams),
            to_peer_bytes: get(&self.to_peer_bytes),
            from_peer_datagrams: get(&self.from_peer_datagrams),
            from_peer_bytes: get(&self.from_peer_bytes),
            dropped_too_long: get(&self.dropped_too_long),
            dropped_empty: get(&self.dropped_empty),
            dropped_no_application: get(&self.dropped_no_application),
            local_errors: get(&self.local_errors),
        }
    }
}

fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Runs one end of a tunnel over `link` until the link closes (returned as
/// [`TunnelError::Link`]) or the local socket fails for good. `stats` is updated as it goes.
pub async fn run<L: DatagramLink>(
    link: Arc<L>,
    mode: TunnelMode,
    stats: Arc<TunnelStats>,
) -> Result<(), TunnelError> {
    let socket = Arc::new(open(mode).await?);
    // Where the link's messages go: the application on the connecting end; on the listening
    // end, the latest local sender (none until one has sent).
    let app = Arc::new(Mutex::new(match mode {
        TunnelMode::Listen(_) => None,
        TunnelMode::Connect(addr) => Some(addr),
    }));
    let outbound = local_to_link(&socket, &*link, mode, &app, &stats);
    let inbound = link_to_local(&socket, &*link, &app, &stats);
    tokio::select! {
        result = outbound => result,
        result = inbound => result,
    }
}

/// The tunnel's local socket: bound to the listening address, or connected to the
/// application from an ephemeral port of the same family.
async fn open(mode: TunnelMode) -> Result<UdpSocket, TunnelError> {
    let result = match mode {
        TunnelMode::Listen(addr) => UdpSocket::bind(addr).await,
        TunnelMode::Connect(addr) => {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            match UdpSocket::bind(any).await {
                Ok(socket) => socket.connect(addr).await.map(|()| socket),
                Err(e) => Err(e),
            }
        }
    };
    let addr = match mode {
        TunnelMode::Listen(addr) | TunnelMode::Connect(addr) => addr,
    };
    result.map_err(|source| TunnelError::Open { addr, source })
}

/// Whether a local socket error drops one datagram (and the tunnel goes on) rather than
/// ending it: what an unreachable or closed application port, or a full buffer, reports.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | HostUnreachable | NetworkUnreachable | WouldBlock
    ) || e.raw_os_error() == Some(libc::ENOBUFS)
}

async fn local_to_link<L: DatagramLink>(
    socket: &UdpSocket,
    link: &L,
    mode: TunnelMode,
    app: &Mutex<Option<SocketAddr>>,
    stats: &TunnelStats,
) -> Result<(), TunnelError> {
    let max = link.max_payload();
    // One byte more than the link carries, so that a longer datagram shows as longer.
    let mut buf = vec![0u8; max + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) if transient(&e) => {
                count(&stats.local_errors, 1);
                continue;
            }
            Err(e) => return Err(TunnelError::Local(e)),
        };
        if len > max {
            count(&stats.dropped_too_long, 1);
            continue;
        }
        if len == 0 {
            count(&stats.dropped_empty, 1);
            continue;
        }
        if let TunnelMode::Listen(_) = mode
            && let Ok(mut app) = app.lock()
        {
            *app = Some(from);
        }
        link.send(&buf[..len]).await?;
        count(&stats.to_peer_datagrams, 1);
        count(&stats.to_peer_bytes, len);
    }
}

async fn link_to_local<L: DatagramLink>(
    socket: &UdpSocket,
    link: &L,
    app: &Mutex<Option<SocketAddr>>,
    stats: &TunnelStats,
) -> Result<(), TunnelError> {
    loop {
        let message = link.recv().await?;
        let to = app.lock().ok().and_then(|app| *app);
        let Some(to) = to else {
            count(&stats.dropped_no_application, 1);
            continue;
        };
        match socket.send_to(&message, to).await {
            Ok(_) => {
                count(&stats.from_peer_datagrams, 1);
                count(&stats.from_peer_bytes, message.len());
            }
            Err(e) if transient(&e) => count(&stats.local_errors, 1),
            Err(e) => return Err(TunnelError::Local(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::link::{Impairment, MEMORY_LINK_MAX_PAYLOAD, memory_pair};

    const WAIT: Duration = Duration::from_secs(5);

    /// A free loopback UDP port (bound, then released).
    async fn free_port() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.local_addr().expect("local address")
    }

    /// A UDP echo server on loopback; returns its address.
    async fn echo_server() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("local address");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// Both ends of a tunnel over a perfect in-memory link: the listening end's address, the
    /// two ends' statistics.
    async fn tunnel_to(server: SocketAddr) -> (SocketAddr, Arc<TunnelStats>, Arc<TunnelStats>) {
        let (a, b) = memory_pair(Impairment::NONE);
        let listen = free_port().await;
        let (listen_stats, connect_stats) = (Arc::default(), Arc::default());
        tokio::spawn(run(
            Arc::new(a),
            TunnelMode::Listen(listen),
            Arc::clone(&listen_stats),
        ));
        tokio::spawn(run(
            Arc::new(b),
            TunnelMode::Connect(server),
            Arc::clone(&connect_stats),
        ));
        (listen, listen_stats, connect_stats)
    }

    /// Sends `message` to `to` from `client` until an answer comes (the tunnel's listening
    /// socket may not be bound at the first try); returns the answer.
    async fn ask(client: &UdpSocket, to: SocketAddr, message: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            client.send_to(message, to).await.expect("send");
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(100), client.recv_from(&mut buf)).await
            {
                return buf[..n].to_vec();
            }
            assert!(tokio::time::Instant::now() < deadline, "no answer");
        }
    }

    #[tokio::test]
    async fn an_application_reaches_its_server_through_the_tunnel_and_hears_back() {
        let server = echo_server().await;
        let (listen, listen_stats, connect_stats) = tunnel_to(server).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        for i in 0..50u32 {
            let message = format!("datagram {i}").into_bytes();
            let answer = ask(&client, listen, &message).await;
            assert_eq!(answer, message);
        }
        let (l, c) = (listen_stats.snapshot(), connect_stats.snapshot());
        assert!(
            l.to_peer_datagrams >= 50 && l.from_peer_datagrams >= 50,
            "{l:?}"
        );
        assert!(
            c.to_peer_datagrams >= 50 && c.from_peer_datagrams >= 50,
            "{c:?}"
        );
        assert_eq!(l.dropped_too_long + c.dropped_too_long, 0);
    }

    #[tokio::test]
    async fn a_datagram_the_link_cannot_carry_is_dropped_and_counted_and_the_tunnel_goes_on() {
        let server = echo_server().await;
        let (listen, listen_stats, _) = tunnel_to(server).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // The largest datagram the link carries goes through whole.
        let largest = vec![7u8; MEMORY_LINK_MAX_PAYLOAD];
        assert_eq!(ask(&client, listen, &largest).await, largest);
        client
            .send_to(&vec![1u8; MEMORY_LINK_MAX_PAYLOAD + 1], listen)
            .await
            .expect("send");
        assert_eq!(ask(&client, listen, b"after").await, b"after");
        assert_eq!(listen_stats.snapshot().dropped_too_long, 1);
    }

    #[tokio::test]
    async fn an_empty_datagram_is_dropped_and_counted_and_not_sent() {
        let server = echo_server().await;
        let (listen, listen_stats, _) = tunnel_to(server).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        assert_eq!(ask(&client, listen, b"before").await, b"before");
        let sent = listen_stats.snapshot().to_peer_datagrams;
        client.send_to(b"", listen).await.expect("send");
        assert_eq!(ask(&client, listen, b"after").await, b"after");
        let counts = listen_stats.snapshot();
        assert_eq!(counts.dropped_empty, 1, "{counts:?}");
        assert_eq!(
            counts.to_peer_datagrams,
            sent + 1,
            "only \"after\" went: {counts:?}"
        );
    }

    #[tokio::test]
    async fn replies_go_to_the_latest_local_sender() {
        let server = echo_server().await;
        let (listen, _, _) = tunnel_to(server).await;
        let first = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let second = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        assert_eq!(ask(&first, listen, b"one").await, b"one");
        assert_eq!(ask(&second, listen, b"two").await, b"two");
    }

    #[tokio::test]
    async fn the_listening_end_drops_and_counts_what_arrives_before_any_application() {
        let (a, b) = memory_pair(Impairment::NONE);
        let stats = Arc::new(TunnelStats::default());
        let listen = free_port().await;
        tokio::spawn(run(
            Arc::new(a),
            TunnelMode::Listen(listen),
            Arc::clone(&stats),
        ));
        b.send(b"nobody asked").await.expect("send");
        let deadline = tokio::time::Instant::now() + WAIT;
        while stats.snapshot().dropped_no_application == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_closed_application_port_is_counted_and_a_closed_link_ends_the_tunnel() {
        let (a, b) = memory_pair(Impairment::NONE);
        let stats = Arc::new(TunnelStats::default());
        // Nobody listens here: sends to it draw ICMP port unreachable.
        let closed = free_port().await;
        let tunnel = tokio::spawn(run(
            Arc::new(a),
            TunnelMode::Connect(closed),
            Arc::clone(&stats),
        ));
        let deadline = tokio::time::Instant::now() + WAIT;
        while stats.snapshot().local_errors == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no local error");
            b.send(b"anyone?").await.expect("send");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(b);
        let ended = tokio::time::timeout(WAIT, tunnel)
            .await
            .expect("the tunnel ends when its link closes")
            .expect("no panic");
        assert!(matches!(
            ended,
            Err(TunnelError::Link(LinkError::Closed(_)))
        ));
    }

    #[tokio::test]
    async fn an_address_that_cannot_be_bound_is_named() {
        let (a, _b) = memory_pair(Impairment::NONE);
        // 198.18.255.254 is not on this host (benchmarking range), so binding to it fails.
        let addr: SocketAddr = "198.18.255.254:9".parse().expect("address");
        let err = run(Arc::new(a), TunnelMode::Listen(addr), Arc::default())
            .await
            .expect_err("cannot bind");
        assert!(err.to_string().contains("198.18.255.254:9"), "{err}");
    }
}
