//! Runs the gateway: loads the config, opens the shared state, serves the public listener
//! (HTTPS, or plain HTTP on loopback when the config says so) and the admin listener, probes
//! the listed relays, reloads the config on SIGHUP, and shuts down gracefully on SIGTERM or
//! SIGINT.
//!
//! A reload is all or nothing, like the relay's: the file is read and validated in full
//! (every file it names loaded), then compared with the settings only a restart changes
//! ([`config::RestartSettings`]); if anything is wrong or needs a restart, every problem is
//! logged and the running config stays in force, untouched. Otherwise the new API keys,
//! revocations, relays, limits, trusted proxies, session settings, signing keys, TLS
//! certificate and admin token apply to the next request; connections and requests in flight
//! are not disturbed.
//!
//! Against slow or greedy clients: at most `server.max_connections` connections are served at
//! once (more wait in the kernel's backlog), the TLS handshake and the request head each have a
//! deadline, request heads are capped at 16 KiB and 64 headers, bodies at
//! `server.max_body_bytes`, and every request at `server.request_timeout_ms`. An answer given
//! before the request's body was read to its end says `Connection: close` and ends the
//! connection (`TrackedBody`), lingering until the client has sent the rest (`crate::linger`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt as _;

use crate::api::{self, App, ClientAddr};
use crate::config::{self, GatewayConfig, RestartSettings, StateBackend, Transport};
use crate::linger::{LingerStream, linger};
use crate::metrics::Metrics;
use crate::registry::{ProbeLines, Registry};
use crate::state::{MemoryState, State};

/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 64;
/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Loads `config_path` and runs the gateway until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = config::load(config_path)?;
    init_logging(&config.log_level);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-gateway")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn open_state(backend: &StateBackend) -> anyhow::Result<Arc<dyn State>> {
    match backend {
        StateBackend::Memory { max_sessions } => Ok(Arc::new(MemoryState::new(*max_sessions))),
        StateBackend::Redis {
            url,
            key_prefix,
            ca_pem,
            username,
            password,
        } => {
            let options = crate::redis_state::RedisOptions {
                url,
                ca_pem: ca_pem.as_deref(),
                username: username.as_deref(),
                password: password.as_ref().map(|p| p.0.as_str()),
            };
            let state = crate::redis_state::RedisState::connect_with(&options, key_prefix)
                .await
                .context("connecting to the Redis state backend (state.redis_url)")?;
            Ok(Arc::new(state))
        }
    }
}

/// Serves `config` until SIGTERM or SIGINT.
pub async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let server = config.server.clone();
    let admin_listen = config.admin.listen;
    let health = config.relay_health.clone();
    let state = open_state(&config.state).await?;
    let registry = Arc::new(Registry::new(&config.relays));
    let metrics = Arc::new(Metrics::default());
    let kid = config.signing.active.kid();
    let restart = config.restart_settings();
    let config_path = config.path.clone();
    let tls = match &server.transport {
        Transport::Tls(cfg) => Some(Arc::new(RwLock::new(Arc::clone(cfg)))),
        Transport::PlainLoopback => None,
    };
    let app = Arc::new(App::new(
        config,
        state,
        Arc::clone(&registry),
        Arc::clone(&metrics),
    )?);

    let public = TcpListener::bind(server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", server.listen))?;
    let admin = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("binding admin.listen {admin_listen}"))?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let scheme = match server.transport {
        Transport::Tls(_) => "https",
        Transport::PlainLoopback => "http",
    };
    // Installed before the ready line, so a SIGHUP from then on reloads instead of killing.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // Beyond loopback the admin listener speaks HTTPS with the server's certificate, so the
    // admin token never crosses a network in clear (the config refuses a non-loopback admin
    // listener without TLS).
    let admin_tls = match admin_addr.ip().to_canonical().is_loopback() {
        true => None,
        false => tls.clone(),
    };
    let admin_scheme = if admin_tls.is_some() { "https" } else { "http" };
    tracing::info!(%public_addr, %admin_addr, kid, scheme, admin_scheme, "ferry-gateway serving");
    // One machine-readable line for supervisors and tests.
    println!(
        "ferry-gateway listening public={scheme}://{public_addr} \
         admin={admin_scheme}://{admin_addr}"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(reload_on_hangup(
        hangups,
        config_path,
        restart,
        Arc::clone(&app),
        tls.clone(),
        stop_rx.clone(),
    ));
    if health.probe {
        let app = Arc::clone(&app);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut lines = ProbeLines::new();
            loop {
                app.probe_relays(&mut lines, health.timeout).await;
                tokio::select! {
                    _ = tokio::time::sleep(health.interval) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    let options = ConnOptions {
        tls,
        tls_handshake_timeout: server.tls_handshake_timeout,
        header_read_timeout: server.header_read_timeout,
        metrics: Arc::clone(&metrics),
        // Never more than the whole cap.
        per_address: Arc::new(PerAddress::new(
            server
                .max_connections_per_address
                .min(server.max_connections),
        )),
    };
    let public_task = tokio::spawn(accept_loop(
        public,
        api::public_router(Arc::clone(&app)),
        options.clone(),
        Arc::new(Semaphore::new(server.max_connections)),
        stop_rx.clone(),
    ));
    let admin_task = tokio::spawn(accept_loop(
        admin,
        api::admin_router(Arc::clone(&app)),
        ConnOptions {
            tls: admin_tls,
            // The public listener's per-address cap does not apply here: the admin
            // listener's own cap is its 64 connections.
            per_address: Arc::new(PerAddress::new(ADMIN_CONNECTIONS)),
            ..options
        },
        Arc::new(Semaphore::new(ADMIN_CONNECTIONS)),
        stop_rx,
    ));

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; draining requests in flight");
    let _ = stop_tx.send(true);
    let _ = public_task.await;
    let _ = admin_task.await;
    Ok(())
}

/// The TLS configuration in force; a reload replaces it for the next connections.
type LiveTls = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// Reloads the config at `path` on every SIGHUP until `stop` (see the module doc).
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    path: PathBuf,
    running: RestartSettings,
    app: Arc<App>,
    tls: Option<LiveTls>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            got = hangups.recv() => if got.is_none() { return },
            _ = stop.changed() => return,
        }
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&file)).await;
        let checked = match loaded {
            Ok(result) => result.and_then(|new| running.check_reload(new)),
            Err(e) => {
                tracing::error!(error = %e, "reload refused: loading the config failed");
                app.metrics.reloads_refused.inc();
                continue;
            }
        };
        let new = match checked {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("reload refused, the running config stays in force: {e}");
                app.metrics.reloads_refused.inc();
                continue;
            }
        };
        if let (Some(live), Transport::Tls(cfg)) = (&tls, &new.server.transport) {
            *live.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(cfg);
        }
        let (kid, keys, relays) = (
            new.signing.active.kid(),
            new.api_keys.len(),
            new.relays.len(),
        );
        let revoked = new.revoked_keys.len();
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
        app.reload(new);
        app.metrics.reloads_applied.inc();
        tracing::info!(
            active_kid = kid,
            api_keys = keys,
            revoked_keys = revoked,
            relays,
            "config reloaded: keys, relays, limits, proxies, sessions, signing and TLS applied"
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[derive(Clone)]
struct ConnOptions {
    tls: Option<LiveTls>,
    tls_handshake_timeout: Duration,
    header_read_timeout: Duration,
    metrics: Arc<Metrics>,
    per_address: Arc<PerAddress>,
}

/// Connections the admin listener serves at once.
const ADMIN_CONNECTIONS: usize = 64;

/// Connections open per client address (IPv4, or IPv6 /64), so that one client holding idle
/// connections cannot take the whole `server.max_connections` cap from everyone else.
#[derive(Debug)]
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A hold on one of `peer`'s connections, or `None` when it has its maximum open.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<AddressHold> {
        let key = ferry_core::cidr::limit_key(peer.ip(), 64);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressHold {
            table: Arc::clone(self),
            key,
        })
    }
}

/// One open connection of an address; released when dropped.
struct AddressHold {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl Drop for AddressHold {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    options: ConnOptions,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        // Take a connection slot before accepting: beyond the cap, clients wait in the
        // kernel's backlog instead of costing a task each.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Some(hold) = options.per_address.admit(peer) else {
            // Closed at once: the client's other connections are its share of the cap.
            options.metrics.connections_refused_per_address.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let options = options.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            options.metrics.connections.inc();
            options.metrics.connections_accepted.inc();
            serve_connection(stream, peer, router, &options, watcher).await;
            options.metrics.connections.dec();
            drop(hold);
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    options: &ConnOptions,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let (stream, lingering) = LingerStream::new(stream);
    let wants_linger = stream.wanted();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ClientAddr(peer));
        let (body, read) = TrackedBody::new(req.into_parts());
        let answer = router.clone().oneshot(body.map(axum::body::Body::new));
        let wants_linger = Arc::clone(&wants_linger);
        async move {
            let mut response = answer.await?;
            if close_unless_read(&read, &mut response) {
                wants_linger.store(true, Ordering::Relaxed);
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    match &options.tls {
        Some(live) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(
                &live.read().unwrap_or_else(PoisonError::into_inner),
            ));
            let handshake =
                tokio::time::timeout(options.tls_handshake_timeout, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    options.metrics.tls_handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    options.metrics.tls_handshake_failures.inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = http.serve_connection(TokioIo::new(tls), service);
            let _ = watcher.watch(conn).await;
        }
        None => {
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn).await;
        }
    }
    // Handed back only after an answer that ended the connection before its body was read.
    if let Ok(stream) = lingering.await {
        linger(stream).await;
    }
}

/// A request body that records whether it was read to its end (or had none).
struct TrackedBody {
    inner: Incoming,
    read: Arc<AtomicBool>,
}

impl TrackedBody {
    /// The request rebuilt around a tracked body, and the flag saying it was read.
    fn new(
        (parts, inner): (hyper::http::request::Parts, Incoming),
    ) -> (hyper::Request<Self>, Arc<AtomicBool>) {
        let read = Arc::new(AtomicBool::new(hyper::body::Body::is_end_stream(&inner)));
        let body = Self {
            inner,
            read: Arc::clone(&read),
        };
        (hyper::Request::from_parts(parts, body), read)
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let end = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if end {
            self.read.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer given before the request's body was read to its end (401, 415, 429, 413 and
/// the like answer before reading it, and its rest may not have arrived yet) says
/// `Connection: close`: hyper then closes the connection after it, with a TLS close_notify,
/// and a keep-alive client knows not to send its next request there. Reading the rest
/// instead would make the answer wait for a body the gateway has no use for; the rest is read
/// and discarded after the answer, while the connection lingers (`crate::linger`). Returns
/// whether the answer closes the connection so.
fn close_unless_read(read: &AtomicBool, response: &mut hyper::Response<axum::body::Body>) -> bool {
    let unread = !read.load(Ordering::Relaxed);
    if unread {
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    unread
}
