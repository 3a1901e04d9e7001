//! `ferry-relay`: the relay binary.
//!
//! The data path, in two hops: [`ferry_relay::worker::run_worker`] (one pinned io_uring loop
//! per core) hands each datagram to its [`ferry_relay::shards::SessionsHandler`], and so to
//! [`ferry_relay::shards::Sessions::handle`] in the same module, which runs the session logic
//! of docs/protocol.md §7 and says whether to forward, answer or drop it.
//! This file only wires things together: config, workers, the admin listener and signals.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use caps::{CapSet, Capability};
use clap::{Parser, Subcommand};
use ferry_core::keys::RelayStaticKey;
use ferry_core::problems::Check;
use ferry_core::proof::{COOKIE_WINDOW_SECS, CookieJar};
use ferry_core::time::UnixTime;
use ferry_core::token::TokenVerifier;
use ferry_relay::admin::{AdminServer, AdminState};
use ferry_relay::config::{self, RelayConfig};
use ferry_relay::exporter;
use ferry_relay::heartbeat::{self, HeartbeatStats, Reporter};
use ferry_relay::metrics::ReloadStats;
use ferry_relay::shards::{Sessions, SessionsHandler};
use ferry_relay::worker::{self, WorkerConfig, WorkerStats};
use ferry_relay::xdp::{self, Guard};

/// The config file when none is given.
const DEFAULT_CONFIG: &str = "/etc/ferry/relay.toml";

/// Ferry relay: forwards end-to-end encrypted datagrams between two bound peers, blind.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The config file [default: /etc/ferry/relay.toml].
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run,
    /// Validate a config file, print every problem found, and exit non-zero if there is one.
    CheckConfig {
        /// The config file to check (or give it with --config) [default:
        /// /etc/ferry/relay.toml].
        file: Option<PathBuf>,
    },
    /// Generate the relay's static X25519 key (opens the slot secrets sealed in tokens).
    ///
    /// Writes the secret to OUT with mode 0600 and the public key to OUT.pub; the public key
    /// goes into the gateway's relay registry.
    Keygen {
        /// Where to write the secret key, e.g. /var/lib/ferry/relay.key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Prepare a new install: create DIR (mode 0700) and the relay's static key in it
    /// (DIR/relay.key, public key in DIR/relay.key.pub), unless it already exists.
    ///
    /// Safe to run again: an existing key is kept. The shipped config names these files; the
    /// Debian package runs it after install.
    Init {
        /// The directory for the key.
        #[arg(long, default_value = "/var/lib/ferry")]
        dir: PathBuf,
    },
    /// Print the public key of an existing relay key file.
    Pubkey {
        /// The secret key file.
        key: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&config),
        Command::CheckConfig { file } => match (file, cli.config) {
            (Some(file), Some(other)) if file != other => Err(anyhow::anyhow!(
                "check-config was given two config files ({} and --config {}): give one",
                file.display(),
                other.display()
            )),
            (Some(file), _) => check_config(&file),
            (None, _) => check_config(&config),
        },
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Init { dir } => init(&dir),
        Command::Pubkey { key } => ferry_keyfile::load_secret_file::<RelayStaticKey>(&key)
            .map(|k| println!("{}", k.public()))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = ferry_core::error_line::one_line(e.as_ref());
            eprintln!("ferry-relay: {line}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let key = RelayStaticKey::generate(&rng).context("generating the relay key")?;
    let public = ferry_keyfile::write_key_pair(out, &key, force)?;
    println!(
        "relay key written to {} (public key in {})",
        out.display(),
        public.display()
    );
    println!("public key: {}", key.public());
    Ok(())
}

/// The file name of the static key `init` creates in its directory.
const INIT_KEY_NAME: &str = "relay.key";

fn init(dir: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join(INIT_KEY_NAME);
    if key_path.exists() {
        let key = ferry_keyfile::load_secret_file::<RelayStaticKey>(&key_path)?;
        println!("relay key {} kept", key_path.display());
        if let Some(public) = ferry_keyfile::write_missing_public_file(&key_path, &key)? {
            println!(
                "its public key was missing: written to {}",
                public.display()
            );
        }
        println!("public key: {}", key.public());
        return Ok(());
    }
    keygen(&key_path, false)
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    let cfg = config::load(file)?;
    // The interfaces and CPUs are facts of the host, not of the file: checked here (and the
    // interfaces at start), not by the parser (a config may be checked on one machine for
    // another).
    let mut check = Check::default();
    for (i, cpu) in cfg.cpus.iter().enumerate() {
        if !Path::new(&format!("/sys/devices/system/cpu/cpu{cpu}")).exists() {
            check.fail(
                format!("relay.cpus[{i}]"),
                format!(
                    "this host has no CPU {cpu} (/sys/devices/system/cpu lists them); a worker \
                     cannot be pinned to it"
                ),
            );
        }
    }
    if cfg.xdp.mode != xdp::Mode::Off {
        for (i, name) in cfg.xdp.interfaces.iter().enumerate() {
            if !xdp::interface_exists(name) {
                check.fail(
                    format!("xdp.interfaces[{i}]"),
                    format!(
                        "there is no network interface named {name} here (check-config looks \
                         in the network namespace it runs in; `ip link` lists them)"
                    ),
                );
            }
        }
    }
    if !check.problems.is_empty() {
        return Err(config::ConfigError::Invalid {
            path: file.to_owned(),
            problems: check.problems,
        }
        .into());
    }
    let xdp = match cfg.xdp.mode {
        xdp::Mode::Off => "XDP guard off".to_string(),
        mode => format!(
            "XDP guard {} on {}",
            mode.name(),
            cfg.xdp.interfaces.join(", ")
        ),
    };
    println!(
        "{}: ok (relay id {}, {} listen address(es), {} worker(s), {} trusted gateway key(s), {xdp})",
        file.display(),
        cfg.relay_id,
        cfg.listen.len(),
        cfg.workers,
        cfg.gateway_keys.len()
    );
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn build_sessions(cfg: &RelayConfig, cookies: CookieJar) -> anyhow::Result<Sessions> {
    let mut verifier = TokenVerifier::new(cfg.verifier_config(), cfg.static_key.clone())
        .context("setting up token verification")?;
    for (kid, key) in &cfg.gateway_keys {
        verifier.add_trusted_key(*kid, *key);
    }
    Ok(Sessions::new(
        cfg.session_limits(),
        cfg.ip_limits(),
        verifier,
        cookies,
    ))
}

/// Writes the cookie window keys into the guard (if it runs) when the window has changed
/// since `written`, the window they were last written for.
fn update_cookie_keys(
    xdp: &Mutex<Option<Guard>>,
    cookies: &CookieJar,
    written: &mut Option<u64>,
) -> anyhow::Result<()> {
    let now = UnixTime::from(SystemTime::now());
    let window = now.as_secs() / COOKIE_WINDOW_SECS;
    if *written == Some(window) {
        return Ok(());
    }
    if let Some(guard) = xdp.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
        guard
            .set_cookie_keys(cookies.window_keys(now))
            .context("writing the cookie keys")?;
    }
    *written = Some(window);
    Ok(())
}

/// How long a start waits for a listen address to be released: a relay that was just killed
/// holds its sockets until the kernel has torn its io_uring rings down, which it does in the
/// background after the process is gone (usually within milliseconds).
const LISTEN_RELEASE_WAIT: Duration = Duration::from_secs(3);

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = config::load(path)?;
    init_logging(&cfg.log_level);

    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signals")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
        .context("installing SIGHUP")?;

    // Another relay on a listen port would take part of its sources: refuse before touching
    // anything it may own (its XDP guard on the same interfaces included).
    for &addr in &cfg.listen {
        if let Err(e) = worker::wait_until_not_in_use(addr, LISTEN_RELEASE_WAIT) {
            match e.kind() {
                std::io::ErrorKind::AddrInUse => anyhow::bail!(
                    "relay.listen: {addr} is already in use: is another ferry-relay, or another \
                     program, running on it (`ss -ulpn` names it)? Two relays on one port would \
                     split its sources, and the sessions between them, so this one does not start"
                ),
                _ => return Err(e).with_context(|| format!("relay.listen: checking {addr}")),
            }
        }
    }

    // The XDP guard first: if it cannot run as the config asks, nothing else starts. Dropping
    // it (on any return from here) detaches it.
    let xdp = Arc::new(Mutex::new(
        Guard::start(&cfg.xdp, &cfg.xdp_ports()).context("starting the XDP guard")?,
    ));
    if cfg.xdp.mode == xdp::Mode::Off {
        tracing::warn!("xdp.mode = \"off\": running without the XDP guard");
    }
    // The guard's session map follows the session tables whenever the guard runs, so that
    // turning `xdp.session_filter` on by a reload finds it complete.
    let rng = ring::rand::SystemRandom::new();
    let cookies = CookieJar::generate(&rng).context("drawing the cookie secret")?;
    let mut sessions = build_sessions(&cfg, cookies.clone())?;
    if let Some(guard) = xdp.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
        sessions = sessions.with_observer(guard.session_filter(&cfg.listen)?);
        guard
            .set_relay_addresses(&cfg.listen)
            .context("writing the relay's addresses for the guard's CHALLENGEs")?;
    }
    // The guard checks address cookies with the window keys, rewritten as windows pass.
    let mut cookie_window = None;
    update_cookie_keys(&xdp, &cookies, &mut cookie_window)?;
    let sessions = Arc::new(sessions);

    let stats: Vec<Arc<WorkerStats>> = (0..cfg.workers)
        .map(|_| Arc::new(WorkerStats::default()))
        .collect();
    let heartbeat_stats = Arc::new(HeartbeatStats::default());
    let reloads = Arc::new(ReloadStats::default());
    let admin_state = Arc::new(AdminState::new({
        let sessions = Arc::clone(&sessions);
        let reloads = Arc::clone(&reloads);
        let stats = stats.clone();
        let xdp = Arc::clone(&xdp);
        let heartbeat = cfg
            .heartbeat
            .is_some()
            .then(|| Arc::clone(&heartbeat_stats));
        move || {
            let guard = xdp.lock().unwrap_or_else(PoisonError::into_inner);
            let mut page = exporter::render(&sessions, &stats, guard.as_ref());
            page.push_str(&reloads.metrics_page());
            if let Some(heartbeat) = &heartbeat {
                page.push_str(&heartbeat.metrics_page());
            }
            page
        }
    }));
    // The start-only capabilities go once every thread that holds them is past its privileged
    // steps: each worker drops them itself (capabilities belong to threads) once its sockets
    // are open, and this thread before it starts the admin listener, whose threads inherit
    // the reduced sets.
    let drop_caps = match start_caps_needed_later(cfg.xdp.mode != xdp::Mode::Off) {
        None => true,
        Some(why) => {
            tracing::info!("keeping CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN after start: {why}");
            false
        }
    };

    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut workers = Vec::with_capacity(cfg.workers);
    for (index, stats) in stats.iter().enumerate() {
        let worker_cfg = WorkerConfig {
            listen: cfg.listen.clone(),
            cpu: cfg.cpu_for_worker(index),
            gso: cfg.udp_gso,
            gro: cfg.udp_gro,
            socket_buffers: cfg.socket_buffers,
            zero_copy_min: cfg.send_zc_min_bytes,
            stop: Arc::clone(&stop),
            stats: Arc::clone(stats),
            ..WorkerConfig::default()
        };
        let handler = SessionsHandler::new(Arc::clone(&sessions), index, Instant::now());
        let started = started_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ferry-worker-{index}"))
            .spawn(move || {
                let result = worker::run_worker(worker_cfg, handler, || {
                    let dropped = if drop_caps {
                        drop_start_caps()
                            .map(|_| ())
                            .map_err(|e| format!("dropping capabilities: {e}"))
                    } else {
                        Ok(())
                    };
                    let _ = started.send(dropped);
                });
                if let Err(e) = &result {
                    let _ = started.send(Err(e.to_string()));
                }
                result
            })
            .context("spawning a worker thread")?;
        workers.push(thread);
    }
    drop(started_tx);
    for _ in 0..cfg.workers {
        match started_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                anyhow::bail!("a worker failed to start: {e}");
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                anyhow::bail!("a worker did not start within 10 seconds");
            }
        }
    }
    if drop_caps {
        let dropped = drop_start_caps().context("dropping capabilities")?;
        let ready = if cfg.xdp.mode == xdp::Mode::Off {
            "sockets open"
        } else {
            "XDP guard attached and sockets open"
        };
        if !dropped.is_empty() {
            let names: Vec<String> = dropped.iter().map(ToString::to_string).collect();
            tracing::info!("{ready}: dropped {}", names.join(", "));
        }
    }
    let admin = AdminServer::start(cfg.admin_listen, Arc::clone(&admin_state))
        .with_context(|| format!("starting the admin listener on {}", cfg.admin_listen))?;
    admin_state.ready.store(true, Ordering::Relaxed);
    // Heartbeats start once the workers serve, so the gateway's first probe finds the relay.
    let heartbeat = match cfg.heartbeat.clone() {
        Some(settings) => {
            let sessions = Arc::clone(&sessions);
            let reporter = Reporter {
                relay_id: cfg.relay_id,
                public_key: cfg.static_key.public().to_string(),
                capacity: cfg.limits.max_sessions as u64,
                load: Box::new(move || sessions.occupancy().0 as u64),
            };
            tracing::info!(gateway = %settings.gateway_url, address = %settings.address, "sending heartbeats");
            Some(heartbeat::start(
                settings,
                reporter,
                Arc::clone(&stop),
                Arc::clone(&heartbeat_stats),
            )?)
        }
        None => None,
    };
    tracing::info!(
        relay_id = cfg.relay_id,
        listen = ?cfg.listen,
        workers = cfg.workers,
        admin = %cfg.admin_listen,
        "ferry-relay ready"
    );

    let mut current = cfg;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if reload.swap(false, Ordering::Relaxed) {
            current = apply_reload(path, current, &sessions, &xdp, &reloads);
        }
        if let Err(e) = update_cookie_keys(&xdp, &cookies, &mut cookie_window) {
            // The guard keeps the previous keys, so cookies issued from now on count as
            // missing there (metered like first attempts) until a later write succeeds.
            tracing::warn!("writing the XDP guard's cookie keys: {e:#}");
        }
        if !stop.load(Ordering::Relaxed) && workers.iter().any(|w| w.is_finished()) {
            tracing::error!("a worker stopped unexpectedly; shutting down");
            stop.store(true, Ordering::Relaxed);
        }
    }
    tracing::info!("stopping");
    admin_state.ready.store(false, Ordering::Relaxed);
    let mut failed = None;
    for worker in workers {
        match worker.join() {
            Ok(Ok(report)) => tracing::info!(?report, "worker stopped"),
            Ok(Err(e)) => failed = Some(anyhow::anyhow!("worker failed: {e}")),
            Err(_) => failed = Some(anyhow::anyhow!("a worker panicked")),
        }
    }
    admin.shutdown();
    if let Some(heartbeat) = heartbeat {
        let _ = heartbeat.join();
    }
    if let Some(guard) = xdp.lock().unwrap_or_else(PoisonError::into_inner).take() {
        let interfaces: Vec<String> = guard.attached().iter().map(|(i, _)| i.clone()).collect();
        drop(guard);
        tracing::info!(?interfaces, "XDP guard detached");
    }
    let counters = sessions.counters();
    tracing::info!(
        forwarded = counters.forwarded,
        binds = counters.binds_accepted,
        "ferry-relay stopped"
    );
    failed.map_or(Ok(()), Err)
}

/// Capabilities the relay needs only while it starts: CAP_BPF and CAP_PERFMON load the XDP
/// guard, CAP_NET_ADMIN attaches it and lets the sockets take buffers beyond
/// `net.core.rmem_max` (SO_RCVBUFFORCE); CAP_SYS_ADMIN (a relay run as root) implies all three.
const START_ONLY_CAPS: [Capability; 4] = [
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
];

/// Why the running relay still needs [`START_ONLY_CAPS`], or `None` if it can drop them.
///
/// After start the relay only reads and writes maps through file descriptors it already holds
/// (reloads, the session filter, cookie keys, metrics) and detaches the guard by closing its
/// link. Since Linux 6.5 the kernel checks `kernel.unprivileged_bpf_disabled` only when a
/// map is created or a program loaded, not on every bpf() call, and detaching a BPF link
/// (Linux 5.9 and later) needs no capability; on older kernels both need the capabilities.
fn start_caps_needed_later(xdp_on: bool) -> Option<String> {
    if !xdp_on {
        return None;
    }
    match aya::util::KernelVersion::current() {
        Ok(version) if version >= aya::util::KernelVersion::new(6, 5, 0) => None,
        Ok(version) => Some(format!(
            "Linux {version} checks CAP_BPF on every map access (6.5 and later do not)"
        )),
        Err(e) => Some(format!("the kernel version is unknown ({e})")),
    }
}

/// Removes [`START_ONLY_CAPS`] from the calling thread's effective and permitted sets, and
/// clears its inheritable and ambient sets (the relay runs no other program). Capability sets
/// belong to a thread; threads it starts later inherit the reduced sets.
/// Drops [`START_ONLY_CAPS`] for good; returns those of them the process held.
fn drop_start_caps() -> Result<Vec<Capability>, caps::errors::CapsError> {
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let mut permitted = caps::read(None, CapSet::Permitted)?;
    let mut effective = caps::read(None, CapSet::Effective)?;
    let mut dropped = Vec::new();
    for cap in START_ONLY_CAPS {
        if permitted.remove(&cap) {
            dropped.push(cap);
        }
        effective.remove(&cap);
    }
    caps::set(None, CapSet::Effective, &effective)?;
    caps::set(None, CapSet::Permitted, &permitted)?;
    Ok(dropped)
}

/// SIGHUP: re-read the config; apply limits and gateway keys if it is valid and changes
/// nothing that needs a restart; otherwise log why and keep the old config.
fn apply_reload(
    path: &Path,
    current: RelayConfig,
    sessions: &Sessions,
    xdp: &Mutex<Option<Guard>>,
    reloads: &ReloadStats,
) -> RelayConfig {
    let new = match config::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload refused, the running config stays in force: {e}");
            reloads.count(false);
            return current;
        }
    };
    let replay_cap = current.limits.replay_cache_capacity;
    match current.reload_from(new) {
        Ok(new) => {
            if new.limits.replay_cache_capacity != replay_cap {
                tracing::warn!(
                    running = replay_cap,
                    configured = new.limits.replay_cache_capacity,
                    "limits.replay_cache_capacity changed: the running replay cache keeps its \
                     size until the relay restarts"
                );
            }
            sessions.reload(
                Instant::now(),
                new.session_limits(),
                new.ip_limits(),
                &new.gateway_keys,
            );
            if let Some(guard) = xdp.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                // Only a kernel refusal (a full CIDR trie) gets here; the maps then hold part
                // of the new lists, and the next successful reload completes them.
                if let Err(e) = guard.configure(&new.xdp, &new.xdp_ports()) {
                    tracing::error!("reload: the XDP guard did not take the new config: {e}");
                }
            }
            tracing::info!(
                gateway_keys = new.gateway_keys.len(),
                "config reloaded: limits, gateway keys and XDP rates and lists applied, sessions kept"
            );
            reloads.count(true);
            new
        }
        Err(e) => {
            tracing::error!("reload refused, the running config stays in force: {e}");
            reloads.count(false);
            current
        }
    }
}
