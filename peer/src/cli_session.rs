//! The CLI commands that run a peer session: what they share (the grant, the identity, the
//! optional gateway for renewal) and how a session is opened and reported.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ferry_core::keys::PeerStaticKey;
use ferry_core::noise::LocalIdentity;
use ferry_peer::gateway::{ApiKey, GatewayClient, Grant};
use ferry_peer::link::DatagramLink as _;
use ferry_peer::session::{Expectation, Session, SessionConfig, SessionStats, Timeouts};

/// The environment variable that holds the API key when `--api-key-file` is not given.
pub const API_KEY_ENV: &str = "FERRY_API_KEY";

/// The `--help` text of the commands that run a session.
pub const SESSION_HELP: &str = "\
The peer binds the slot of --grant (a file written by `ferry-peer create`, `join` or `renew`) on
the grant's relay, waits for the other peer, and runs the end-to-end Noise handshake, pinning
the other peer's key the grant names (or, only with --trust-on-first-use NAME, the key first
seen for NAME in the known-peers file). Slot A initiates, slot B answers.

With --gateway, --ca and an API key (--api-key-file, else FERRY_API_KEY; never on the command
line), the session renews its token before it expires and recovers after a relay restart or an
idle-out, for as long as the gateway renews the session. Without --gateway it cannot: it says so
at the start and ends when the grant's token expires.

Through an IPv4 relay address a message (a tunnelled datagram, a QUIC packet of a transfer) is
at most 1427 bytes, through an IPv6 one at most 1407 (its header is 20 bytes longer), so that
every datagram fits a 1500-byte path unfragmented; the line that says the session is connected
says which.

When the session ends the command prints the session's counters, one `name value` per line.
Exit status: 0 on success, 1 on failure with a one-line error on stderr.";

/// What every session command needs: the slot to bind, this peer's key, and optionally the
/// gateway for renewal.
#[derive(Debug, clap::Args)]
pub struct SessionArgs {
    /// The grant file of the slot to bind (from `ferry-peer create`, `join` or `renew`).
    #[arg(long, value_name = "FILE")]
    pub grant: PathBuf,
    /// This peer's secret key file (from `ferry-peer keygen`).
    #[arg(long, value_name = "FILE")]
    pub identity: PathBuf,
    /// The gateway's base URL, `https://host[:port]`, to renew the session's token and recover
    /// its binding; without it the session ends when the grant's token expires.
    #[arg(long, value_name = "URL", requires = "ca")]
    pub gateway: Option<String>,
    /// PEM file of the CA certificate(s) the gateway's certificate must chain to.
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub ca: Option<PathBuf>,
    /// File holding the API key (`fgk1.<id>.<secret>`); without it, the key is taken from the
    /// FERRY_API_KEY environment variable. Only with --gateway.
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub api_key_file: Option<PathBuf>,
    /// Talk to the relay at this address instead of the grant's `relay.address`.
    #[arg(long, value_name = "ADDR")]
    pub relay: Option<SocketAddr>,
    /// Seconds to wait for the relay, the other peer and the handshake (1 to 86400).
    #[arg(long, value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECT_TIMEOUT_SECS))]
    pub connect_timeout: u64,
    /// Trust the other peer's key on first use under NAME instead of pinning the key the grant
    /// names: the first key seen is recorded in --known-peers, a later different one is
    /// refused. Only for a grant that names no key (a session created without --expect-peer).
    #[arg(long, value_name = "NAME")]
    pub trust_on_first_use: Option<String>,
    /// The known-peers file that --trust-on-first-use reads and updates.
    #[arg(long, value_name = "FILE", requires = "trust_on_first_use")]
    pub known_peers: Option<PathBuf>,
}

/// The longest `--connect-timeout`: a day.
pub const MAX_CONNECT_TIMEOUT_SECS: u64 = 86_400;

/// The longest grant file read (a grant is under 2 KiB).
const MAX_GRANT_FILE_LEN: u64 = 64 * 1024;

/// The API key from `file` (a secret: a regular file readable by its owner only, like a key
/// file), else from the environment.
pub fn api_key(file: Option<&std::path::Path>) -> anyhow::Result<ApiKey> {
    let text = match file {
        Some(path) => ferry_keyfile::load_secret_text(path)
            .with_context(|| format!("reading the API key file {}", path.display()))?,
        None => match std::env::var(API_KEY_ENV) {
            Ok(key) => zeroize::Zeroizing::new(key),
            Err(_) => anyhow::bail!(
                "no API key: give --api-key-file FILE or set the {API_KEY_ENV} environment variable"
            ),
        },
    };
    if text.trim().is_empty() {
        anyhow::bail!("the API key is empty");
    }
    Ok(ApiKey::new(&text))
}

/// Reads the grant file at `path`: a regular file (a FIFO or a device is refused without
/// blocking) of at most 64 KiB.
pub fn read_grant(path: &std::path::Path) -> anyhow::Result<Grant> {
    let context = || format!("reading the grant {}", path.display());
    let text = ferry_keyfile::read_text_file(path, MAX_GRANT_FILE_LEN).with_context(context)?;
    Grant::from_json(&text).with_context(context)
}

/// Everything of [`SessionArgs`] read and checked, before any network traffic.
pub struct Prepared {
    config: SessionConfig,
    /// Trust on first use: the name and the known-peers file to record the key in.
    tofu: Option<(String, PathBuf)>,
}

/// Reads the grant, the identity and the gateway settings, so that a bad file or a missing
/// API key fails before the session starts.
pub fn prepare(args: &SessionArgs) -> anyhow::Result<Prepared> {
    let grant = read_grant(&args.grant)?;
    let key: PeerStaticKey = ferry_keyfile::load_secret_file(&args.identity)
        .with_context(|| format!("reading the identity {}", args.identity.display()))?;
    let identity = LocalIdentity::from_secret_bytes(*key.secret_bytes());
    let renewer = match (&args.gateway, &args.ca) {
        (Some(url), Some(ca)) => {
            let key = api_key(args.api_key_file.as_deref())?;
            Some(Arc::new(GatewayClient::new(url, ca, &key)?))
        }
        // clap makes --gateway and --ca come together.
        _ => None,
    };
    let expires_at = grant.expires_at;
    let mut config = SessionConfig::new(grant, identity);
    let mut tofu = None;
    if let Some(name) = &args.trust_on_first_use {
        let file = args
            .known_peers
            .clone()
            .unwrap_or_else(crate::default_known_peers);
        // Made now if missing (a fresh machine has no ~/.config/ferry), and opened for writing
        // under its lock, so that a file the key cannot be recorded in fails before the
        // session spends its token rather than after.
        if let Some(dir) = file.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating the directory {}", dir.display()))?;
        }
        let known = ferry_keyfile::update_known_peers(&file, |known| (false, known.clone()))
            .with_context(|| format!("reading the known-peers file {}", file.display()))?;
        config.expectation = Expectation::TrustOnFirstUse {
            name: name.clone(),
            known,
        };
        tofu = Some((name.clone(), file));
    }
    config.relay = args.relay;
    config.timeouts = Timeouts {
        connect: Duration::from_secs(args.connect_timeout.max(1)),
        ..Timeouts::default()
    };
    match renewer {
        Some(client) => config.renewer = Some(client),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            eprintln!(
                "ferry-peer: no --gateway: the session cannot renew its token and ends when it \
                 expires at {expires_at} (in {} s)",
                expires_at.saturating_sub(now)
            );
        }
    }
    Ok(Prepared { config, tofu })
}

impl Prepared {
    /// Connects the session.
    pub async fn connect(self) -> anyhow::Result<Session> {
        let slot = self.config.grant.slot;
        let session = Session::connect(self.config)
            .await
            .context("connecting the session")?;
        if let Some((name, file)) = &self.tofu {
            // Under the file's lock, so a concurrent update by another process is kept.
            let key = *session.remote_identity().as_bytes();
            let recorded = ferry_keyfile::update_known_peers(file, |known| match known.get(name) {
                Some(old) => (false, *old == key),
                None => (known.insert(name, key).is_ok(), true),
            })
            .with_context(|| format!("writing the known-peers file {}", file.display()))?;
            if !recorded {
                session.close().await;
                anyhow::bail!(
                    "{} now holds another key for {name:?}: refusing the session",
                    file.display()
                );
            }
        }
        eprintln!(
            "ferry-peer: connected as slot {slot:?} of session {:016x} through {} (peer {}); \
             messages of up to {} bytes over {}",
            session.session_id(),
            session.relay(),
            session.remote_identity(),
            session.max_payload(),
            session.family()
        );
        Ok(session)
    }
}

/// Prints a session's counters, one `name value` per line.
pub fn print_stats(stats: &SessionStats) {
    for (name, value) in stats.fields() {
        println!("{name} {value}");
    }
}

/// Starts the multi-threaded runtime the session commands run on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}
