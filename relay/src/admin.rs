//! The admin listener: `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1, bound to
//! loopback by default. A tiny blocking server on its own thread: one request per connection,
//! strict parsing, bounded head size, read and write timeouts, a cap on concurrent
//! connections. It never logs request contents.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, prometheus_text};

use crate::metrics::{self, Families};

/// What the admin server serves, shared with the relay.
pub struct AdminState {
    /// `/readyz` says ready while this is set.
    pub ready: AtomicBool,
    render: Box<dyn Fn() -> String + Send + Sync>,
    /// Requests served, by route and status (see [`AdminState::requests`]).
    counts: [AtomicU64; ROUTES.len() * STATUSES.len()],
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// Routes counted in `ferry_admin_requests_total`.
pub const ROUTES: [&str; 4] = ["/metrics", "/healthz", "/readyz", "other"];
/// Statuses counted in `ferry_admin_requests_total`.
pub const STATUSES: [u16; 7] = [200, 400, 404, 405, 408, 431, 503];

impl AdminState {
    /// State whose `/metrics` page comes from `render`; not ready yet.
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self {
            ready: AtomicBool::new(false),
            render: Box::new(render),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn count(&self, route: usize, status: u16) {
        if let Some(s) = STATUSES.iter().position(|&x| x == status) {
            self.counts[route * STATUSES.len() + s].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(route, status, count)` for every combination served so far.
    pub fn requests(&self) -> Vec<(&'static str, u16, u64)> {
        let mut out = Vec::new();
        for (r, route) in ROUTES.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let n = self.counts[r * STATUSES.len() + s].load(Ordering::Relaxed);
                if n > 0 {
                    out.push((*route, *status, n));
                }
            }
        }
        out
    }
}

/// Timeouts and limits of the admin server.
#[derive(Clone, Copy, Debug)]
pub struct AdminOptions {
    /// A client that sends nothing for this long is dropped.
    pub read_timeout: Duration,
    /// Writing a response may take at most this long.
    pub write_timeout: Duration,
    /// Connections served at once; more are closed right away.
    pub max_connections: usize,
}

impl Default for AdminOptions {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Serves `state` on `addr` with default options.
    pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> io::Result<Self> {
        Self::start_with(addr, state, AdminOptions::default())
    }

    /// Serves `state` on `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub fn start_with(
        addr: SocketAddr,
        state: Arc<AdminState>,
        options: AdminOptions,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("ferry-admin".into())
                .spawn(move || accept_loop(listener, state, options, stop))?
        };
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the accept thread.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock `accept` with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    state: Arc<AdminState>,
    options: AdminOptions,
    stop: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(stream) = stream else { continue };
        if active.load(Ordering::Relaxed) >= options.max_connections {
            // Over the cap: answer 503 at once rather than queue behind slow clients.
            state.count(3, 503);
            refuse_busy(&stream);
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (conn_state, conn_active) = (Arc::clone(&state), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("ferry-admin-conn".into())
            .spawn(move || {
                let _ = serve(&stream, &conn_state, options);
                linger(&stream);
                conn_active.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Reads a request head (up to the blank line) within `timeout` for the *whole* head, so a
/// client trickling a byte at a time is dropped as soon as a silent one. `Err(status)` for a
/// bad, oversized or late head.
fn read_head(mut stream: &TcpStream, timeout: Duration) -> Result<Vec<u8>, u16> {
    let deadline = std::time::Instant::now() + timeout;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(431);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(408);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(400),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(408);
            }
            Err(_) => return Err(400),
        }
    }
}

/// Answers 503 from the accept thread without blocking it: the request (if it has arrived)
/// is drained without waiting, so closing does not reset the connection.
fn refuse_busy(stream: &TcpStream) {
    let _ = stream.set_nonblocking(true);
    let mut reader = stream;
    let _ = reader.read(&mut [0u8; MAX_HEAD]);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = respond(
        stream,
        503,
        "text/plain; charset=utf-8",
        b"busy\n",
        false,
        &[("Retry-After", "1")],
    );
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// How long a connection may linger after its answer, in all: a client that keeps sending a
/// byte now and then cannot hold one of the [`AdminOptions::max_connections`] slots longer.
pub const LINGER_LIMIT: Duration = Duration::from_millis(500);

/// Closes gracefully: stop sending, then read (and discard) what the client still sends, for
/// at most [`LINGER_LIMIT`] and 64 KiB, so that closing with unread input does not reset the
/// connection and destroy the response before the client has read it.
fn linger(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = std::time::Instant::now() + LINGER_LIMIT;
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let mut reader = stream;
    while left > 0 {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            break;
        }
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

fn serve(stream: &TcpStream, state: &AdminState, options: AdminOptions) -> io::Result<()> {
    stream.set_read_timeout(Some(options.read_timeout))?;
    stream.set_write_timeout(Some(options.write_timeout))?;
    let head = match read_head(stream, options.read_timeout) {
        Ok(head) => head,
        Err(status) => {
            state.count(3, status);
            return respond(stream, status, "text/plain", b"", false, &[]);
        }
    };
    let Some((method, path)) = parse_request_line(&head) else {
        state.count(3, 400);
        return respond(stream, 400, "text/plain", b"bad request\n", false, &[]);
    };
    let route = ROUTES.iter().position(|r| *r == path).unwrap_or(3);
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        state.count(route, 405);
        let allow = [("Allow", "GET, HEAD")];
        return respond(
            stream,
            405,
            "text/plain",
            b"method not allowed\n",
            false,
            &allow,
        );
    }
    let (status, body): (u16, Vec<u8>) = match path {
        "/metrics" => (200, metrics_page(state).into_bytes()),
        "/healthz" => (200, b"ok\n".to_vec()),
        "/readyz" if state.ready.load(Ordering::Relaxed) => (200, b"ready\n".to_vec()),
        "/readyz" => (503, b"not ready\n".to_vec()),
        _ => (404, b"not found\n".to_vec()),
    };
    state.count(route, status);
    let content_type = match path {
        "/metrics" => prometheus_text::CONTENT_TYPE,
        _ => "text/plain; charset=utf-8",
    };
    respond(stream, status, content_type, &body, head_only, &[])
}

/// The method and path (the target without its query) of the request line that starts
/// `head`, or `None` when that line is not `METHOD SP /target SP HTTP/1.x CRLF` with METHOD
/// an HTTP token (RFC 9110 §5.6.2: one or more of the characters [`is_token_char`] accepts),
/// which is a 400. Public so that the fuzz target `admin_head` can call it.
#[doc(hidden)]
pub fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    let line = std::str::from_utf8(&head[..line_end]).unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(is_token_char)
        && matches!(version, "HTTP/1.1" | "HTTP/1.0")
        && target.starts_with('/');
    let path = target.split('?').next().unwrap_or(target);
    well_formed.then_some((method, path))
}

/// Whether `byte` may appear in an HTTP token such as a method (RFC 9110 §5.6.2 `tchar`).
#[doc(hidden)]
pub fn is_token_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// The relay's page followed by the admin server's own request counts.
fn metrics_page(state: &AdminState) -> String {
    let mut page = (state.render)();
    page.push_str(&metrics::page(Requests(state.requests())));
    page
}

/// `ferry_admin_requests_total`: `(route, status, count)` as [`AdminState::requests`] lists
/// them.
#[derive(Debug)]
struct Requests(Vec<(&'static str, u16, u64)>);

impl Collector for Requests {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        Families(encoder).counters(
            "ferry_admin_requests",
            "Requests to the admin listener, by route and status.",
            self.0.iter().map(|&(route, status, n)| {
                (
                    [("route", route.to_owned()), ("status", status.to_string())],
                    n,
                )
            }),
        )
    }
}

fn respond(
    mut stream: &TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}
