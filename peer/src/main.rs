//! `ferry-peer`: the endpoint CLI. Manages the peer's identity key and its known-peers file,
//! asks the gateway for a session (`create`, `join --code CODE` and `renew --grant FILE` write
//! the gateway's grant to a file, its format: [`ferry_peer::gateway`]), and runs a session on a
//! grant ([`ferry_peer::session::Session`]): `send` and `recv` move a file over it
//! ([`ferry_peer::transfer`]), `tunnel` carries a local UDP application's traffic through it.

mod cli_session;

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::{PeerPublicKey, PeerStaticKey};
use ferry_peer::gateway::{GatewayClient, Grant};
use ferry_peer::link::{DatagramLink as _, LinkError};
use ferry_peer::session::Session;
use ferry_peer::transfer::{BarProgress, TransferOptions, TransferReport};
use ferry_peer::tunnel::{TunnelError, TunnelMode, TunnelStats};

use crate::cli_session::{SESSION_HELP, SessionArgs};

/// The `--help` text on the grant file, shared by `create`, `join` and `renew`.
const GRANT_HELP: &str = "\
The grant file is the gateway's JSON answer, one object, written with mode 0600 because it holds
this peer's token and slot secret:

  {\"session_id\": \"<16 hex digits>\", \"slot\": \"A\" or \"B\",
   \"token\": \"<208 bytes, base64>\", \"slot_secret\": \"<32 bytes, base64>\",
   \"kid\": <signing key id>, \"not_before\": <unix s>, \"expires_at\": <unix s>,
   \"relay\": {\"id\": <id>, \"address\": \"<ip:port>\", \"public_key\": \"<32 bytes, base64>\"},
   \"expected_peer_public_key\": \"<the other peer's key, base64>\" or null,
   \"join_code\": \"<code>\", \"join_code_expires_at\": <unix s>}

join_code and join_code_expires_at only come with create. The API key is read from
--api-key-file, else from the FERRY_API_KEY environment variable; never from the command line.
The gateway's certificate must be signed by a CA in --ca and name the URL's host.";

/// How to reach and authenticate to the gateway.
#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// The gateway's base URL, `https://host[:port]`.
    #[arg(long, value_name = "URL")]
    gateway: String,
    /// PEM file of the CA certificate(s) the gateway's certificate must chain to; the only
    /// roots trusted (the system's are not).
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// File holding the API key (`fgk1.<id>.<secret>`); without it, the key is taken from the
    /// FERRY_API_KEY environment variable.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
}

/// Ferry peer: an endpoint that talks to another peer through a Ferry relay.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the peer's static X25519 identity key (its Noise static key).
    Keygen {
        /// Where to write the secret key; the public key goes to OUT.pub.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key (the identity other peers pin) of a peer key file.
    Pubkey {
        /// The secret key file (or its public key file, KEY.pub).
        key: PathBuf,
    },
    /// The peers trusted on first use.
    KnownPeers {
        /// The known-peers file.
        #[arg(long, default_value_os_t = default_known_peers())]
        file: PathBuf,
        #[command(subcommand)]
        action: KnownPeersAction,
    },
    /// Create a session through the gateway (this peer takes slot A) and write the grant to
    /// --out; prints `session_id`, `slot`, `join_code` (to hand to the other peer) and
    /// `expires_at` (the token's expiry, Unix seconds), one `name value` line each.
    #[command(after_long_help = GRANT_HELP)]
    Create {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// This peer's secret key file (from `ferry-peer keygen`).
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// The realm to create the session in.
        #[arg(long, default_value = "default")]
        realm: String,
        /// The public key of the peer that may join (base64, its public key file's line, or
        /// the whole file: "$(cat bob.key.pub)"); the gateway refuses a join with another key.
        #[arg(long, value_name = "KEY")]
        expect_peer: Option<String>,
        /// Where to write the grant (JSON, mode 0600); an existing file is kept unless --force.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing --out file (the grant of another session, maybe).
        #[arg(long)]
        force: bool,
    },
    /// Join a session with its join code (this peer takes slot B) and write the grant to --out;
    /// prints `session_id`, `slot`, `peer` (the creator's public key, which the grant pins) and
    /// `expires_at`, one `name value` line each.
    #[command(after_long_help = GRANT_HELP)]
    Join {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// This peer's secret key file (from `ferry-peer keygen`).
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// The join code the creator handed over.
        #[arg(long)]
        code: String,
        /// Where to write the grant (JSON, mode 0600); an existing file is kept unless --force.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing --out file (the grant of another session, maybe).
        #[arg(long)]
        force: bool,
    },
    /// Get a fresh token and slot secret for the session and slot of a grant file, with the
    /// API key that created or joined it, and write the new grant; prints `session_id` and
    /// `expires_at`, one `name value` line each.
    #[command(after_long_help = GRANT_HELP)]
    Renew {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// The grant file to renew.
        #[arg(long, value_name = "FILE")]
        grant: PathBuf,
        /// Where to write the fresh grant (JSON, mode 0600); the --grant file if not given.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Send a file to the other peer of the session, which runs `ferry-peer recv`: a reliable,
    /// ordered transfer (QUIC over the session) with a SHA-256 check at the end and a progress
    /// bar on a terminal. Prints `name`, `bytes`, `seconds`, `mb_per_s` (10^6 bytes per
    /// second), `sha256`, QUIC's `quic_packets_sent`, `quic_packets_lost` (declared lost and
    /// sent again), `quic_rtt_us` (smoothed round trip at the end) and `ignored_datagrams`
    /// (messages on the session that were no QUIC packet of the transfer), then the session's
    /// counters, one `name value` per line.
    #[command(after_long_help = SESSION_HELP)]
    Send {
        #[command(flatten)]
        session: SessionArgs,
        #[command(flatten)]
        transfer: TransferArgs,
        /// The file to send; the receiver stores it under its base name.
        file: PathBuf,
    },
    /// Receive one file from the other peer of the session, which runs `ferry-peer send`, into
    /// --dir. The file appears under its sent name only once its SHA-256 matches; an existing
    /// file is never replaced. Prints `name`, `path`, `bytes`, `seconds`, `mb_per_s`, `sha256`,
    /// the same three `quic_*` lines and `ignored_datagrams` for its side, then the session's
    /// counters, one `name value` per line.
    #[command(after_long_help = SESSION_HELP)]
    Recv {
        #[command(flatten)]
        session: SessionArgs,
        #[command(flatten)]
        transfer: TransferArgs,
        /// The directory to write the file into.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
    /// Carry a local UDP application's traffic through the relay to the other peer, both ways,
    /// until Ctrl-C (or SIGTERM) or the other peer closes. One end listens (--listen: the local
    /// application sends to ADDR as to its server), the other connects (--connect: delivers to the
    /// application's server at ADDR). A datagram longer than one DATA datagram carries is
    /// dropped, never split, and counted in `dropped_too_long`: 1427 bytes through an IPv4 relay
    /// address, 1407 through an IPv6 one (said at the start). Prints the tunnel's and the
    /// session's counters at the end.
    #[command(after_long_help = SESSION_HELP)]
    Tunnel {
        #[command(flatten)]
        session: SessionArgs,
        /// Take the local application's datagrams at this address.
        #[arg(
            long,
            value_name = "ADDR",
            conflicts_with = "connect",
            required_unless_present = "connect"
        )]
        listen: Option<std::net::SocketAddr>,
        /// Deliver to the application listening at this address.
        #[arg(long, value_name = "ADDR")]
        connect: Option<std::net::SocketAddr>,
    },
}

#[derive(Debug, Subcommand)]
enum KnownPeersAction {
    /// List every remembered peer and its key.
    List,
    /// Forget a peer, so that its next key is trusted on first use again.
    Forget {
        /// The peer's name.
        name: String,
    },
}

/// `$XDG_CONFIG_HOME/ferry/known-peers`, else `~/.config/ferry/known-peers`.
pub(crate) fn default_known_peers() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("ferry").join("known-peers")
}

fn gateway_client(args: &GatewayArgs) -> anyhow::Result<GatewayClient> {
    let key = cli_session::api_key(args.api_key_file.as_deref())?;
    Ok(GatewayClient::new(&args.gateway, &args.ca, &key)?)
}

/// Runs one gateway request on a single-threaded runtime.
fn block_on<T>(future: impl Future<Output = T>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(future))
}

/// Writes `grant` to `path` with mode 0600, through a temporary file next to it and a rename,
/// so that a reader never sees half a grant. An existing file is replaced only if `replace`.
fn write_grant(path: &Path, grant: &Grant, replace: bool) -> anyhow::Result<()> {
    if !replace && std::fs::symlink_metadata(path).is_ok() {
        anyhow::bail!(
            "{} already exists (the grant of another session?): give --force to replace it",
            path.display()
        );
    }
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(grant.to_json().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing the grant to {}", path.display()))
    })
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM and names it; never returns if neither can be
/// watched.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// Creates and removes a file in `dir`, to learn that files can be created there.
fn tempfile_in(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".ferry-peer-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// The options of `send` and `recv` beyond the session's.
#[derive(Debug, clap::Args)]
struct TransferArgs {
    /// Give up when the other peer makes no progress for this many seconds: no QUIC
    /// connection (is it running `recv` too?), no file data, no verdict. Keepalives do not
    /// count; waiting on this machine's own disk does not either.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=cli_session::MAX_CONNECT_TIMEOUT_SECS))]
    stall_timeout: u64,
}

/// Which way a file goes.
enum Direction {
    Send(PathBuf),
    Recv(PathBuf),
}

/// Runs `ferry-peer send` or `recv`.
fn transfer(
    args: &SessionArgs,
    transfer_args: &TransferArgs,
    direction: Direction,
) -> anyhow::Result<()> {
    // Everything that can be checked is checked before the session, whose token a failure
    // afterwards would have spent (and the other peer would see only the session end).
    match &direction {
        Direction::Send(file) => {
            // A regular file (a FIFO is refused, not waited on), readable, whose name the
            // receiver takes.
            ferry_keyfile::open_regular_file(file)
                .with_context(|| format!("opening {}", file.display()))?;
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: the path has no UTF-8 file name", file.display()))?;
            ferry_peer::transfer::check_file_name(name)
                .map_err(|reason| anyhow::anyhow!("{}: {reason}", file.display()))?;
        }
        Direction::Recv(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("{} is not a directory", dir.display());
            }
            // Writable: a file can be created there (and is removed at once).
            tempfile_in(dir).with_context(|| format!("{} is not writable", dir.display()))?;
        }
    }
    let prepared = cli_session::prepare(args)?;
    let runtime = cli_session::runtime()?;
    runtime.block_on(async {
        let session: Arc<Session> = Arc::new(prepared.connect().await?);
        let options = TransferOptions {
            stall_timeout: std::time::Duration::from_secs(transfer_args.stall_timeout),
            ..TransferOptions::default()
        };
        let progress = BarProgress::new();
        let transfer = async {
            match &direction {
                Direction::Send(file) => {
                    ferry_peer::transfer::send_file(session.clone(), file, &options, &progress)
                        .await
                        .with_context(|| format!("sending {}", file.display()))
                }
                Direction::Recv(dir) => {
                    ferry_peer::transfer::receive_file(session.clone(), dir, &options, &progress)
                        .await
                        .context("receiving a file")
                }
            }
        };
        // On Ctrl-C or SIGTERM the transfer is dropped, which removes a file being received
        // (nothing is kept under its name, nor half of it under another), and the session
        // is closed.
        let result = tokio::select! {
            result = transfer => result,
            signal = interrupted() => Err(anyhow::anyhow!(
                "interrupted by {signal}: the transfer was abandoned"
            )),
        };
        session.close().await;
        let report: TransferReport = result?;
        let seconds = report.elapsed.as_secs_f64();
        println!("name {}", report.name);
        if let Some(path) = &report.path {
            println!("path {}", path.display());
        }
        println!("bytes {}", report.bytes);
        println!("seconds {seconds:.3}");
        println!(
            "mb_per_s {:.2}",
            report.bytes as f64 / seconds.max(1e-9) / 1e6
        );
        println!("sha256 {}", report.hash_hex);
        println!("quic_packets_sent {}", report.sent_packets);
        println!("quic_packets_lost {}", report.lost_packets);
        println!("quic_rtt_us {}", report.rtt.as_micros());
        println!("ignored_datagrams {}", report.ignored_datagrams);
        cli_session::print_stats(&session.stats());
        Ok(())
    })
}

/// Runs `ferry-peer tunnel`.
fn tunnel(args: &SessionArgs, mode: TunnelMode) -> anyhow::Result<()> {
    let prepared = cli_session::prepare(args)?;
    let runtime = cli_session::runtime()?;
    runtime.block_on(async {
        let session = Arc::new(prepared.connect().await?);
        let stats = Arc::new(TunnelStats::default());
        let max = session.max_payload();
        let family = session.family();
        eprintln!(
            "ferry-peer: tunnel up ({mode:?}); datagrams of up to {max} bytes through this \
             {family} relay address (longer ones are dropped: dropped_too_long); Ctrl-C (or \
             SIGTERM) ends it"
        );
        let started = std::time::Instant::now();
        // Ctrl-C, or SIGTERM (a service manager stopping it), ends the tunnel normally: the
        // counters are printed and the session closed, so the other peer learns at once.
        let ended = tokio::select! {
            result = ferry_peer::tunnel::run(session.clone(), mode, stats.clone()) => result,
            _ = interrupted() => Ok(()),
            never = warn_too_long(&stats, max, family) => match never {},
        };
        session.close().await;
        let seconds = started.elapsed().as_secs_f64();
        let counts = stats.snapshot();
        println!("seconds {seconds:.3}");
        println!("to_peer_datagrams {}", counts.to_peer_datagrams);
        println!("to_peer_bytes {}", counts.to_peer_bytes);
        println!("from_peer_datagrams {}", counts.from_peer_datagrams);
        println!("from_peer_bytes {}", counts.from_peer_bytes);
        println!("dropped_too_long {}", counts.dropped_too_long);
        println!("dropped_empty {}", counts.dropped_empty);
        println!("dropped_no_application {}", counts.dropped_no_application);
        println!("local_errors {}", counts.local_errors);
        cli_session::print_stats(&session.stats());
        match ended {
            // The other peer ending the tunnel is a normal end.
            Err(TunnelError::Link(LinkError::Closed(reason)))
                if reason.contains("other peer closed") =>
            {
                Ok(())
            }
            other => other.context("the tunnel stopped"),
        }
    })
}

/// Says once on stderr, within a second of the first, that the tunnel dropped a datagram for
/// its length, with the limit; never returns.
async fn warn_too_long(
    stats: &TunnelStats,
    max: usize,
    family: ferry_peer::sizes::Family,
) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    while stats.snapshot().dropped_too_long == 0 {
        tick.tick().await;
    }
    eprintln!(
        "ferry-peer: dropping local datagrams longer than {max} bytes (the most one DATA \
         datagram carries through a {family} relay address on a 1500-byte path): lower the \
         application's packet size or MTU (WireGuard: MTU = {} or less)",
        max - WIREGUARD_OVERHEAD
    );
    std::future::pending().await
}

/// What WireGuard adds to an inner packet of at most its `MTU`: type, receiver index and
/// counter (16 bytes) and the Poly1305 tag (16); it pads the packet to a multiple of 16 bytes
/// but never beyond its `MTU`.
const WIREGUARD_OVERHEAD: usize = 32;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, each said once.
            let line = ferry_core::error_line::one_line(e.as_ref());
            eprintln!("ferry-peer: error: {line}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out, force } => {
            let rng = ring::rand::SystemRandom::new();
            let key = PeerStaticKey::generate(&rng).context("generating the peer key")?;
            let public = ferry_keyfile::write_key_pair(&out, &key, force)?;
            println!(
                "peer key written to {} (public key in {})",
                out.display(),
                public.display()
            );
            println!("identity: {}", key.public());
        }
        Command::Pubkey { key: file } => {
            let public = match ferry_keyfile::load_secret_file::<PeerStaticKey>(&file) {
                Ok(key) => key.public(),
                // A public key file (readable by all, as it should be) names its key too.
                Err(secret_error) => ferry_keyfile::load_public_file::<PeerPublicKey>(&file)
                    .map_err(|_| secret_error)?,
            };
            println!("{public}");
        }
        Command::KnownPeers { file, action } => {
            let known =
                ferry_keyfile::load_known_peers(&file).context("reading the known-peers file")?;
            match action {
                KnownPeersAction::List => {
                    for (name, key) in known.list() {
                        println!("{name} {}", PeerPublicKey::from_bytes(*key));
                    }
                }
                KnownPeersAction::Forget { name } => {
                    let forgotten = ferry_keyfile::update_known_peers(&file, |known| {
                        let forgotten = known.forget(&name);
                        (forgotten, forgotten)
                    })
                    .context("writing the known-peers file")?;
                    if !forgotten {
                        anyhow::bail!("no peer named {name:?} in {}", file.display());
                    }
                    println!("forgot {name}");
                }
            }
        }
        Command::Create {
            gateway,
            identity,
            realm,
            expect_peer,
            out,
            force,
        } => {
            let key: PeerStaticKey = ferry_keyfile::load_secret_file(&identity)?;
            let expected: Option<PeerPublicKey> = expect_peer
                .map(|text| text.parse().context("reading --expect-peer"))
                .transpose()?;
            let client = gateway_client(&gateway)?;
            let grant = block_on(client.create(&realm, &key.public(), expected.as_ref()))?
                .context("creating a session")?;
            write_grant(&out, &grant, force)?;
            println!("session_id {}", grant.session_id_hex());
            println!("slot A");
            if let Some(code) = &grant.join_code {
                println!("join_code {code}");
            }
            println!("expires_at {}", grant.expires_at);
        }
        Command::Join {
            gateway,
            identity,
            code,
            out,
            force,
        } => {
            let key: PeerStaticKey = ferry_keyfile::load_secret_file(&identity)?;
            let client = gateway_client(&gateway)?;
            let grant = block_on(client.join(code.trim(), &key.public()))?
                .context("joining the session")?;
            write_grant(&out, &grant, force)?;
            println!("session_id {}", grant.session_id_hex());
            println!("slot B");
            if let Some(peer) = &grant.expected_peer_public_key {
                println!("peer {peer}");
            }
            println!("expires_at {}", grant.expires_at);
        }
        Command::Renew {
            gateway,
            grant: grant_file,
            out,
        } => {
            let old = cli_session::read_grant(&grant_file)?;
            let client = gateway_client(&gateway)?;
            let grant =
                block_on(client.renew(old.session_id, old.slot))?.context("renewing the slot")?;
            // Renewing replaces the grant it renews: that is its purpose.
            write_grant(out.as_deref().unwrap_or(&grant_file), &grant, true)?;
            println!("session_id {}", grant.session_id_hex());
            println!("expires_at {}", grant.expires_at);
        }
        Command::Send {
            session,
            transfer: t,
            file,
        } => transfer(&session, &t, Direction::Send(file))?,
        Command::Recv {
            session,
            transfer: t,
            dir,
        } => transfer(&session, &t, Direction::Recv(dir))?,
        Command::Tunnel {
            session,
            listen,
            connect,
        } => {
            let mode = match (listen, connect) {
                (Some(addr), _) => {
                    if !addr.ip().is_loopback() {
                        eprintln!(
                            "ferry-peer: warning: --listen {addr} is not a loopback address: any \
                             host that reaches it can send into the tunnel, and the last sender \
                             gets the replies"
                        );
                    }
                    TunnelMode::Listen(addr)
                }
                (None, Some(addr)) => TunnelMode::Connect(addr),
                (None, None) => anyhow::bail!("give --listen ADDR or --connect ADDR"),
            };
            tunnel(&session, mode)?;
        }
    }
    Ok(())
}
