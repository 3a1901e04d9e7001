//! `ferry-peer`: the endpoint CLI. Manages the peer's identity key and its known-peers file,
//! and asks the gateway for a session: `create`, `join --code CODE` and `renew --grant FILE`
//! write the gateway's grant to a file (its format: [`ferry_peer::gateway`]).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_core::keys::{PeerPublicKey, PeerStaticKey};
use ferry_peer::gateway::{ApiKey, GatewayClient, Grant};

/// The environment variable that holds the API key when `--api-key-file` is not given.
const API_KEY_ENV: &str = "FERRY_API_KEY";

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
        /// The secret key file.
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
        /// The public key of the peer that may join (base64 or its public key file's line);
        /// the gateway refuses a join with another key.
        #[arg(long, value_name = "KEY")]
        expect_peer: Option<String>,
        /// Where to write the grant (JSON, mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
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
        /// Where to write the grant (JSON, mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
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

fn default_known_peers() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("ferry").join("known-peers")
}

/// The API key from `--api-key-file`, else from the environment.
fn api_key(args: &GatewayArgs) -> anyhow::Result<ApiKey> {
    let text = match &args.api_key_file {
        Some(path) => zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the API key file {}", path.display()))?,
        ),
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

fn gateway_client(args: &GatewayArgs) -> anyhow::Result<GatewayClient> {
    let key = api_key(args)?;
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
/// so that a reader never sees half a grant.
fn write_grant(path: &Path, grant: &Grant) -> anyhow::Result<()> {
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
        Command::Pubkey { key } => {
            let key: PeerStaticKey = ferry_keyfile::load_secret_file(&key)?;
            println!("{}", key.public());
        }
        Command::KnownPeers { file, action } => {
            let mut known =
                ferry_keyfile::load_known_peers(&file).context("reading the known-peers file")?;
            match action {
                KnownPeersAction::List => {
                    for (name, key) in known.list() {
                        println!("{name} {}", PeerPublicKey::from_bytes(*key));
                    }
                }
                KnownPeersAction::Forget { name } => {
                    if !known.forget(&name) {
                        anyhow::bail!("no peer named {name:?} in {}", file.display());
                    }
                    ferry_keyfile::save_known_peers(&file, &known)
                        .context("writing the known-peers file")?;
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
        } => {
            let key: PeerStaticKey = ferry_keyfile::load_secret_file(&identity)?;
            let expected: Option<PeerPublicKey> = expect_peer
                .map(|text| text.parse().context("reading --expect-peer"))
                .transpose()?;
            let client = gateway_client(&gateway)?;
            let grant = block_on(client.create(&realm, &key.public(), expected.as_ref()))?
                .context("creating a session")?;
            write_grant(&out, &grant)?;
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
        } => {
            let key: PeerStaticKey = ferry_keyfile::load_secret_file(&identity)?;
            let client = gateway_client(&gateway)?;
            let grant = block_on(client.join(code.trim(), &key.public()))?
                .context("joining the session")?;
            write_grant(&out, &grant)?;
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
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&grant_file)
                    .with_context(|| format!("reading the grant {}", grant_file.display()))?,
            );
            let old = Grant::from_json(&text)
                .with_context(|| format!("reading the grant {}", grant_file.display()))?;
            let client = gateway_client(&gateway)?;
            let grant =
                block_on(client.renew(old.session_id, old.slot))?.context("renewing the slot")?;
            write_grant(out.as_deref().unwrap_or(&grant_file), &grant)?;
            println!("session_id {}", grant.session_id_hex());
            println!("expires_at {}", grant.expires_at);
        }
    }
    Ok(())
}
