//! A lingering close, as web servers do it (nginx's `lingering_close`).
//!
//! An answer given before the request's body was read (401, 413, 415, 429...) ends the
//! connection. If the gateway then simply closed its socket while the client was still
//! sending that body, the kernel would answer the unread bytes with a TCP reset: the client's
//! next write fails (`EPIPE`, `ECONNRESET`), and a client that sends its whole body before it
//! reads the answer, as most do, reports a reset instead of the answer. (Closing with unread
//! data also discards whatever of the answer the kernel had not sent yet.)
//!
//! So the connection's TCP stream is wrapped in a [`LingerStream`]. When the connection ends
//! after such an answer (hyper has sent it, and TLS's close_notify, and shut the sending
//! side), the wrapper hands the stream back, and [`linger`] reads and discards what the
//! client still sends until it closes its side, for at most [`LINGER_TIME`] and
//! [`LINGER_BYTES`]; only then is the socket closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Longest a connection lingers after its last answer.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Most bytes a lingering connection reads and discards (the largest body the config allows,
/// `server.max_body_bytes`, is 1 MiB).
pub const LINGER_BYTES: usize = 1 << 20;

/// A connection's TCP stream, handed back through a channel when it is dropped with
/// [`LingerStream::wanted`] set, for [`linger`].
#[derive(Debug)]
pub struct LingerStream {
    stream: Option<TcpStream>,
    wanted: Arc<AtomicBool>,
    back: Option<oneshot::Sender<TcpStream>>,
}

impl LingerStream {
    /// Wraps `stream`; the receiver gets it back if the connection ends wanting to linger.
    pub fn new(stream: TcpStream) -> (Self, oneshot::Receiver<TcpStream>) {
        let (back, receiver) = oneshot::channel();
        let wrapped = Self {
            stream: Some(stream),
            wanted: Arc::new(AtomicBool::new(false)),
            back: Some(back),
        };
        (wrapped, receiver)
    }

    /// The flag an answer sets when it ends the connection before the request's body was read.
    pub fn wanted(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.wanted)
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self.stream.as_mut() {
            Some(stream) => Ok(Pin::new(stream)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Drop for LingerStream {
    fn drop(&mut self) {
        if self.wanted.load(Ordering::Relaxed)
            && let (Some(stream), Some(back)) = (self.stream.take(), self.back.take())
        {
            // The receiver is gone only when the connection's task is: then the stream closes.
            let _ = back.send(stream);
        }
    }
}

impl AsyncRead for LingerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for LingerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => stream.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Shuts `stream`'s sending side (if hyper has not) and reads and discards what the client
/// still sends, until it closes its side, fails, or [`LINGER_TIME`] or [`LINGER_BYTES`] is
/// reached; then the stream is closed.
pub async fn linger(mut stream: TcpStream) {
    // Already shut after a TLS close_notify; a second shutdown is harmless either way.
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            // The client's end of the body, an error, or the time is up.
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of loopback TCP streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn the_stream_comes_back_only_when_lingering_is_wanted() {
        let (_client, server) = pair().await;
        let (wrapped, back) = LingerStream::new(server);
        drop(wrapped);
        assert!(back.await.is_err(), "not wanted: closed with the wrapper");

        let (_client, server) = pair().await;
        let (wrapped, back) = LingerStream::new(server);
        wrapped.wanted().store(true, Ordering::Relaxed);
        drop(wrapped);
        assert!(back.await.is_ok(), "wanted: handed back");
    }

    #[tokio::test]
    async fn lingering_reads_what_the_client_still_sends_then_ends_on_its_eof() {
        let (mut client, server) = pair().await;
        let lingering = tokio::spawn(linger(server));
        // The gateway's side is shut: the client reads its end, and may still send.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        for _ in 0..64 {
            client.write_all(&[b' '; 4096]).await.unwrap();
        }
        client.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), lingering)
            .await
            .expect("the client's EOF ends lingering at once")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_stops_at_its_time_limit() {
        let (_client, server) = pair().await;
        let started = tokio::time::Instant::now();
        linger(server).await;
        assert_eq!(started.elapsed(), LINGER_TIME);
    }
}
